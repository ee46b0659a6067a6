"""The Gradio demo, driven end to end in headless Chromium: upload, instruct, edit, read the image back.

Skips (with the reason) where Debian's ``chromium``, Playwright's Python client or Gradio is missing.
CI installs them with ``apt-get install -y chromium`` and ``pip install -e ".[demo]" playwright``.
"""

import base64
import io
import shutil
import socket

import numpy as np
import pytest
import torch
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

gradio = pytest.importorskip("gradio", reason="the demo extra is not installed: pip install 'insightedit[demo]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python client is not installed")
if shutil.which("chromium") is None:
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    from insightedit.commands.demo import build_demo
    from insightedit.pipeline import EditPipeline
    from insightedit.systems.editor_system import EditorSystem

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("demo") / "model"
    system = EditorSystem(member="insightedit", preset="tiny", stage=3)
    EditPipeline.from_system(system, resolution=32).save_pretrained(folder)
    pipeline = EditPipeline.from_pretrained(folder, device="cpu")
    port = free_port()
    app = build_demo(pipeline, default_steps=2)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


def test_upload_edit_and_read_back_the_image(demo_url, tmp_path):
    source = tmp_path / "source.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(source)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(demo_url, wait_until="domcontentloaded")
            page.locator("#source input[type=file]").set_input_files(str(source))
            page.locator("#source img").first.wait_for(timeout=60_000)  # the upload is shown
            page.locator("#instruction textarea").fill("remove the red circle")
            page.locator("#steps input[type=number]").fill("2")
            page.locator("#steps input[type=number]").press("Enter")
            page.locator("#edit-button").click()
            result = page.locator("#result img").first
            result.wait_for(timeout=120_000)
            src = result.get_attribute("src") or ""
            if src.startswith("data:"):
                data = base64.b64decode(src.split(",", 1)[1])
            else:
                response = page.request.get(src if src.startswith("http") else demo_url.rstrip("/") + src)
                assert response.ok, response.status
                data = response.body()
        finally:
            browser.close()
    edited = Image.open(io.BytesIO(data))
    assert edited.format == "PNG"  # lossless, not Gradio's default WebP
    assert edited.size == (50, 30)  # the edit comes back at the uploaded image's size
    assert not np.array_equal(np.asarray(edited.convert("RGB")), np.asarray(Image.open(source)))
