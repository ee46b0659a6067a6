"""``insightedit demo``: a local Gradio app that edits uploaded images with an exported model folder (any member).

Bound to 127.0.0.1 unless ``--host`` says otherwise; never shared through Gradio's tunnel. Needs the
optional ``demo`` extra (``pip install 'insightedit[demo]'``).
"""

from __future__ import annotations

import os
from typing import Any

from insightedit.commands.edit import add_model_arguments, check_model_arguments, load_model
from insightedit.commands.parsing import CommandParser
from insightedit.errors import UserError
from insightedit.image_reader import DEFAULT_MAX_PIXELS  # light: the pipeline (torch) loads after the arguments

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def edit_upload(
    pipeline: Any,
    image_path: str | None,
    instruction: str,
    scale: float,
    text: float,
    image_g: float,
    steps: float,
    seed: float,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Any:
    """The demo's handler: read the uploaded file with the package's one reader, edit it, return the PIL result.

    Every problem with the upload or the instruction is a :class:`UserError` (shown as one line in the app).
    """
    if image_path is None:
        raise UserError("upload an image first")
    if not instruction or not instruction.strip():
        raise UserError("type an instruction: say what to change")
    from insightedit.pipeline.images import read_image

    image = read_image(image_path, max_pixels=max_pixels)
    result = pipeline(
        image,
        instruction,
        image_scale=scale,
        text_guidance=text,
        image_guidance=image_g,
        num_inference_steps=int(steps),
        seed=int(seed),
    )
    return result.images[0]


def build_demo(pipeline: Any, default_steps: int = 20) -> Any:
    """The Gradio Blocks app around ``pipeline`` (an :class:`EditPipeline`); the λ slider only where it matters."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    default_scale = float(pipeline.generation.unet.image_scale)

    def edit(
        image: str | None, instruction: str, scale: float, text: float, image_g: float, steps: float, seed: float
    ) -> Any:
        try:
            return edit_upload(pipeline, image, instruction, scale, text, image_g, steps, seed)
        except UserError as error:
            raise gr.Error(str(error)) from None

    member = str(getattr(pipeline, "member", "insightedit"))
    with gr.Blocks(title=f"insightedit: {member}") as demo:
        gr.Markdown(f"## insightedit ({member}): instruction-based image editing")
        with gr.Row():
            with gr.Column():
                # the uploaded file itself (no conversion by Gradio): read by the package's one reader
                source = gr.Image(type="filepath", image_mode=None, label="Image", elem_id="source")
                instruction = gr.Textbox(label="Instruction", placeholder="remove the cup", elem_id="instruction")
                scale = gr.Slider(
                    0.0, 2.0, value=default_scale, step=0.05, label="λ (image branch)", elem_id="lambda",
                    visible=bool(getattr(pipeline, "has_image_branch", True)),
                )  # fmt: skip
                text = gr.Slider(1.0, 15.0, value=7.5, step=0.5, label="Text guidance", elem_id="text-guidance")
                image_g = gr.Slider(1.0, 5.0, value=1.5, step=0.1, label="Image guidance", elem_id="image-guidance")
                steps = gr.Slider(1, 100, value=default_steps, step=1, label="Steps", elem_id="steps")
                seed = gr.Slider(0, 2**31 - 1, value=0, step=1, label="Seed", elem_id="seed")
                button = gr.Button("Edit", variant="primary", elem_id="edit-button")
            with gr.Column():
                result = gr.Image(  # PNG, lossless (Gradio's default would be WebP)
                    type="pil", format="png", label="Edited", elem_id="result", interactive=False
                )
        button.click(edit, inputs=[source, instruction, scale, text, image_g, steps, seed], outputs=result)
    return demo


def main(argv: list[str]) -> int:
    """Entry point of ``insightedit demo``."""
    parser = CommandParser(prog="insightedit demo", description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--steps", type=int, default=20, help="the steps slider's starting value")
    args = parser.parse_args(argv)
    check_model_arguments(args)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the demo needs Gradio: pip install 'insightedit[demo]'") from None

    pipeline = load_model(args)
    build_demo(pipeline, default_steps=args.steps).launch(server_name=args.host, server_port=args.port, share=False)
    return 0
