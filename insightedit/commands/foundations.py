"""``insightedit foundations``: build the tiny twin's pretrained parts in order, each an ordinary fit run, cached.

The full system starts from pretrained parts (CLIP, LLaVA-1.5, InstructPix2Pix); the tiny twin starts from
its foundations, trained on the synthetic world: ``clip`` (a tiny CLIP, contrastive on scene captions),
``mllm`` (a tiny LLaVA whose vision tower is ``clip``'s) and ``instruct_pix2pix`` (the editing UNet, on
``clip``'s text tower). Each is ``insightedit fit --config <recipe>`` into ``<out>/<name>``; a foundation
whose output exists and was built from the same recipe, settings and upstream foundations is skipped.
``--jobs 2`` (the default on two or more cores) builds ``mllm`` and ``instruct_pix2pix`` side by side once
``clip`` is done, one torch thread each; ``clip``, alone, gets both threads.
The root (default ``$INSIGHTEDIT_FOUNDATIONS`` or ``checkpoints/tiny/foundations``) is the one the
zoo's tiny configs read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from insightedit.commands.parsing import CommandParser
from insightedit.errors import UserError

FOUNDATIONS_ENV = "INSIGHTEDIT_FOUNDATIONS"
DEFAULT_ROOT = "checkpoints/tiny/foundations"
STAMP = "foundation_inputs.json"  # in each run folder: what it was built from, its metric and its minutes
OUT = "<out>"  # stands for the root in stamps, so a stamp compares the recipe, not where the root is


@dataclass(frozen=True)
class Foundation:
    """One foundation: its recipe, the file that says it is built, and what it reads from the ones before."""

    name: str
    config: str  # relative to the configs folder
    done: str  # relative to the run folder
    inputs: tuple[tuple[str, str], ...] = ()  # (config key, upstream output relative to the root)
    metric_file: str | None = None  # a JSON file in the run folder with {"metric": {...}}

    def needs(self) -> list[str]:
        """The foundations this one reads (the first component of each input)."""
        return [path.split("/", 1)[0] for _, path in self.inputs]


CLIP_EXPORT = "clip/export"
FOUNDATIONS: tuple[Foundation, ...] = (
    Foundation("clip", "tiny/foundations/clip.yaml", "export/foundation.json", metric_file="export/foundation.json"),
    Foundation(
        "mllm",
        "tiny/foundations/mllm.yaml",
        "export/foundation.json",
        inputs=(("model.init_args.vision_tower", CLIP_EXPORT),),
        metric_file="export/foundation.json",
    ),
    Foundation(
        "instruct_pix2pix",
        "tiny/instruct_pix2pix.yaml",
        "last.ckpt",
        inputs=(("model.init_args.generation.text_encoder", CLIP_EXPORT),),
        metric_file="held_out.json",  # the recipe's insightedit.callbacks.HeldOutMetrics writes it
    ),
)


def default_jobs() -> int:
    """Foundations built side by side by default: 2 (after ``clip`` two runs can go together), 1 on one core."""
    return min(2, os.cpu_count() or 1)


def default_root() -> Path:
    """``$INSIGHTEDIT_FOUNDATIONS`` or ``checkpoints/tiny/foundations``."""
    return Path(os.environ.get(FOUNDATIONS_ENV) or DEFAULT_ROOT)


@dataclass
class Outcome:
    """What happened to one foundation."""

    name: str
    built: bool
    minutes: float = 0.0
    metric: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class JobSettings:
    """How one foundation's run is started.

    Args:
        threads: torch intra-op threads for the run (``INSIGHTEDIT_THREADS``); ``None``: insightedit's default
            (one). A thread count the user set (``INSIGHTEDIT_THREADS`` or ``OMP_NUM_THREADS``) always wins.
        label: prefix of each of the run's output lines (``[mllm] ``) when runs go side by side; ``None``:
            the output is passed through as it comes.
    """

    threads: int | None = None
    label: str | None = None


ALONE = JobSettings()
"""A run on its own: insightedit's default threads, output passed through."""

Runner = Callable[[list[str], JobSettings], int]
"""Runs ``insightedit <argv>`` (``["fit", "--config", ...]``) as ``JobSettings`` say and returns its exit code."""

_OUTPUT_LOCK = threading.Lock()


def _child_environment(settings: JobSettings) -> dict[str, str]:
    env = dict(os.environ)
    user_chose = any(env.get(name, "").strip() for name in ("INSIGHTEDIT_THREADS", "OMP_NUM_THREADS"))
    if settings.threads is not None and not user_chose:
        env["INSIGHTEDIT_THREADS"] = str(settings.threads)
    return env


def subprocess_runner(argv: list[str], settings: JobSettings = ALONE) -> int:
    """``insightedit <argv>`` in a fresh interpreter (its memory is returned when it ends), output shown as it comes.

    With a ``label`` each line of the run's output (stdout and stderr together) is printed with that prefix,
    whole lines at a time, so runs side by side stay readable.
    """
    command = [sys.executable, "-m", "insightedit", *argv]
    env = _child_environment(settings)
    if settings.label is None:
        return subprocess.call(command, env=env)
    prefix = f"[{settings.label}] "
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            with _OUTPUT_LOCK:
                sys.stdout.write(prefix + line)
                sys.stdout.flush()
        return process.wait()


def _read_yaml_settings(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"foundations: cannot read the recipe {path}: {error}") from error
    return data if isinstance(data, dict) else {}


def scaled_steps(config: dict[str, Any], scale: float) -> list[str]:
    """Overrides that scale the recipe's ``max_steps`` by ``scale`` (at least 1) and keep validation inside it."""
    if scale == 1.0:
        return []
    trainer = config.get("trainer") or {}
    steps = max(1, round(int(trainer.get("max_steps", 1)) * scale))
    overrides = [f"--trainer.max_steps={steps}"]
    interval = trainer.get("val_check_interval")
    if isinstance(interval, int) and interval > steps:
        overrides.append(f"--trainer.val_check_interval={steps}")
    return overrides


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _metric(foundation: Foundation, folder: Path) -> dict[str, float]:
    """The held-out metric the run wrote (``{"metric": {...}}`` in its ``metric_file``); empty if none."""
    found = (_read_json(folder / foundation.metric_file) or {}).get("metric") if foundation.metric_file else None
    if not isinstance(found, dict):
        return {}
    return {str(k): float(v) for k, v in found.items() if isinstance(v, int | float)}


def format_metric(metric: dict[str, float]) -> str:
    """``retrieval_top1 0.953`` (several: comma-separated); ``no held-out metric recorded`` when empty."""
    return ", ".join(f"{k} {v:.4g}" for k, v in metric.items()) or "no held-out metric recorded"


@dataclass
class FoundationBuilder:
    """Build :data:`FOUNDATIONS` in order into ``root``, skipping the current ones.

    Args:
        root: where the run folders go (``root/<name>``).
        configs: the folder the recipes are relative to (``lightning_configs``).
        steps_scale: multiplies every recipe's ``max_steps`` (a smoke run: ``0.01``).
        rebuild: build every foundation even when current.
        extra: more ``--key=value`` overrides per foundation name (tests: small data).
        runner: runs one ``insightedit fit`` (:func:`subprocess_runner`).
        report: where progress lines go.
        jobs: foundations built side by side at most (those that do not read each other: after ``clip``,
            ``mllm`` and ``instruct_pix2pix``); 1 builds them one after another.
    """

    root: Path
    configs: Path = Path("lightning_configs")
    steps_scale: float = 1.0
    rebuild: bool = False
    extra: dict[str, list[str]] = field(default_factory=dict)
    runner: Runner = subprocess_runner
    report: Callable[[str], None] = print
    foundations: Sequence[Foundation] = FOUNDATIONS
    jobs: int = 1

    def inputs(self, foundation: Foundation, stamps: dict[str, str]) -> dict[str, Any]:
        """What ``foundation`` is built from: the recipe's text, the overrides, the upstream stamps."""
        recipe = self.configs / foundation.config
        if not recipe.is_file():
            raise UserError(f"foundations: recipe {recipe} not found (run from the repository root, or give --configs)")
        overrides = [f"--{key}={OUT}/{path}" for key, path in foundation.inputs]
        overrides += scaled_steps(_read_yaml_settings(recipe), self.steps_scale)
        overrides += self.extra.get(foundation.name, [])
        upstream = {name: stamps[name] for name in foundation.needs()}
        return {"recipe": _digest(recipe.read_text()), "overrides": overrides, "upstream": upstream}

    def is_current(self, foundation: Foundation, inputs: dict[str, Any]) -> bool:
        """Whether ``foundation``'s output exists and its stamp says it was built from ``inputs``."""
        folder = self.root / foundation.name
        stamp = _read_json(folder / STAMP)
        return (folder / foundation.done).is_file() and stamp is not None and stamp.get("inputs") == inputs

    def command(self, foundation: Foundation, inputs: dict[str, Any]) -> list[str]:
        """The ``insightedit fit`` arguments that build ``foundation`` into ``root/<name>``."""
        overrides = [value.replace(OUT, str(self.root)) for value in inputs["overrides"]]
        folder = self.root / foundation.name
        return [
            "fit", "--config", str(self.configs / foundation.config), f"--trainer.default_root_dir={folder}",
            *overrides, "--overwrite",
        ]  # fmt: skip

    def plan(self) -> list[tuple[Foundation, dict[str, Any]]]:
        """Each foundation with the inputs it is built from (its stamp's), in order."""
        stamps: dict[str, str] = {}
        planned = []
        for foundation in self.foundations:
            inputs = self.inputs(foundation, stamps)
            stamps[foundation.name] = _digest(inputs)
            planned.append((foundation, inputs))
        return planned

    def build(self) -> list[Outcome]:
        """Build or skip each foundation; a failed run is one :class:`UserError` line.

        A foundation starts once the ones it reads are done; up to ``jobs`` runs go side by side, and the
        runs started together share the free slots' threads (one alone on ``jobs=2``: two threads). After a
        failure nothing new starts; the runs under way finish, then the first failure is raised.
        """
        planned = self.plan()
        outcomes: dict[str, Outcome] = {}
        pending: list[tuple[Foundation, dict[str, Any]]] = []
        for foundation, inputs in planned:
            folder = self.root / foundation.name
            if not self.rebuild and self.is_current(foundation, inputs):
                stamp = _read_json(folder / STAMP) or {}
                metric = _metric(foundation, folder)
                self.report(f"{foundation.name}: current, skipped ({folder}; {format_metric(metric)})")
                outcomes[foundation.name] = Outcome(foundation.name, False, float(stamp.get("minutes", 0.0)), metric)
            else:
                pending.append((foundation, inputs))
        jobs = max(1, self.jobs)
        failures: list[UserError] = []
        running: dict[Future[Outcome], str] = {}
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            while pending or running:
                ready = [] if failures else [
                    item for item in pending if all(need in outcomes for need in item[0].needs())
                ]  # fmt: skip
                free = jobs - len(running)
                starting = ready[:free]
                for foundation, inputs in starting:
                    pending.remove((foundation, inputs))
                    settings = JobSettings(
                        threads=max(1, free // len(starting)) if jobs > 1 else None,
                        label=foundation.name if jobs > 1 else None,
                    )
                    running[pool.submit(self._build_one, foundation, inputs, settings)] = foundation.name
                if not running:
                    break  # a failure left the rest unstartable
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    running.pop(future)
                    try:
                        outcome = future.result()
                    except UserError as error:
                        failures.append(error)
                    else:
                        outcomes[outcome.name] = outcome
        if failures:
            raise failures[0]
        return [outcomes[foundation.name] for foundation, _ in planned]

    def _build_one(self, foundation: Foundation, inputs: dict[str, Any], settings: JobSettings) -> Outcome:
        folder = self.root / foundation.name
        argv = self.command(foundation, inputs)
        threads = f" ({settings.threads} thread{'s' if settings.threads != 1 else ''})" if settings.threads else ""
        self.report(f"{foundation.name}: building into {folder}{threads}: insightedit {shlex.join(argv)}")
        (folder / STAMP).unlink(missing_ok=True)  # a half-built foundation is never current
        start = time.perf_counter()
        code = self.runner(argv, settings)
        minutes = (time.perf_counter() - start) / 60
        if code != 0 or not (folder / foundation.done).is_file():
            why = f"exited {code}" if code != 0 else f"wrote no {foundation.done}"
            raise UserError(
                f"foundations: {foundation.name} failed (insightedit fit {why} after {minutes:.1f} min); "
                f"its run folder is {folder}"
            )
        metric = _metric(foundation, folder)
        stamp = {"inputs": inputs, "metric": metric, "minutes": round(minutes, 2), "threads": settings.threads,
                 "date": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
        (folder / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        self.report(f"{foundation.name}: built in {minutes:.1f} min; held-out {format_metric(metric)}")
        return Outcome(foundation.name, True, minutes, metric)


def main(argv: list[str]) -> int:
    """Entry point of ``insightedit foundations``."""
    parser = CommandParser(prog="insightedit foundations", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None,
        help=f"the foundations root (default ${FOUNDATIONS_ENV} or {DEFAULT_ROOT}; the tiny configs read the same)",
    )  # fmt: skip
    parser.add_argument("--rebuild", action="store_true", help="build every foundation again, even when current")
    parser.add_argument(
        "--steps-scale", type=float, default=1.0,
        help="multiply each recipe's max_steps (a smoke run: 0.01); a scaled build is not the default build",
    )  # fmt: skip
    parser.add_argument("--configs", type=Path, default=Path("lightning_configs"), help="the recipes' folder")
    parser.add_argument(
        "--jobs", type=int, default=default_jobs(),
        help="foundations built side by side at most (default: 2, or 1 on one core); a run alone gets the threads",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.steps_scale <= 0:
        raise UserError(f"insightedit foundations: --steps-scale must be > 0, got {args.steps_scale}")
    if args.jobs < 1:
        raise UserError(f"insightedit foundations: --jobs must be >= 1, got {args.jobs}")
    builder = FoundationBuilder(
        args.out or default_root(), args.configs, args.steps_scale, args.rebuild, runner=subprocess_runner,
        jobs=args.jobs,
    )  # fmt: skip
    start = time.perf_counter()
    outcomes = builder.build()
    built = [o.name for o in outcomes if o.built]
    total = (time.perf_counter() - start) / 60
    print(f"foundations in {builder.root}: {', '.join(built) or 'none'} built, {total:.1f} min")
    return 0
