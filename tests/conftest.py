"""Shared test settings: offline, deterministic, small, one CPU thread per test process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
    """Set the process's intra-op thread count before any test runs."""
    torch.set_num_threads(TEST_THREADS)


def pytest_report_header(config: pytest.Config) -> str:
    """Say how many threads the tests use."""
    return f"insightedit: torch intra-op threads = {torch.get_num_threads()} (INSIGHTEDIT_TEST_THREADS)"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Locally built assets (tiny tokenizers) go to a per-session temporary cache."""
    monkeypatch.setenv("INSIGHTEDIT_CACHE", str(tmp_path_factory.getbasetemp() / "insightedit-cache"))
