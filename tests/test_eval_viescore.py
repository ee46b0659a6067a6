"""VIEScore over HTTP against a loopback chat-completions server: parsing, retries, cache, aggregation."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _chat_server import ChatServer, prompt_text
from test_eval_support import photo

from insightedit.evaluation.viescore.cache import ReplyCache
from insightedit.evaluation.viescore.judges import OpenAICompatibleJudge, TransformersVLMJudge
from insightedit.evaluation.viescore.prompts import ReplyParseError, parse_scores
from insightedit.evaluation.viescore.scorer import VIEScoreItem, VIEScorer, VIEScoreResult, aggregate_viescore

Responder = Callable[[str, int], tuple[int, str]]  # (kind "sc"/"pq", request number) -> (status, reply text)


@pytest.fixture
def serve() -> Iterator[Callable[..., ChatServer]]:
    servers: list[ChatServer] = []

    def start(responder: Responder, delay_s: float = 0.0) -> ChatServer:
        def by_kind(body: dict, number: int) -> tuple[int, str]:
            return responder("sc" if "INSTRUCTION:" in prompt_text(body) else "pq", number)

        servers.append(ChatServer(by_kind, delay_s))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _judge(server: ChatServer, **kwargs: object) -> OpenAICompatibleJudge:
    options = dict(timeout_s=5.0, max_retries=2, backoff_s=0.01, max_concurrency=2)
    options.update(kwargs)
    return OpenAICompatibleJudge(server.url, "judge-model", api_key_env="TEST_JUDGE_KEY", **options)  # type: ignore[arg-type]


def _item(name: str = "astronaut") -> VIEScoreItem:
    return VIEScoreItem(photo(name, 32), photo("coffee", 32), "make the mug red")


WELL_FORMED = '{"score": [8, 6], "reasoning": "fine"}'
FENCED = 'Here you go:\n```json\n{"score": [7, 9], "reasoning": "ok"}\n```'
PROSE = 'I think the answer is {"score": [5, 4], "reasoning": "blurry"} as shown.'


def test_parse_scores_forms() -> None:
    assert parse_scores(WELL_FORMED) == [8.0, 6.0]
    assert parse_scores(FENCED) == [7.0, 9.0]
    assert parse_scores(PROSE) == [5.0, 4.0]
    assert parse_scores('{"score": ["3", 2.5]}') == [3.0, 2.5]
    for bad in ("I cannot rate this image.", '{"score": [11, 2]}', '{"score": [1]}', '{"score": [true, 2]}', "{"):
        with pytest.raises(ReplyParseError):
            parse_scores(bad)


def test_well_formed_fenced_and_prose_replies_over_http(serve, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret-123")
    server = serve(lambda kind, n: (200, FENCED if kind == "sc" else PROSE))
    judge = _judge(server)
    result = VIEScorer(judge, ReplyCache(tmp_path / "cache")).score(_item())
    assert result.sc_scores == [7.0, 9.0] and result.pq_scores == [5.0, 4.0]
    assert result.overall == pytest.approx(math.sqrt(7.0 * 4.0))
    assert len(server.requests) == 2 and result.requests_sent == 2
    sc_request = next(r for r in server.requests if "INSTRUCTION:" in r["messages"][0]["content"][-1]["text"])
    images = [part for part in sc_request["messages"][0]["content"] if part["type"] == "image_url"]
    assert len(images) == 2 and images[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert server.headers[0]["Authorization"] == "Bearer sk-secret-123"
    assert "sk-secret" not in repr(judge)


def test_unparseable_reply_is_retried_then_recorded_as_failure(serve, tmp_path: Path) -> None:
    server = serve(lambda kind, n: (200, "The edit looks nice." if kind == "sc" else WELL_FORMED))
    scorer = VIEScorer(_judge(server), ReplyCache(tmp_path / "cache"), parse_retries=2)
    result = scorer.score(_item())
    assert result.sc_scores is None and result.sc is None and result.overall is None
    assert result.sc_error is not None and "unparseable reply after 3 attempts" in result.sc_error
    assert result.pq_scores == [8.0, 6.0]
    assert len(server.requests) == 4  # three SC attempts, one PQ
    retry_prompts = [r["messages"][0]["content"][-1]["text"] for r in server.requests if "INSTRUCTION:" in str(r)]
    assert sum("could not be read" in prompt for prompt in retry_prompts) == 2
    summary = aggregate_viescore([result])
    assert summary["viescore_n_sc_failed"] == 1 and summary["viescore_O/10"] is None


def test_http_errors_are_retried_with_backoff(serve, tmp_path: Path) -> None:
    server = serve(lambda kind, n: (503, "busy") if n == 1 else (200, WELL_FORMED))
    result = VIEScorer(_judge(server, max_concurrency=1), ReplyCache(tmp_path / "c")).score(_item())
    assert result.sc_scores == [8.0, 6.0] and len(server.requests) == 3

    always_down = serve(lambda kind, n: (500, "down"))
    failed = VIEScorer(_judge(always_down, max_retries=1), None).score(_item())
    assert failed.sc_error is not None and "judge error" in failed.sc_error and "HTTP 500" in failed.sc_error
    assert len(always_down.requests) == 4  # two attempts for SC, two for PQ


def test_timeout_is_a_recorded_failure(serve) -> None:
    server = serve(lambda kind, n: (200, WELL_FORMED), delay_s=0.5)
    result = VIEScorer(_judge(server, timeout_s=0.1, max_retries=0), None).score(_item())
    assert result.sc_error is not None and "ReadTimeout" in result.sc_error and result.overall is None


def test_cache_second_run_sends_nothing(serve, tmp_path: Path) -> None:
    replies = iter(["garbage", WELL_FORMED, FENCED, PROSE, WELL_FORMED, FENCED])
    lock = threading.Lock()

    def responder(kind: str, n: int) -> tuple[int, str]:
        with lock:
            return 200, next(replies)

    server = serve(responder)
    items = [_item("astronaut"), _item("chelsea")]
    first = VIEScorer(_judge(server, max_concurrency=1), ReplyCache(tmp_path / "cache")).score_many(items)
    sent = len(server.requests)
    assert sent == 4  # SC twice (garbage, then parsed) + PQ for item 1, SC for item 2; PQ of the same edit is cached
    assert first[0].sc_scores == [8.0, 6.0] and first[1].pq_scores == first[0].pq_scores == [7.0, 9.0]
    second = VIEScorer(_judge(server, max_concurrency=1), ReplyCache(tmp_path / "cache")).score_many(items)
    assert len(server.requests) == sent  # nothing sent the second time
    assert [r.sc_scores for r in second] == [r.sc_scores for r in first]
    assert [r.pq_scores for r in second] == [r.pq_scores for r in first]
    assert sum(r.requests_sent for r in second) == 0


def test_concurrency_is_bounded(serve, tmp_path: Path) -> None:
    server = serve(lambda kind, n: (200, WELL_FORMED), delay_s=0.05)
    items = [_item(name) for name in ("astronaut", "chelsea", "coffee", "rocket", "astronaut", "chelsea")]
    results = VIEScorer(_judge(server, max_concurrency=2), None).score_many(items)
    assert len(server.requests) == 12 and all(r.overall is not None for r in results)
    assert 1 <= server.max_in_flight <= 2


def test_aggregation_is_sqrt_of_min_sc_times_min_pq_over_ten() -> None:
    results = [
        VIEScoreResult(sc_scores=[8, 6], pq_scores=[9, 4]),  # sqrt(6 * 4) = 4.899
        VIEScoreResult(sc_scores=[10, 10], pq_scores=[9, 10]),  # sqrt(10 * 9) = 9.487
        VIEScoreResult(sc_scores=None, pq_scores=[5, 5], sc_error="unparseable"),
    ]
    summary = aggregate_viescore(results)
    assert summary["viescore_O/10"] == pytest.approx((math.sqrt(24) + math.sqrt(90)) / 2 / 10)
    assert summary["viescore_SC"] == pytest.approx((6 + 10) / 2)
    assert summary["viescore_PQ"] == pytest.approx((4 + 9 + 5) / 3)
    assert summary["viescore_n_scored"] == 2 and summary["viescore_n_sc_failed"] == 1


def test_local_vlm_judge_glue_with_a_stand_in_model() -> None:
    """The transformers judge's plumbing (chat template, greedy generate, decode of new tokens only)."""
    import torch

    class Processor:
        def apply_chat_template(self, messages, **kwargs):
            assert kwargs["add_generation_prompt"] and kwargs["return_dict"]
            content = messages[0]["content"]
            types = [part["type"] for part in content]
            assert types in (["image", "image", "text"], ["image", "text"])  # SC: source + edited; PQ: edited

            class Batch(dict):
                def to(self, device):
                    return self

            return Batch(input_ids=torch.tensor([[5, 6, 7]]))

        def batch_decode(self, tokens, skip_special_tokens):
            assert tokens.tolist() == [[9, 9]]
            return [WELL_FORMED]

    class Model:
        def generate(self, input_ids, max_new_tokens, do_sample):
            assert not do_sample
            return torch.cat([input_ids, torch.tensor([[9, 9]])], dim=1)

    judge = TransformersVLMJudge(Model(), Processor(), name="stand-in")
    result = VIEScorer(judge, None).score(_item())
    assert result.sc_scores == [8.0, 6.0] and judge.name == "transformers:stand-in"
