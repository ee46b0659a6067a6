"""``insightedit data``: make (``synth``, ``build``), validate (``check``), shard (``optimize``) AdvancedEdit data."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from insightedit.commands.parsing import CommandParser
from insightedit.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="insightedit data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)

    synth = commands.add_parser("synth", help="render a synthetic AdvancedEdit dataset")
    synth.add_argument("--out", required=True, type=Path, help="output folder (created; must be empty)")
    synth.add_argument("--num-images", type=int, default=2000, help="source images (scenes)")
    synth.add_argument("--size", type=int, default=64, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--max-objects", type=int, default=3, help="objects per scene, at most")
    synth.add_argument(
        "--photos", action="store_true",
        help="only source photos with scene sidecars ({id}.scene.json): input of 'data build' with oracle backends",
    )  # fmt: skip

    build = commands.add_parser("build", help="build AdvancedEdit-style data from photos (5 steps, resumable)")
    build.add_argument("--config", required=True, type=Path, help="build config yaml (lightning_configs/data_build/)")
    build.add_argument("--images", required=True, type=Path, help="folder of source images (id = file name stem)")
    build.add_argument("--out", required=True, type=Path, help="output folder (created; a rerun resumes it)")
    build.add_argument("--steps", default="1-5", help="steps to run, e.g. 1-5, 1-3 or 4,5 (default 1-5)")
    build.add_argument("--retry-failed", action="store_true", help="retry (image, step) pairs that failed before")

    check = commands.add_parser(
        "check", help="validate a dataset and print a summary (exit 1 when records are bad or were cut at load)"
    )
    check.add_argument("root", type=Path, help="AdvancedEdit folder, pipeline root or manifest.jsonl")
    check.add_argument("--image-root", type=Path, help="where blank source paths resolve")
    check.add_argument("--target-root", type=Path, help="where blank target paths resolve")
    check.add_argument("--quick", action="store_true", help="read image headers only (no full decode)")
    check.add_argument("--manifest", type=Path, help="also write the usable records as a JSONL manifest")
    check.add_argument("--max-listed", type=int, default=20, help="bad records to list")

    opt = commands.add_parser("optimize", help="write litdata shards per split for streaming")
    opt.add_argument("root", type=Path)
    opt.add_argument("--out", required=True, type=Path)
    opt.add_argument("--val-fraction", type=float, default=0.05)
    opt.add_argument("--test-fraction", type=float, default=0.0)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--store-size", type=int, default=512, help="short side kept in the shards (0: as is)")
    opt.add_argument("--num-workers", type=int, default=1)
    opt.add_argument("--chunk-bytes", default="64MB")
    opt.add_argument("--max-bad-fraction", type=float, default=0.05)
    return parser


def _synth(args: argparse.Namespace) -> int:
    from insightedit.data.synthetic import SynthConfig, synthesize

    if args.photos:
        from insightedit.data.build.oracle import render_photos

        if args.out.exists() and any(args.out.iterdir()):
            raise UserError(f"{args.out} is not empty")
        if args.num_images < 1 or args.size < 16:
            raise UserError("synthetic photos need --num-images >= 1 and --size >= 16")
        photos = render_photos(args.out, args.num_images, args.size, args.seed, args.max_objects)
        print(f"wrote {len(photos)} photos with scene sidecars to {args.out}")
        return 0
    try:
        summary = synthesize(args.out, SynthConfig(args.num_images, args.size, args.seed, args.max_objects))
    except (FileExistsError, ValueError) as error:
        raise UserError(str(error)) from None
    records, seconds = summary["records"], summary["seconds"]
    print(f"wrote {records} records of {args.num_images} images to {args.out} in {seconds} s")
    return 0


def _build(args: argparse.Namespace) -> int:
    from insightedit.data.build.config import load_config, parse_steps
    from insightedit.data.build.runner import build_dataset
    from insightedit.data.build.summary import format_summary

    config = load_config(args.config)
    steps = parse_steps(args.steps)
    if not args.images.is_dir():
        raise UserError(f"images folder {args.images} does not exist")
    summary = build_dataset(config, args.images, args.out, steps, retry_failed=args.retry_failed)
    if summary is None:  # not global rank 0: rank 0 reports
        return 0
    print(format_summary(summary, str(args.out)))
    return 1 if summary["failures"] else 0


def _check(args: argparse.Namespace) -> int:
    from insightedit.data.checking import check_dataset
    from insightedit.data.records import write_manifest

    if not args.root.exists():
        raise UserError(f"dataset root {args.root} does not exist")
    report = check_dataset(args.root, full=not args.quick, image_root=args.image_root, target_root=args.target_root)
    print(report.summary(args.max_listed))
    if args.manifest:
        write_manifest(report.good, args.manifest)
        print(f"manifest: {args.manifest} ({len(report.good)} records)")
    return 1 if report.bad or report.warnings else 0


def _optimize(args: argparse.Namespace) -> int:
    from insightedit.data.streaming import optimize_dataset

    if not args.root.exists():
        raise UserError(f"dataset root {args.root} does not exist")
    start = time.perf_counter()
    result = optimize_dataset(
        args.root, args.out, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
        store_size=args.store_size or None, num_workers=args.num_workers, chunk_bytes=args.chunk_bytes,
    )  # fmt: skip
    print(f"wrote {json.dumps(result['written'])} items to {args.out} in {time.perf_counter() - start:.1f} s")
    bad, total = result["bad"], result["total"]
    if bad:
        print(f"skipped {len(bad)} bad records (listed in {args.out / 'bad'}):")
        for line in bad[:20]:
            print(f"  {line}")
    if total and len(bad) / total > args.max_bad_fraction:
        raise UserError(f"{len(bad)} of {total} records are bad (> max_bad_fraction {args.max_bad_fraction})", 1)
    return 0


def main(argv: list[str]) -> int:
    """Run ``insightedit data synth|build|check|optimize ...``; exit code 0 ok, 1 bad data, 2 usage error."""
    try:
        args = _parser().parse_args(argv)
        commands = {"synth": _synth, "build": _build, "check": _check, "optimize": _optimize}
        return commands[args.command](args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
