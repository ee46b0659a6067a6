"""API keys never reach a file or the console, even when a server's error body echoes them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from _chat_server import ChatServer
from test_eval_support import plant_reason_edit

from insightedit.cli import main
from insightedit.data.build.oracle import render_photos
from insightedit.evaluation.viescore.judges import JudgeError, OpenAICompatibleJudge
from insightedit.evaluation.viescore.scorer import VIEScorer
from insightedit.redaction import redact, register_secret

ENV_KEY = "sk-envKEY0123456789abcdef"  # the key in the environment variable (sent as Authorization: Bearer)
QUERY_KEY = "qk-QUERYKEY-5f3a9c"  # a key given in the URL (?api-key=), as Azure-style endpoints take it
CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs" / "data_build"


def _unauthorized(body: dict, number: int) -> tuple[int, str]:
    return 401, "invalid api key"


@pytest.fixture
def server():
    chat = ChatServer(_unauthorized, echo_errors=True)
    yield chat
    chat.close()


def _no_key_in(texts: dict[str, str]) -> None:
    for where, text in texts.items():
        assert ENV_KEY not in text and QUERY_KEY not in text, where


def _files(*roots: Path) -> dict[str, str]:
    return {
        str(path): path.read_text(encoding="utf-8", errors="replace")
        for root in roots
        for path in root.rglob("*")
        if path.is_file()
    }


@pytest.mark.parametrize(
    "text, expected",
    [
        ("HTTP 401 from https://h/v1?api-key=abc123&x=1: no", "HTTP 401 from https://h/v1?api-key=***&x=1: no"),
        ("https://h/v1?api_key=a&key=b&token=c&q=1", "https://h/v1?api_key=***&key=***&token=***&q=1"),
        ("you sent Authorization: Bearer abc.def-123", "you sent Authorization: Bearer ***"),
        ("{'Authorization': 'Bearer xyz12345'}", "{'Authorization': 'Bearer ***'}"),
        ('{"api_key": "abc", "token": "def", "monkey": "ok"}', '{"api_key": "***", "token": "***", "monkey": "ok"}'),
        ("key sk-proj-abcdefghij0123 leaked", "key sk-*** leaked"),
        ("https://user:pa55word@host/v1", "https://user:***@host/v1"),
        # ordinary messages stay as they are
        ("unexpected token: '}' at line 1", "unexpected token: '}' at line 1"),
        ("missing key: instruction; monkey=3", "missing key: instruction; monkey=3"),
    ],
)
def test_redact_patterns(text, expected):
    assert redact(text) == expected


def test_a_registered_secret_is_masked_anywhere():
    register_secret("plain-secret-value-42")
    assert redact("the server said plain-secret-value-42!") == "the server said ***!"
    register_secret("abc")  # too short to mask safely: ordinary words would go
    assert redact("abc") == "abc"


def test_judge_error_label_and_repr_hide_both_keys(server, monkeypatch):
    monkeypatch.setenv("REDACT_TEST_KEY", ENV_KEY)
    judge = OpenAICompatibleJudge(
        f"{server.url}?api-key={QUERY_KEY}", "judge-model", api_key_env="REDACT_TEST_KEY", max_retries=0
    )
    with pytest.raises(JudgeError) as caught:
        judge.ask("rate it", [])
    judge.close()
    # the server got both keys and echoed them; the query stayed a query after /chat/completions
    assert server.headers[0]["Authorization"] == f"Bearer {ENV_KEY}"
    assert server.paths == [f"/v1/chat/completions?api-key={QUERY_KEY}"]
    assert str(caught.value) == (
        f"HTTP 401 from {server.url}?api-key=***: "
        '{"error": {"message": "invalid api key; you sent Authorization: Bearer *** to '
        '/v1/chat/completions?api-key=***"}}'
    )
    assert judge.name == f"openai-compatible:{server.url}?api-key=***:judge-model"
    assert VIEScorer(judge).label == f"openai-compatible:{server.url}?api-key=***:judge-model (insightedit-viescore-v1)"
    _no_key_in({"repr": repr(judge)})


def test_evaluate_writes_no_key_to_report_csv_cache_or_console(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REDACT_TEST_KEY", ENV_KEY)
    ids = plant_reason_edit(tmp_path)
    predictions = tmp_path / "pred"
    for folder, record_ids in ids.items():
        (predictions / folder).mkdir(parents=True)
        for record_id in record_ids:
            shutil.copy(tmp_path / "benchmark" / f"{record_id}.png", predictions / f"{record_id}.png")
    out, cache = tmp_path / "out", tmp_path / "cache"
    code = main([
        "evaluate", "--data", str(tmp_path / "benchmark"), "--pred-dir", str(predictions), "--protocol", "reason_edit",
        "--lpips", "none", "--no-clip", "--judge", "openai", "--judge-model", "judge-model",
        "--judge-url", f"{server.url}?api-key={QUERY_KEY}", "--judge-api-key-env", "REDACT_TEST_KEY",
        "--judge-retries", "0", "--judge-concurrency", "1", "--judge-cache", str(cache), "--out", str(out / "r.json"),
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr()
    assert len(server.requests) == 6  # SC and PQ per record, each refused with both keys echoed
    assert all(headers["Authorization"] == f"Bearer {ENV_KEY}" for headers in server.headers)
    report = json.loads((out / "r.json").read_text())
    assert report["judge"] == f"openai-compatible:{server.url}?api-key=***:judge-model (insightedit-viescore-v1)"
    echoed = (
        f"judge error: HTTP 401 from {server.url}?api-key=***: "
        '{"error": {"message": "invalid api key; you sent Authorization: Bearer *** to '
        '/v1/chat/completions?api-key=***"}}'
    )
    assert [row["viescore_error"] for row in report["rows"]] == [f"SC: {echoed}; PQ: {echoed}"] * 3
    _no_key_in({"stdout": printed.out, "stderr": printed.err, **_files(out, cache)})
    assert "api-key=***" in printed.out  # the table's judge label


def test_data_build_writes_no_key_to_failures_summary_or_console(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REDACT_TEST_KEY", ENV_KEY)
    config = yaml.safe_load((CONFIGS / "oracle.yaml").read_text())
    config["steps"]["caption"] = {
        "backend": "openai", "base_url": f"{server.url}?api-key={QUERY_KEY}", "model": "captioner",
        "api_key_env": "REDACT_TEST_KEY", "retries": 0, "concurrency": 1, "parse_retries": 0,
    }  # fmt: skip
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(config))
    photos, out = tmp_path / "photos", tmp_path / "out"
    render_photos(photos, 2, size=32, seed=0)
    code = main(["data", "build", "--config", str(path), "--images", str(photos), "--out", str(out), "--steps", "1"])
    assert code == 1  # the build finished with failed images
    printed = capsys.readouterr()
    assert len(server.requests) == 2 and server.headers[0]["Authorization"] == f"Bearer {ENV_KEY}"
    failures = sorted((out / "failures" / "1_caption").glob("*.json"))
    assert len(failures) == 2
    reason = (
        f"chat error: HTTP 401 from {server.url}?api-key=***: "
        '{"error": {"message": "invalid api key; you sent Authorization: Bearer *** to '
        '/v1/chat/completions?api-key=***"}}'
    )
    assert [json.loads(p.read_text())["reason"] for p in failures] == [reason, reason]
    summary = json.loads((out / "summary.json").read_text())
    assert [failure["reason"] for failure in summary["failures"]] == [reason, reason]
    _no_key_in({"stdout": printed.out, "stderr": printed.err, **_files(out)})
    assert reason in printed.out
