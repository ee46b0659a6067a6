"""Shared test settings: offline, deterministic, small, one CPU thread per test process."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from insightedit.allocator import pad_heap

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# One intra-op thread unless INSIGHTEDIT_TEST_THREADS says otherwise. On cores shared with other jobs
# OpenMP's threads spin on each other: a tiny UNet's training step took 2.1 s with 2 threads and 0.19 s
# with 1 (2 cores, load 8); on 2 idle cores 1 thread costs at most 2x. Results never depend on it: tests
# compare within one process, or across subprocesses given the same thread count (_training_runs).
TEST_THREADS = int(os.environ.get("INSIGHTEDIT_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))  # what child processes start with


def pytest_configure(config: pytest.Config) -> None:
    """Set the process's intra-op thread count and glibc's heap padding before any test runs."""
    torch.set_num_threads(TEST_THREADS)
    pad_heap()  # as the insightedit command does (insightedit/allocator.py)


def pytest_report_header(config: pytest.Config) -> str:
    """Say how many threads the tests use."""
    return f"insightedit: torch intra-op threads = {torch.get_num_threads()} (INSIGHTEDIT_TEST_THREADS)"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Locally built assets (tiny tokenizers) go to a per-session temporary cache."""
    monkeypatch.setenv("INSIGHTEDIT_CACHE", str(tmp_path_factory.getbasetemp() / "insightedit-cache"))


# ------------------------------------------------------------------------------------- tiny foundations
FOUNDATIONS_ENV = "INSIGHTEDIT_FOUNDATIONS"
REPO = Path(__file__).resolve().parents[1]


# what the micro-foundations are built from: the recipes, their systems, data and exports, and the builder
FOUNDATION_SOURCES = (
    "lightning_configs/tiny/**/*.yaml", "insightedit/models/foundations/*.py", "insightedit/systems/foundation_*.py",
    "insightedit/data/scene*.py", "insightedit/data/foundation_*.py", "insightedit/commands/foundations.py",
    "insightedit/models/text_encoder.py", "insightedit/callbacks/held_out.py", "tests/_foundations.py",
)  # fmt: skip
STALE_FOUNDATIONS_S = 6 * 3600  # other versions' micro-foundations are removed once unused this long


def _foundation_inputs_digest() -> str:
    """A digest of the files the micro-foundations are built from (:data:`FOUNDATION_SOURCES`)."""
    digest = hashlib.sha256()
    for path in sorted({path for pattern in FOUNDATION_SOURCES for path in REPO.glob(pattern)}):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_foundations(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Micro-foundations (tests/_foundations.py) as ``$INSIGHTEDIT_FOUNDATIONS``, which the tiny configs read.

    Built once per change of the package or the tiny configs and kept in pytest's cache (a few minutes
    on a busy machine, none after), under a lock so that concurrent sessions build them once.
    """
    from _foundations import build_micro_foundations
    from filelock import FileLock

    cache = request.config.cache
    base = Path(cache.mkdir("tiny-foundations")) if cache is not None else tmp_path_factory.mktemp("foundations")
    root = base / _foundation_inputs_digest()
    with FileLock(str(base / "build.lock")):
        if not (root / "complete").is_file():
            for old in base.iterdir():  # other versions', unless a session may still use them
                if old.is_dir() and time.time() - old.stat().st_mtime > STALE_FOUNDATIONS_S:
                    shutil.rmtree(old, ignore_errors=True)
            env = {k: v for k, v in os.environ.items() if k not in (FOUNDATIONS_ENV, "INSIGHTEDIT_DEBUG")}
            env.update(OMP_NUM_THREADS=str(TEST_THREADS), PYTHONPATH=str(REPO))
            build_micro_foundations(root, env)
            (root / "complete").write_text("")
    os.utime(root)  # in use
    previous = os.environ.get(FOUNDATIONS_ENV)
    os.environ[FOUNDATIONS_ENV] = str(root)  # child processes (insightedit fit) inherit it
    yield root
    if previous is None:
        os.environ.pop(FOUNDATIONS_ENV, None)
    else:
        os.environ[FOUNDATIONS_ENV] = previous


@functools.cache
def _reads_tiny_configs(module_path: Path) -> bool:
    """Whether a test module runs the zoo's tiny configs (they start from the foundations)."""
    text = module_path.read_text()
    return "_training_runs" in text or ("tiny" in text and "lightning_configs" in text)  # _training_runs: tiny


@pytest.fixture(autouse=True)
def _tiny_configs_start_from_foundations(request: pytest.FixtureRequest) -> None:
    """Tests in modules that run the tiny configs get :func:`tiny_foundations`."""
    if _reads_tiny_configs(Path(str(request.node.path))):
        request.getfixturevalue("tiny_foundations")
