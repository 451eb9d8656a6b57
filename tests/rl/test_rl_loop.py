"""k2m-rl end to end on the recipe's task (tools/rl_recipe.py): its first two iterations (the
whole recipe is `make rl`, a few minutes), a run killed with kill -9 in the middle of an
iteration and resumed (the uninterrupted rewards and losses again), and a reward that raises
(one line naming the prompt)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness.launching import local_command, local_env

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tools"))
import rl_recipe  # noqa: E402

FAULTS = os.path.join(REPO, "tests", "harness", "k2m_rl_faults.py")
ITERS = 2


def _rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _k2m_rl(program: list[str], overrides: list[str], nproc: int, timeout: int = 600):
    args = ["--config", "k2-tiny"] + [x for s in overrides for x in ("--set", s)]
    cmd = local_command(nproc, program[0], program[1:] + args)
    return subprocess.run(cmd, env=local_env(PYTHONPATH=HERE), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("rl") / "recipe")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "rl_recipe.py"),
                           "--out", out, "--rl-iters", str(ITERS), "--skip-export"],
                          env=local_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_the_recipe_starts_and_its_reward_moves(recipe):
    """The format SFT gives a policy that answers in the format (short answers that end) but
    not correctly; two iterations of k2m-rl move the held-out reward."""
    rows = _rows(recipe)
    start = rows[0]
    assert start["step"] == 0 and start["heldout_reward_mean"] < 0.35
    ends = [r for r in rows if "iteration" in r and r["step"]]
    assert [r["iteration"] for r in ends] == [1, 2] and [r["step"] for r in ends] == [2, 4]
    assert all(r["response_tokens"] < 3 for r in ends)
    assert ends[-1]["heldout_reward_mean"] != start["heldout_reward_mean"]
    assert ends[0]["sync_mb"] > 1.0 and ends[0]["sync_moved_mb"] > 0  # DP2 x EP2: two engines


@pytest.fixture(scope="module")
def killed(recipe, tmp_path_factory) -> dict:
    """The recipe's RL run again in another directory, every rank killed with SIGKILL at step 3
    (iteration 2's first minibatch; iteration 1's checkpoint is at step 2), then started again."""
    run = str(tmp_path_factory.mktemp("rl-killed"))
    sets = rl_recipe.rl_config(run, os.path.join(recipe, "data"),
                               os.path.join(recipe, "sft", "checkpoints"), ITERS)
    first = _k2m_rl([FAULTS, "--kill-at-step", "3", "--"], sets, 2)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        before = [json.loads(line) for line in f if line.strip()]
    second = _k2m_rl(["-m", "k2mcore.cli.rl"], sets, 2)
    return {"first": first, "second": second, "before": before, "rows": _rows(run), "run": run}


def test_a_run_killed_mid_iteration_resumes_with_the_same_rewards(recipe, killed):
    """Iteration 1's checkpoint carries the iteration, weight version and prompt position; the
    resumed run samples and scores the same answers (the sampling seeds come from the iteration
    and each prompt) and trains to the same losses as the uninterrupted recipe run."""
    assert killed["first"].returncode != 0
    assert "kill -9 at step 3" in killed["first"].stdout
    # an iteration's rows are written at its end: iteration 2 (steps 3, 4) left none
    assert max(r["step"] for r in killed["before"]) == 2
    assert killed["second"].returncode == 0, killed["second"].stderr[-3000:]
    with open(os.path.join(killed["run"], "checkpoints", "step_00000004", "metadata.json")) as f:
        state = json.load(f)["extra"]["rl_loop"]
    assert state == {"iteration": 2, "version": 2, "prompt_position": 2 * rl_recipe.RL["prompts"],
                     "seed": state["seed"]}
    want, got = _rows(recipe), killed["rows"]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3, 4]
    for a, b in zip(want, got):
        for key in ("reward_mean", "heldout_reward_mean", "dropped_groups", "response_tokens"):
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))
        if "loss" in a:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7), a["step"]


def test_a_raising_reward_stops_with_one_line_naming_the_prompt(recipe, tmp_path):
    sets = rl_recipe.rl_config(str(tmp_path), os.path.join(recipe, "data"),
                               os.path.join(recipe, "sft", "checkpoints"), ITERS)
    sets += ["parallel.ep=1", "rl.reward=loop_rewards:fails_on_a_seven"]
    proc = _k2m_rl(["-m", "k2mcore.cli.rl"], sets, 1)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("k2m-rl: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "reward fails_on_a_seven failed on prompt 'max-" in lines[0]
    assert "ValueError: the judge timed out" in lines[0]
