"""Rollouts end to end: k2m-preprocess --rollouts, its one-line refusals, the config's, and
k2m-train's loop on them (2 ranks, MuonClip with QK-Clip) resumed in the middle of a rollout
batch with the uninterrupted losses."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from harness.launching import launch, local_env
from k2mcore.config.loader import load_config
from k2mcore.data.datasets import resolve_path
from k2mcore.errors import ConfigError, DataError
from k2mcore.rl.preprocess import preprocess_rollouts
from k2mcore.rl.rollouts import Rollout, RolloutDataset, write_rollouts

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = "assets:tokenizer/k2-tiny"


def _rollouts(n: int = 16, group: int = 4, vocab: int = 500) -> list[Rollout]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        p, r = 3 + i % 5, 4 + (7 * i) % 19
        out.append(Rollout(prompt=torch.randint(5, vocab, (p,), generator=g).tolist(),
                           response=torch.randint(5, vocab, (r,), generator=g).tolist(),
                           reward=float((i * 7) % 3), group=i // group,
                           logprobs=(-6.0 - torch.rand(r, generator=g)).tolist(),
                           mask=[0 if j == 2 and i % 3 == 0 else 1 for j in range(r)],
                           truncated=i == 6))
    return out


def _preprocess(tmp_path, rollouts, name: str = "r"):
    src = tmp_path / f"{name}.jsonl"
    write_rollouts(str(src), rollouts)
    prefix = str(tmp_path / name)
    stats = preprocess_rollouts([str(src)], prefix, resolve_path(TOKENIZER), progress=False)
    return prefix, stats


def test_preprocess_writes_what_the_trainer_reads(tmp_path):
    data = _rollouts()
    prefix, stats = _preprocess(tmp_path, data)
    assert (stats.rollouts, stats.groups, stats.with_logprobs) == (16, 4, True)
    ds = RolloutDataset(prefix, 32, pad_id=0)
    assert ds.has_logprobs and len(ds) == 16
    assert ds.rewards.tolist() == [r.reward for r in data]
    assert ds.groups.tolist() == [i // 4 for i in range(16)]
    assert ds.truncated.tolist() == [i == 6 for i in range(16)]
    r = data[3]
    row = ds.sample(3)
    ids = r.prompt + r.response
    n, p = len(ids) - 1, len(r.prompt)
    assert row["tokens"][:n].tolist() == ids[:-1] and row["labels"][:n].tolist() == ids[1:]
    # the loss covers the masked-in response tokens only: label j is token j+1
    want = [0] * (p - 1) + r.mask
    assert row["loss_mask"][:n].tolist() == want and row["loss_mask"][n:].sum() == 0
    assert row["rollout_logp"][p - 1:n].tolist() == pytest.approx(r.logprobs)
    assert row["rollout_logp"][:p - 1].sum() == 0


@pytest.mark.parametrize("case,needle", [
    ("logprobs", "logprobs has 3 values but response has"),
    ("mask", "mask has 2 values but response has"),
    ("single", "group 'solo' has one sample"),
    ("reward", "reward must be a finite number"),
    ("mixed", "has no logprobs, unlike the first rollout"),
    ("token", "not a token id in [0, "),
])
def test_bad_rollouts_get_one_line_naming_the_file_and_line(tmp_path, capsys, case, needle):
    data = _rollouts(8)
    line = 5  # the record spoiled (1-based line)
    doc = data[line - 1].to_json()
    if case == "logprobs":
        doc["logprobs"] = doc["logprobs"][:3]
    elif case == "mask":
        doc["mask"] = [1, 1]
    elif case == "reward":
        doc["reward"] = "high"
    elif case == "mixed":
        del doc["logprobs"]
    elif case == "token":
        doc["response"][1] = 10 ** 7
    lines = [json.dumps(r.to_json()) for r in data]
    lines[line - 1] = json.dumps(doc)
    if case == "single":  # groups q..: 4, then a lone one between two groups of 2
        lines = lines[:4] + [json.dumps({**data[4].to_json(), "group": "solo"})] + lines[5:]
        for i in range(5, 8):
            lines[i] = json.dumps({**data[i].to_json(), "group": "last"})
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    args = ["--rollouts", "--input", str(src), "--output-prefix", str(tmp_path / "out"),
            "--tokenizer", resolve_path(TOKENIZER), "--no-progress"]
    if case == "single":  # the installed command, once (a process costs seconds here)
        proc = subprocess.run([sys.executable, "-m", "k2mcore.cli.preprocess", *args],
                              capture_output=True, text=True, env=local_env())
        code, stderr = proc.returncode, proc.stderr
    else:
        from k2mcore.cli.preprocess import main

        code, stderr = main(args), capsys.readouterr().err
    assert code == 1, stderr
    err = stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and f"bad.jsonl:{line}" in err[0], err
    assert not list(tmp_path.glob("out*"))  # nothing left behind


def _cfg(*overrides: str):
    from k2mcore.config.validate import validate

    cfg = load_config("k2-tiny", ["train.eval_interval=0", *overrides])
    validate(cfg)
    return cfg


@pytest.mark.parametrize("overrides,needle", [
    (("rl.loss=gspo",), "rl.loss: set, but data.format is 'text'"),
    (("data.format=rollouts", "data.blend=x", "data.tokenizer=t", "rl.loss=k2"),
     "rl.tau: required with rl.loss=k2"),
    (("data.format=rollouts", "data.blend=x", "data.tokenizer=t", "rl.tau=0.1"),
     "rl.tau: applies to rl.loss=k2 only"),
    (("data.format=rollouts", "data.blend=x", "data.tokenizer=t", "rl.loss=k2", "rl.tau=1",
      "rl.clip_high=0.3"), "rl.clip_high: rl.loss=k2 has no clipping"),
    (("data.format=rollouts", "data.blend=x", "data.tokenizer=t", "rl.temperature=0"),
     "rl.temperature: must be > 0"),
    (("data.format=rollouts", "data.blend=x", "data.tokenizer=t", "data.packing=true"),
     "data.packing: true is not supported with data.format=rollouts"),
    # the loop's keys (k2m-rl)
    (("data.format=rollouts", "data.blend=null"),
     "data.format: 'rollouts' needs data.blend (k2m-preprocess --rollouts output) or "
     "rl.prompts (k2m-rl)"),
    (("data.format=rollouts", "rl.samples=1"), "rl.samples: must be >= 2 (a group needs two"),
    (("data.format=rollouts", "rl.max_new_tokens=0"), "rl.max_new_tokens: must be >= 1, got 0"),
    (("data.format=rollouts", "rl.heldout_interval=-1"),
     "rl.heldout_interval: must be >= 0, got -1"),
    (("data.format=rollouts", "rl.sync_bucket_mb=0"), "rl.sync_bucket_mb: must be > 0"),
    (("data.format=rollouts", "rl.temperature_final=0"), "rl.temperature_final: must be > 0"),
])
def test_bad_rl_settings_get_one_line(overrides, needle):
    with pytest.raises(ConfigError) as err:
        _cfg(*overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_group_across_two_rollout_batches_is_refused_before_training(tmp_path):
    """Groups of 3 in rollout batches of 4 x 2 = 8: the third group spans rollouts 6-8."""
    from k2mcore.data.datasets import check_data

    prefix, _ = _preprocess(tmp_path, _rollouts(18, group=3))
    cfg = _cfg("data.format=rollouts", f"data.blend={prefix}", f"data.tokenizer={TOKENIZER}",
               "train.global_batch_size=4", "rl.minibatches=2", "train.iters=4")
    with pytest.raises(DataError) as err:
        check_data(cfg)
    assert "straddles rollout batches 0 and 1" in str(err.value), err.value
    assert "\n" not in str(err.value)
    cfg = _cfg("data.format=rollouts", f"data.blend={prefix}", f"data.tokenizer={TOKENIZER}",
               "train.global_batch_size=3", "rl.minibatches=2", "train.iters=8")
    with pytest.raises(DataError, match="holds 18 rollouts, but train.iters needs 4 rollout "
                                        "batches"):
        check_data(cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("rl_train")
    prefix, _ = _preprocess(out, _rollouts())
    launch(os.path.join(HERE, "rl_train_worker.py"),
           ["--out", str(out), "--data", prefix, "--tokenizer", TOKENIZER], 2,
           what="rl training", timeout=900)
    with open(out / "rows.json") as f:
        return json.load(f)


def test_resume_in_the_middle_of_a_rollout_batch_continues_the_losses(trained):
    """Stopped at step 3 (the second rollout batch's first minibatch) and resumed: step 4
    reuses the stored old log-probabilities and R2's recorded routes, so its loss, ratios and
    replay share are the uninterrupted run's (recomputed ones, from the weights after step 3,
    would put every ratio at 1 and change no expert)."""
    whole, stopped = trained["whole"], trained["stopped"]
    assert [r["step"] for r in whole] == [1, 2, 3, 4]
    assert [r["step"] for r in stopped] == [1, 2, 3, 4]
    for a, b in zip(whole, stopped):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), (a["step"], a, b)
        assert b["ratio_max"] == pytest.approx(a["ratio_max"], rel=1e-6)
        assert b["replay_changed"] == pytest.approx(a["replay_changed"], abs=1e-12)
    assert whole[3]["ratio_max"] > 1.0 + 1e-4  # off-policy: the stored logprobs mattered
    assert whole[3]["replay_changed"] > 0  # the stepped routers would choose other experts


def test_metrics_of_the_update(trained):
    """The row of every step: reward mean and advantage std of its rollout batch, clip
    fraction, entropy, ratio mean and max, TIS weights' mean, groups dropped; QK-Clip ran."""
    rows = trained["whole"]
    rewards = [float((i * 7) % 3) for i in range(16)]
    for row in rows:
        k = (row["step"] - 1) // 2
        batch = rewards[8 * k:8 * k + 8]
        batch = [-0.5 if 8 * k + i == 6 else r for i, r in enumerate(batch)]
        assert row["reward_mean"] == pytest.approx(sum(rewards[8 * k:8 * k + 8]) / 8)
        for key in ("adv_std", "clip_frac", "entropy", "ratio_mean", "ratio_max", "tis_mean",
                    "dropped_groups", "replay_changed"):
            assert key in row, key
        assert 0 < row["entropy"] < 7.0  # log(1024) = 6.93 bounds a softmax over 1024 ids
        assert 0 < row["tis_mean"] <= 2.0
        assert "clipped_heads" in row  # MuonClip's QK-Clip at threshold 1.0
    assert rows[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)


def _routed(n: int = 16, layers: int = 3, topk: int = 2, top: int = 8) -> list[Rollout]:
    g = torch.Generator().manual_seed(5)
    out = _rollouts(n)
    for r in out:
        r.routes = [[torch.randperm(top, generator=g)[:topk].tolist() for _ in range(layers)]
                    for _ in range(len(r.prompt) + len(r.response) - 1)]
    return out


@pytest.mark.parametrize("case,needle", [
    ("huge", "holds expert id 8 >= model.num_experts=8"),
    ("layers", "routes are for 2 MoE layers, but the model has 3"),
    ("none", "rl.routing_replay: rollout replays the engine's experts, but the rollouts"),
    ("kl", "rl.kl_coef: 0.1 needs the reference policy"),
])
def test_bad_routes_and_replay_settings_are_refused_before_training(tmp_path, case, needle):
    from k2mcore.data.datasets import check_data

    data = {"huge": lambda: _routed(top=9), "layers": lambda: _routed(layers=2),
            "none": _rollouts, "kl": _rollouts}[case]()
    if case == "huge":  # one id of 8 in an otherwise valid file
        data[3].routes[0][1] = [8, 0]
    prefix, _ = _preprocess(tmp_path, data)
    extra = {"none": ["rl.routing_replay=rollout"], "kl": ["rl.kl_coef=0.1"]}.get(case, [])
    cfg = _cfg("data.format=rollouts", f"data.blend={prefix}", f"data.tokenizer={TOKENIZER}",
               "train.global_batch_size=4", "rl.minibatches=2", "train.iters=4", *extra)
    with pytest.raises(DataError) as err:
        check_data(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value), err.value


@pytest.mark.parametrize("case,needle", [
    ("length", "routes has 3 positions but prompt + response[:-1] has"),
    ("dup", "is not a set of 2 distinct expert ids"),
    ("shape", "routes for 2 MoE layers of 2 experts, the first rollout's for 3 of 2"),
])
def test_bad_routes_get_one_line_naming_the_file_and_line(tmp_path, case, needle):
    data = _routed(8)
    if case == "length":
        data[4].routes = data[4].routes[:3]
    elif case == "dup":
        data[4].routes[1][0] = [5, 5]
    else:
        data[4].routes = [pos[:2] for pos in data[4].routes]
    src = tmp_path / "bad.jsonl"
    write_rollouts(str(src), data)
    with pytest.raises(DataError) as err:
        preprocess_rollouts([str(src)], str(tmp_path / "out"), resolve_path(TOKENIZER),
                            progress=False)
    assert needle in str(err.value) and "bad.jsonl:5" in str(err.value), err.value
    assert not list(tmp_path.glob("out*"))


def test_routes_round_trip(tmp_path):
    """Routes stored per input position and layer; padding positions get none (-1)."""
    data = _routed()
    prefix, stats = _preprocess(tmp_path, data)
    assert stats.with_routes
    ds = RolloutDataset(prefix, 32, pad_id=0)
    row = ds.sample(2)
    n = len(data[2].prompt) + len(data[2].response) - 1
    assert row["routes"].shape == (32, 3, 2)
    assert row["routes"][:n].tolist() == data[2].routes
    assert (row["routes"][n:] == -1).all()


def test_k2m_train_refuses_the_loops_prompts_without_rollout_files(tmp_path, capsys):
    """rl.prompts is k2m-rl's: k2m-train on data.format=rollouts still needs rollout files."""
    from k2mcore.cli.train import main

    args = ["--config", "k2-tiny"]
    for item in ("data.format=rollouts", "data.blend=null", f"rl.prompts={tmp_path}/p.jsonl",
                 f"run.dir={tmp_path}/run", "train.eval_interval=0"):
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("k2m-train: error: data.blend: k2m-train trains on rollout files "
                   "(k2m-preprocess --rollouts); k2m-rl generates its rollouts from rl.prompts")
