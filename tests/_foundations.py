"""Micro-foundations for the tests: the three tiny foundation recipes, two steps each on a few scenes.

The zoo's tiny configs start from the foundations under ``$INSIGHTEDIT_FOUNDATIONS``; the tests that run
them get these (tests/conftest.py) instead of the 20-minute ``insightedit foundations`` build. They are
built by the real command's builder, running the real recipes, so their folders have the real layout.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from insightedit.commands.foundations import FoundationBuilder, JobSettings

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.logger=false",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
]  # fmt: skip


def micro_overrides(root: Path) -> dict[str, list[str]]:
    """Per foundation: two steps, small batches, a few held-out items, data under ``root``."""
    return {
        "clip": [
            *COMMON, "--data.init_args.batch_size=8", "--data.init_args.num_val=8", "--data.init_args.num_workers=0",
        ],
        "mllm": [
            *COMMON, "--data.init_args.batch_size=8", "--data.init_args.num_val=8", "--data.init_args.val_batch_size=8",
            "--data.init_args.num_workers=0", "--model.init_args.align_steps=1", "--model.init_args.max_new_tokens=4",
        ],
        "instruct_pix2pix": [
            *COMMON, "--trainer.limit_val_batches=1", "--data.init_args.batch_size=4",
            "--data.init_args.synthetic={num_images: 16, size: 32, seed: 0}", f"--data.init_args.root={root / 'data'}",
        ],
    }  # fmt: skip


def build_micro_foundations(root: Path, env: dict[str, str]) -> list[str]:
    """Build the micro-foundations into ``root`` (each ``insightedit fit`` in a fresh interpreter); return the log."""
    lines: list[str] = []

    def run(argv: list[str], settings: JobSettings) -> int:
        del settings  # one build at a time (the builder's default), on the suite's thread settings
        command = [sys.executable, "-m", "insightedit", *argv]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        lines.append(done.stdout + done.stderr)
        return done.returncode

    builder = FoundationBuilder(root, REPO / "lightning_configs", extra=micro_overrides(root), runner=run)
    builder.report = lines.append
    try:
        builder.build()
    except Exception as error:
        raise RuntimeError(f"micro-foundations failed: {error}\n" + "\n".join(lines[-2:])) from error
    return lines
