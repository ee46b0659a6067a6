"""``insightedit evaluate``: score a folder of edited images from any system with a named protocol.

Predictions are named ``<record id>.png`` under ``--pred-dir`` (Reason-Edit ids are
``<subset folder>/<source stem>``); missing and unexpected files are listed in the report, never dropped
silently; a prediction or source image the package's reader refuses (truncated, empty, not an image, over
the pixel limit) is listed under ``skipped`` with the reader's one-line reason. Prints a table and writes
JSON (``--out``) and CSV (same name, ``.csv``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import cast

from insightedit.commands.parsing import CommandParser
from insightedit.errors import UserError
from insightedit.evaluation.clip_score import DEFAULT_CLIP_MODEL
from insightedit.evaluation.lpips import LPIPS_NETS
from insightedit.evaluation.metrics import SSIM_IMPLEMENTATIONS
from insightedit.evaluation.protocols import PROTOCOLS
from insightedit.evaluation.report import format_table, write_csv, write_json
from insightedit.evaluation.runner import EvalOptions, evaluate
from insightedit.evaluation.viescore.cache import ReplyCache
from insightedit.evaluation.viescore.judges import Judge, OpenAICompatibleJudge, TransformersVLMJudge
from insightedit.evaluation.viescore.scorer import VIEScorer


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``insightedit evaluate``."""
    parser = CommandParser(prog="insightedit evaluate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", required=True, type=Path, help="benchmark root (Reason-Edit folder or AdvancedEdit data)"
    )
    parser.add_argument("--pred-dir", required=True, type=Path, help="folder of edited images, <record id>.png")
    parser.add_argument(
        "--protocol", required=True, choices=sorted(PROTOCOLS), help="named protocol (docs/evaluation.md)"
    )
    parser.add_argument(
        "--pred-layout",
        default="ids",
        choices=["ids", "smartedit"],
        help="ids: <id>.png; smartedit: SmartEdit's LeftRight_metrics_1/... folders (reason_edit)",
    )
    parser.add_argument("--resolution", type=int, default=None, help="override the protocol's square resolution")
    parser.add_argument(
        "--ssim", choices=sorted(SSIM_IMPLEMENTATIONS), default=None, help="override the SSIM implementation"
    )
    parser.add_argument(
        "--lpips",
        choices=["lpips", "stlpips", "none"],
        default="lpips",
        help="lpips: torchmetrics LPIPS v0.1 with a local backbone file; stlpips: shift-tolerant "
        "LPIPS from stlpips-pytorch (NOT the paper's LPIPS); none: skip",
    )
    parser.add_argument(
        "--lpips-net", choices=LPIPS_NETS, default=None, help="LPIPS backbone (protocol default: squeeze)"
    )
    parser.add_argument(
        "--lpips-weights",
        type=Path,
        default=None,
        help="torchvision backbone checkpoint, e.g. squeezenet1_1-b8a52dc0.pth",
    )
    parser.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help="CLIP folder or hub id (default %(default)s)")
    parser.add_argument("--no-clip", action="store_true", help="skip CLIPScore")
    parser.add_argument(
        "--judge",
        choices=["none", "openai", "local"],
        default="none",
        help="VIEScore judge: an OpenAI-compatible endpoint or a local transformers VLM",
    )
    parser.add_argument("--judge-model", default=None, help="model name at the endpoint, or local VLM folder / hub id")
    parser.add_argument("--judge-url", default="https://api.openai.com/v1", help="base URL of the chat endpoint")
    parser.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    parser.add_argument("--judge-concurrency", type=int, default=4, help="concurrent judge requests at most")
    parser.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request")
    parser.add_argument("--judge-retries", type=int, default=4, help="retries of failed requests (with backoff)")
    parser.add_argument("--judge-cache", type=Path, default=Path(".cache/viescore"), help="reply cache folder")
    parser.add_argument("--device", default="cpu", help="torch device for LPIPS, CLIP and a local judge")
    parser.add_argument("--out", type=Path, default=Path("report.json"), help="JSON report (CSV beside it)")
    return parser


def build_judge(args: argparse.Namespace) -> Judge | None:
    """The judge chosen on the command line, or ``None``."""
    if args.judge == "none":
        return None
    if not args.judge_model:
        raise UserError("--judge needs --judge-model (the endpoint's model name or the VLM folder)")
    if args.judge == "openai":
        return OpenAICompatibleJudge(
            args.judge_url,
            args.judge_model,
            api_key_env=args.judge_api_key_env,
            timeout_s=args.judge_timeout,
            max_retries=args.judge_retries,
            max_concurrency=args.judge_concurrency,
        )
    return TransformersVLMJudge.from_pretrained(args.judge_model, device=args.device)


def main(argv: list[str]) -> int:
    """Run ``insightedit evaluate`` with ``argv``; return the exit code."""
    args = build_parser().parse_args(argv)
    judge = build_judge(args)
    vie = VIEScorer(judge, ReplyCache(args.judge_cache)) if judge is not None else None
    options = EvalOptions(
        protocol=args.protocol,
        resolution=args.resolution,
        ssim=args.ssim,
        lpips=args.lpips,
        lpips_net=args.lpips_net,
        lpips_weights=args.lpips_weights,
        clip_model=None if args.no_clip else args.clip_model,
        device=args.device,
    )
    report = evaluate(args.data, args.pred_dir, options, vie=vie, layout=args.pred_layout)
    print(format_table(report))
    for title, key in (("missing predictions", "missing"), ("unexpected files", "unexpected")):
        names = cast(list[str], report[key])
        if names:
            shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
            print(f"{title} ({len(names)}): {shown}")
    skipped = cast(dict[str, str], report["skipped"])
    if skipped:
        print(f"skipped ({len(skipped)}), not scored:")
        for record_id, reason in list(skipped.items())[:20]:
            print(f"  {record_id}: {reason}")
        if len(skipped) > 20:
            print(f"  ... and {len(skipped) - 20} more (all in {args.out})")
    csv_path = args.out.with_suffix(".csv")
    header = {
        key: report[key] for key in ("protocol_name", "resolution", "lpips", "clip_model", "judge", "psnr_cap_db")
    }
    write_json(report, args.out)
    write_csv(report["rows"], csv_path, header)  # type: ignore[arg-type]
    print(f"wrote {args.out} and {csv_path}")
    return 0
