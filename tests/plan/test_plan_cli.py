"""k2m-plan's command line: the JSON contract, the 1T preset in seconds, Megatron-Bridge's public
Kimi-K2 recipes, --search, warnings, and the one-line errors `k2m-train --check` gives."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from k2mcore.cli import plan as cli
from k2mcore.cli import train as train_cli

STAGE_KEYS = {"pp_rank", "rank", "params", "param_bytes", "grad_bytes", "optimizer_bytes",
              "activation_bytes", "total_bytes"}
GIB = 2**30

# Megatron-Bridge's recipes (NVIDIA-NeMo/Megatron-Bridge @067f987, src/megatron/bridge/
# recipes/kimi/h100/kimi_k2.py kimi_k2_pretrain_512gpu_h100_bf16_config and perf_recipes/kimi/
# h100/kimi_k2.py): layouts, micro-batch 1, sequence 4096, their global batches and recompute
BRIDGE_512 = ["parallel.tp=2", "parallel.sp=true", "parallel.pp=16", "parallel.vpp=null",
              "parallel.ep=32", "parallel.etp=1",
              "parallel.pipeline_layout=Etttt|(tttt|)*14tL",  # _get_kimi_k2_pipeline_layout(16, 1)
              "train.global_batch_size=4096", "train.micro_batch_size=1",
              "train.seq_length=4096", "train.recompute=selective",
              "train.recompute_modules=core_attn"]  # recompute_modules None: megatron's core_attn
BRIDGE_1024 = ["parallel.tp=8", "parallel.sp=true", "parallel.pp=16", "parallel.vpp=2",
               "parallel.ep=64", "parallel.etp=1", "parallel.pipeline_layout=Et|(tt|)*30L",
               "train.global_batch_size=8192", "train.micro_batch_size=1",
               "train.seq_length=4096", "train.recompute=selective",
               "train.recompute_modules=mla_up_proj,mlp"]


def _json(capsys, argv: list[str]) -> tuple[int, dict]:
    code = cli.main(argv + ["--json"])
    return code, json.loads(capsys.readouterr().out)


def test_json_shape_and_the_kimi_k2_preset(capsys):
    start = time.perf_counter()
    code, out = _json(capsys, ["--config", "kimi-k2", "--world-size", "256"])
    assert time.perf_counter() - start < 10  # seconds for the 1T preset, no process group
    assert set(out["stages"][0]) == STAGE_KEYS
    assert [s["pp_rank"] for s in out["stages"]] == list(range(16))
    assert set(out["comm_bytes_per_step"]) == {"tp", "ep", "pp", "dp", "cp", "optimizer"}
    assert isinstance(out["fits"], bool)
    heavy = max(out["stages"], key=lambda s: s["params"])
    assert heavy["params"] == 4819582976
    assert round((heavy["param_bytes"] + heavy["grad_bytes"]) / 1e9, 1) == 28.9
    assert all(s["total_bytes"] == s["param_bytes"] + s["grad_bytes"] + s["optimizer_bytes"]
               + s["activation_bytes"] for s in out["stages"])
    assert any("not sharded (expert-DP = 1)" in w for w in out["warnings"])
    # without activation offloading (the K2 report offloads them to host memory) the preset
    # does not fit an 80 GiB GPU at 1024 micro-batches in flight; the plan says which term
    assert code == 1 and not out["fits"]
    assert any(w.startswith("does not fit: pp rank 1") for w in out["warnings"])
    assert out["comm_bytes_per_step"]["tp"] == 0  # TP = 1
    assert out["comm_bytes_per_step"]["ep"] > out["comm_bytes_per_step"]["dp"] > 0
    # the same rank in bus bytes: DP's all-gather moves (d-1)/d of the buffer, not its shard
    bus = out["comm_bus_bytes_per_step"]
    assert set(bus) == set(out["comm_bytes_per_step"])
    assert bus["dp"] > out["comm_bytes_per_step"]["dp"] and bus["ep"] > 0


def test_expert_state_warning_names_the_bytes(capsys):
    _, out = _json(capsys, ["--config", "kimi-k2", "--world-size", "256"])
    warning = next(w for w in out["warnings"] if "expert-DP = 1" in w)
    assert warning.startswith("optimizer state of experts is not sharded (expert-DP = 1): 33.")
    assert warning.endswith("GB per rank with MuonClip")
    # at 512 ranks expert-DP is 2: the warning goes away
    _, out = _json(capsys, ["--config", "kimi-k2", "--world-size", "512"])
    assert not any("expert-DP = 1" in w for w in out["warnings"])


def test_megatron_bridge_1024_gpu_recipe_fits_80_gib(capsys):
    code, out = _json(capsys, ["--config", "kimi-k2", "--world-size", "1024",
                               "--gpu-mem-gb", "80"] + [f"--set={o}" for o in BRIDGE_1024])
    assert code == 0 and out["fits"], out["warnings"]
    assert out["peak_bytes"] < 0.6 * 80 * GIB
    assert out["layout"]["expert_dp"] == 1  # experts' optimizer state unsharded


def test_megatron_bridge_512_gpu_recipe_breaks_on_activations(capsys):
    """TP2 x PP16 without virtual stages, recomputing only core attention: 1F1B keeps up to 16
    micro-batches of 4 MoE layers in flight on the first stages, whose MoE activations (the
    dispatched tokens, SwiGLU) are not recomputed. The plan names the term and the excess."""
    code, out = _json(capsys, ["--config", "kimi-k2", "--world-size", "512",
                               "--gpu-mem-gb", "80"] + [f"--set={o}" for o in BRIDGE_512])
    assert code == 1 and not out["fits"]
    (line,) = [w for w in out["warnings"] if w.startswith("does not fit")]
    assert "largest term: activations" in line
    worst = max(out["stages"], key=lambda s: s["total_bytes"])
    state = worst["param_bytes"] + worst["grad_bytes"] + worst["optimizer_bytes"]
    assert state < 0.5 * out["budget_bytes"] < worst["activation_bytes"]  # state alone fits
    over = (worst["total_bytes"] - out["budget_bytes"]) / GIB
    assert f"{over:.1f} GiB over" in line


def test_search_ranks_fitting_layouts(capsys):
    code = cli.main(["--config", "moonlight-16b-a3b", "--world-size", "8", "--search",
                     "--top", "5", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and 1 <= len(out["plans"]) <= 5 and out["considered"] > len(out["plans"])
    times = [p["step_time_s"]["total"] for p in out["plans"]]
    assert times == sorted(times)
    assert all(p["fits"] and p["world_size"] == 8 for p in out["plans"])
    cli.main(["--config", "moonlight-16b-a3b", "--world-size", "8", "--search", "--top", "3"])
    text = capsys.readouterr().out
    assert text.startswith("search: moonlight-16b-a3b on 8 GPUs") and " 1 " in text


def test_text_report(capsys):
    assert cli.main(["--config", "k2-tiny", "--world-size", "4", "--set", "parallel.ep=2"]) == 0
    text = capsys.readouterr().out
    for part in ("plan: k2-tiny on 4 GPUs", "memory per GPU", "communication per step",
                 "ideal step time", "assumptions:", "FITS"):
        assert part in text


@pytest.mark.parametrize("argv,message", [
    (["--world-size", "3", "--set", "parallel.tp=2", "--set", "parallel.sp=true"],
     "world size 3 is not divisible by parallel.tp*pp*cp = 2*1*1 = 2"),
    (["--world-size", "2", "--set", "parallel.bogus=1"], None),
    (["--world-size", "2", "--set", "parallel.ep=3"], None),
])
def test_bad_input_same_one_line_errors_as_check(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert train_cli.main(["--check"] + argv) == 2
    check = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.removeprefix("k2m-plan: error: ") == check.removeprefix("k2m-train: error: ")
    if message:
        assert message in err


@pytest.mark.parametrize("argv,message", [
    (["--world-size", "2", "--gpu-mem-gb", "0"], "--gpu-mem-gb must be > 0, got 0"),
    (["--world-size", "2", "--gpu-mem-gb", "-8"], "--gpu-mem-gb must be > 0, got -8"),
    (["--world-size", "0"], "--world-size must be > 0, got 0"),
    (["--world-size", "2", "--headroom", "1.5"], "--headroom must be in [0, 1), got 1.5"),
])
def test_bad_numbers(capsys, argv, message):
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"k2m-plan: error: {message}"


def test_console_script_imports_no_torch():
    code = ("import sys; from k2mcore.cli.plan import main; main(['--world-size', '2', "
            "'--json']); assert not [m for m in sys.modules if m.startswith(('torch', "
            "'megatron'))], 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["fits"] is True


def test_cp_sweep_names_the_smallest_cp_that_fits(capsys):
    """kimi-k2 at 32,768 tokens, its preset's other sizes: CP 1 to 16 (the world grows with
    cp); state shrinks with the ZeRO-1 shards over DP x CP, activations by cp, and CP8 is the
    first to fit 80 GiB. With --gpu-mem-gb 40 none does, and the line names the term."""
    argv = ["--config", "kimi-k2", "--world-size", "256", "--set", "train.seq_length=32768",
            "--cp-sweep"]
    code = cli.main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line.split() for line in out.splitlines() if line.strip()[:2].strip().isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 4, 8, 16]
    assert [int(r[1]) for r in rows] == [256, 512, 1024, 2048, 4096]
    acts = [float(r[4]) for r in rows]
    assert all(a > 1.9 * b for a, b in zip(acts, acts[1:]))  # tokens / cp (and the latent)
    assert [r[-1] for r in rows] == ["no", "no", "no", "yes", "yes"]
    assert "smallest CP that fits: 8" in out


def test_cp_sweep_names_the_term_that_stops_it():
    """The same sweep on 40 GiB GPUs (re-budgeted, not re-planned): none fits, and the line names
    the activations on top of the model state."""
    import dataclasses

    from k2mcore.config.loader import load_config
    from k2mcore.plan import PlanOptions, report
    from k2mcore.plan.planner import cp_sweep

    cfg = load_config("kimi-k2", ["train.seq_length=32768"])
    rows = cp_sweep(cfg, 256, PlanOptions(), degrees=(8, 16))
    small = dataclasses.replace(PlanOptions(), gpu_mem_gib=40)
    for r in rows:
        r.plan.options = small
    text = report.cp_sweep_table(cfg, small, rows)
    assert not any(r.plan.fits for r in rows)
    assert "no CP up to 16 fits: activations" in text and "36.0 GiB budget" in text
