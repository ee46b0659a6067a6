"""Shared test settings: offline, deterministic, small."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Locally built assets (tiny tokenizers) go to a per-session temporary cache."""
    monkeypatch.setenv("INSIGHTEDIT_CACHE", str(tmp_path_factory.getbasetemp() / "insightedit-cache"))
