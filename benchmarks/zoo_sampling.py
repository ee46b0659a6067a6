"""How the sampler's settings trade the edit against the background, for members trained as the zoo trains them.

The zoo (``benchmarks/zoo.py``) scores every member with the ``advancededit`` protocol's sampler: 20 DDIM
steps, text guidance 7.5, image guidance 1.5 (InstructPix2Pix's defaults, which the paper keeps). This
benchmark asks how much of a member's background error is the sampler's and how much the UNet's: it trains
each member exactly as the zoo does (align stage, then stage 3, from the foundations, on one data seed),
then edits the same held-out pairs with every setting of ``--grid`` and scores them with the zoo's own
scorer (PSNR to the target inside the mask at the data's 32 px; PSNR to the source outside it under the
protocol), per task.

The default seed is 2, a *validation* seed: the zoo's comparison uses seeds 0 and 1, so choosing a sampler
here does not select on the numbers it reports.

    HF_HUB_OFFLINE=1 WANDB_MODE=offline python benchmarks/zoo_sampling.py --out benchmarks/results

Writes ``zoo_sampling.md`` and ``zoo_sampling.json`` (command, commit, date) under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402
from provenance import provenance  # noqa: E402
from zoo_stats import TASKS  # noqa: E402

from insightedit.commands.foundations import FOUNDATIONS_ENV, default_root  # noqa: E402
from insightedit.data import AdvancedEditDataModule  # noqa: E402
from insightedit.errors import UserError  # noqa: E402
from insightedit.evaluation.model_test import EditTestRun  # noqa: E402

DEFAULT_GRID = (
    "20:7.5:1.5", "20:5:1.5", "20:3:1.5", "20:2:1.5", "20:1:1.5", "20:3:1", "20:1:1",
    "10:7.5:1.5", "10:2:1.5", "10:1:1", "5:7.5:1.5", "5:2:1.5", "5:1:1", "2:1:1", "1:1:1", "50:7.5:1.5", "50:1:1",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One sampler setting: DDIM steps, text guidance, image guidance."""

    steps: int
    text: float
    image: float

    @classmethod
    def parse(cls, text: str) -> Sampler:
        """``steps:text:image``, e.g. ``20:7.5:1.5``."""
        try:
            steps, text_guidance, image_guidance = text.split(":")
            return cls(int(steps), float(text_guidance), float(image_guidance))
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"a sampler is steps:text:image, e.g. 20:7.5:1.5; got {text!r}") from error

    @property
    def label(self) -> str:
        """``20 steps, 7.5 / 1.5``."""
        return f"{self.steps} steps, {self.text:g} / {self.image:g}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=2, help="data seed (default 2: not one the zoo reports)")
    parser.add_argument("--members", nargs="+", default=["insightedit", "instruct_pix2pix"], choices=list(zoo.MEMBERS))
    parser.add_argument(
        "--grid", nargs="+", type=Sampler.parse, default=[Sampler.parse(s) for s in DEFAULT_GRID],
        help="sampler settings, steps:text:image each",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=zoo.DEFAULT_STEPS, help="stage-3 steps (the zoo's)")
    parser.add_argument("--align-steps", type=int, default=zoo.DEFAULT_ALIGN_STEPS, help="align steps (the zoo's)")
    parser.add_argument("--eval-pairs", type=int, default=zoo.DEFAULT_EVAL_PAIRS)
    parser.add_argument(
        "--foundations",
        type=Path,
        default=None,
        help="default: $INSIGHTEDIT_FOUNDATIONS, else checkpoints/tiny/foundations",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return parser.parse_args(argv)


def train(member: str, root: Path, data: AdvancedEditDataModule, args: argparse.Namespace, work: Path) -> Any:
    """``member`` trained as the zoo trains it (align stage where it has one, then stage 3) on ``args.seed``."""
    zoo_args = zoo.parse_args(
        ["--no-build", "--no-wandb", "--steps", str(args.steps), "--align-steps", str(args.align_steps)]
    )
    evaluation, _ = zoo.test_settings(zoo.read_config(zoo.SHARED), zoo_args)
    settings = zoo.member_settings(member, root, evaluation)
    if args.align_steps > 0:
        aligned = zoo.align(settings, data, zoo_args, args.seed, member, work / f"{member}-align.ckpt")
        if aligned is not None:
            settings = {**settings, "init_from": str(aligned[1])}
    system = zoo.build_system(settings, args.seed)
    zoo.fit(system, data, args.steps, args.seed, member, None, None)
    return system


def sweep(
    system: Any, member: str, batches: list[dict[str, Any]], run: EditTestRun, grid: list[Sampler]
) -> dict[str, Any]:
    """Each setting's per-task scores (the zoo's scorer, one row of ``run`` per setting) and seconds to edit."""
    base = run.settings
    rows: dict[str, Any] = {}
    for sampler in grid:
        test = dataclasses.replace(
            base, num_inference_steps=sampler.steps, text_guidance=sampler.text, image_guidance=sampler.image
        )
        started = time.perf_counter()
        edits = zoo.edit_all(system, batches, test)
        seconds = time.perf_counter() - started
        row = f"{member}, {sampler.label}"
        scores = zoo.score({"templated": run}, row, {"templated": batches}, {"templated": edits})
        rows[sampler.label] = {"sampler": dataclasses.asdict(sampler), "edit_seconds": round(seconds, 1),
                               "scores": scores["templated"]}  # fmt: skip
        groups = scores["templated"]
        print(
            f"[{member}] {sampler.label}: "
            + " | ".join(
                f"{t} in {groups[t]['psnr_in_mask']:.2f} out {groups[t]['psnr']:.2f}" for t in TASKS if t in groups
            ),
            flush=True,
        )
    return rows


def markdown(results: dict[str, Any]) -> str:
    """The results as tables: one per member, a row per sampler setting, in / out per task."""
    lines = [
        f"# The sampler's settings against the background (data seed {results['seed']}, "
        f"{results['eval_pairs']} held-out pairs)",
        "",
        f"`{results['command']}` at `{results['commit']}`, {results['date']}; {results['wall_minutes']:.1f} min. "
        "Each member "
        f"trained as `benchmarks/zoo.py` trains it ({results['align_steps']} align steps where it has an align stage, "
        f"then {results['steps']} of stage 3, from the foundations), then edited the same templated held-out pairs "
        "with each sampler setting (DDIM steps, text guidance / image guidance). *in*: PSNR (dB) to the target "
        "inside the edit mask; *out*: PSNR to the source outside it; identity: the source as the edit.",
        "",
    ]
    identity = results["identity"]
    header = " | ".join(f"{t} in | {t} out" for t in TASKS)
    for member, rows in results["members"].items():
        lines += [f"**{member}**", "", f"| sampler | {header} | all out | s |", "|---|" + "---|" * (2 * len(TASKS) + 2)]
        lines.append(
            "| identity | " + " | ".join(f"{identity[t]['psnr_in_mask']:.2f} | ∞" for t in TASKS) + " | ∞ | – |"
        )
        for label, row in rows.items():
            groups = row["scores"]
            cells = " | ".join(f"{groups[t]['psnr_in_mask']:.2f} | {groups[t]['psnr']:.2f}" for t in TASKS)
            lines.append(f"| {label} | {cells} | {groups['all']['psnr']:.2f} | {row['edit_seconds']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train each member once, sweep the sampler, write the tables."""
    args = parse_args(argv)
    started = time.perf_counter()
    root = args.foundations or default_root()
    os.environ[FOUNDATIONS_ENV] = str(root)
    zoo.ensure_foundations(root, build=False)  # a missing one: one line saying how to build it
    shared = zoo.read_config(zoo.SHARED)
    _, base = zoo.test_settings(shared, zoo.parse_args(["--no-build"]))
    data = AdvancedEditDataModule(**zoo.seed_data_args(shared, args.seed, None))
    data.prepare_data()
    data.setup("fit")
    batches = zoo.held_out(data, args.eval_pairs, 16, 0.0)
    run = EditTestRun(base)  # the scorers (LPIPS among them) load once; every setting is a row of it
    identity_scores = zoo.score({"templated": run}, "identity", {"templated": batches},
                                {"templated": zoo.edit_all(None, batches, base)})  # fmt: skip
    results: dict[str, Any] = {
        **provenance(), "seed": args.seed, "steps": args.steps, "align_steps": args.align_steps,
        "eval_pairs": sum(len(b["task_type"]) for b in batches), "identity": identity_scores["templated"],
        "members": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="insightedit-zoo-sampling-") as work:
        for member in args.members:
            system = train(member, root, data, args, Path(work))
            with torch.no_grad():
                results["members"][member] = sweep(system, member, batches, run, args.grid)
            del system
    results["wall_minutes"] = (time.perf_counter() - started) / 60
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zoo_sampling.md").write_text(markdown(results))
    (args.out / "zoo_sampling.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.out / 'zoo_sampling.md'} in {results['wall_minutes']:.1f} min")
    return results


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
