"""Thread settings for shared cores (insightedit/threads.py): what the CLI and EditPipeline apply, overrides kept."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import insightedit.pipeline
from insightedit import threads
from insightedit.errors import UserError
from insightedit.pipeline import EditPipeline

VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "INSIGHTEDIT_THREADS")
MANY = max(2, threads.default_thread_count())


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch):
    """No thread variable set, torch at its default count (restored after the test)."""
    for name in VARIABLES:
        monkeypatch.setenv(name, "")  # so that teardown restores the variable, whoever set it
        monkeypatch.delenv(name)
    monkeypatch.setattr(threads, "default_thread_count", lambda: MANY)
    before = torch.get_num_threads()
    torch.set_num_threads(MANY)
    yield monkeypatch
    torch.set_num_threads(before)


def child_env(**extra: str) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    return {**environment, **extra}


def run_child(code: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=child_env(**extra), capture_output=True, text=True)


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_prepare_environment_sets_one_thread_passive_waits_and_keeps_what_the_user_set(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch")  # as if torch had not loaded yet (restored after the test)
    env: dict[str, str] = {}
    assert threads.prepare_environment(env) == {"OMP_WAIT_POLICY": "PASSIVE", **ONE_THREAD} == env
    for user in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}):
        env = dict(user)
        assert threads.prepare_environment(env) == ONE_THREAD and env == {**user, **ONE_THREAD}
    env = {"OMP_NUM_THREADS": "2"}
    threads.prepare_environment(env)
    assert env == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}  # the user's count stays
    env = {"INSIGHTEDIT_THREADS": "3"}
    threads.prepare_environment(env)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    env = {"INSIGHTEDIT_THREADS": "off"}
    assert threads.prepare_environment(env) == {} and env == {"INSIGHTEDIT_THREADS": "off"}


def test_nothing_is_set_once_torch_has_loaded():
    assert "torch" in sys.modules
    env: dict[str, str] = {}
    assert threads.prepare_environment(env) == {} and env == {}


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_thread_count_is_a_user_error(value):
    with pytest.raises(UserError, match="INSIGHTEDIT_THREADS"):
        threads.requested_threads({"INSIGHTEDIT_THREADS": value})


def test_cpu_call_uses_one_thread_unless_chosen_and_restores_the_count(clean_env):
    with threads.cpu_call_threads("cpu") as chosen:
        assert chosen == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == MANY
    with threads.cpu_call_threads("cuda") as chosen:  # GPU edits keep the count
        assert chosen is None and torch.get_num_threads() == MANY


@pytest.mark.parametrize(
    ("variables", "count", "inside"),
    [
        ({"OMP_WAIT_POLICY": "PASSIVE"}, MANY, 1),  # waits do not choose a count: one thread
        ({"OMP_NUM_THREADS": str(MANY)}, MANY, MANY),  # the user chose the count
        ({}, MANY + 1, MANY + 1),  # ... with torch.set_num_threads
        ({"INSIGHTEDIT_THREADS": "3"}, MANY, 3),  # ours wins over everything
        ({"INSIGHTEDIT_THREADS": "off"}, MANY, MANY),
    ],
)
def test_cpu_call_respects_the_users_choices(clean_env, variables, count, inside):
    for name, value in variables.items():
        clean_env.setenv(name, value)
    torch.set_num_threads(count)
    with threads.cpu_call_threads("cpu"):
        assert torch.get_num_threads() == inside
    assert torch.get_num_threads() == count


def test_edit_pipeline_calls_run_under_the_settings(clean_env):
    pipe = EditPipeline.__new__(EditPipeline)  # only what __call__ reads before it edits
    pipe.resolution, pipe.device = None, torch.device("cpu")
    seen: list[int] = []
    pipe._edit = lambda *args: seen.append(torch.get_num_threads())  # type: ignore[method-assign]
    pipe(torch.rand(3, 8, 8), "remove the red circle")
    clean_env.setenv("INSIGHTEDIT_THREADS", "2")
    pipe(torch.rand(3, 8, 8), "remove the red circle")
    assert seen == [1, 2] and torch.get_num_threads() == MANY


def test_the_cli_sets_one_thread_and_passive_waits_before_torch_loads():
    code = (
        "import json, os, sys; from insightedit.cli import main; main(['no-such-command']);"
        "loaded = 'torch' in sys.modules; import torch;"
        "print(json.dumps([loaded, os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads()]))"
    )
    loaded, policy, count = json.loads(run_child(code).stdout.splitlines()[-1])
    assert (loaded, policy, count) == (False, "PASSIVE", 1)
    _, policy, count = json.loads(run_child(code, INSIGHTEDIT_THREADS="2").stdout.splitlines()[-1])
    assert (policy, count) == ("PASSIVE", 2)
    _, policy, count = json.loads(run_child(code, OMP_NUM_THREADS="2").stdout.splitlines()[-1])
    assert (policy, count) == ("PASSIVE", 2)  # the user's count stays


@pytest.mark.parametrize(
    ("variables", "policy"), [({"OMP_WAIT_POLICY": "active"}, "active"), ({"INSIGHTEDIT_THREADS": "off"}, "None")]
)
def test_the_cli_keeps_the_users_wait_policy(variables, policy):
    code = "import os; from insightedit.cli import main; main(['no-such']); print(os.environ.get('OMP_WAIT_POLICY'))"
    assert run_child(code, **variables).stdout.split()[-1] == policy


def test_the_cli_names_a_bad_thread_count_in_one_line():
    completed = run_child("from insightedit.cli import main; raise SystemExit(main(['zoo']))", INSIGHTEDIT_THREADS="x")
    assert completed.returncode != 0
    assert completed.stderr.strip().splitlines() == [
        "error: INSIGHTEDIT_THREADS='x': give a positive number of threads or 'off'"
    ]


def test_importing_the_pipeline_before_torch_sets_passive_waits(clean_env):
    clean_env.delitem(sys.modules, "torch")  # as if torch had not loaded yet (restored after the test)
    importlib.reload(insightedit.pipeline)  # runs the package's hook again; its modules stay loaded
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
