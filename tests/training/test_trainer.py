"""k2m-train end to end, through its command line: parity across layouts, resume (also under
another layout), SIGTERM, NaN steps, metrics and the plot. The project's Slurm script on a real
cluster, with a node's processes killed: test_slurm.py."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from harness.launching import K2M_TRAIN_FAULTS, local_command, local_env
from k2mcore import checkpoint as ck

BIN = os.path.dirname(sys.executable)
K2M_TRAIN = os.path.join(BIN, "k2m-train")
COMMON = ["--config", "k2-tiny", "--set", "train.global_batch_size=4", "--set",
          "train.seq_length=32", "--set", "optimizer.name=adamw", "--set", "optimizer.lr=2e-3",
          "--set", "optimizer.warmup_iters=2", "--set", "optimizer.decay_iters=10",
          "--set", "train.seed=77", "--set", "train.eval_interval=5", "--set", "train.eval_iters=1",
          "--set", "logging.tensorboard=true", "--set", "model.measure_max_attn_logit=true",
          # overlapped DP communication (the default on GPUs, off on CPU), with buckets small
          # enough that the first stage's first chunk has several
          "--set", "train.overlap_grad_reduce=true", "--set", "train.overlap_param_gather=true",
          "--set", "train.ddp_bucket_size=20000"]
LAYOUTS = {
    "dp2-zero1": (2, []),
    # ZeRO-1 over DP x CP without overlap; CP ranks read the same samples and split each
    # sequence (blockwise attention, 16-token key blocks)
    "cp2-zero1-no-overlap": (2, ["parallel.cp=2", "model.attention_block_size=16",
                                 "train.overlap_grad_reduce=false",
                                 "train.overlap_param_gather=false"]),
    "pp2-vpp2": (2, ["parallel.pp=2", "parallel.vpp=2"]),
    "tp2-ep2": (2, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=1"]),
    # experts over the TP ranks (etp 1): TP, PP and EP on 4 ranks; the 8-rank TP2 x PP2 x EP2 x
    # DP2 layout is held to 1 rank by the parity launches (tests/parity)
    "tp2-pp2-ep2": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "parallel.etp=1",
                        "parallel.sp=true"]),
    # activation recompute changes memory, not numbers
    "full-recompute": (1, ["train.recompute=full"]),
    "tp2-sp-selective-recompute": (2, ["parallel.tp=2", "parallel.sp=true",
                                       "train.recompute=selective"]),
}


def _cmd(nproc: int, sets: list[str], run_dir: str, iters: int,
         nan_loss_steps: str = "", stall_async_save_from: int = 0) -> list[str]:
    args = [*COMMON, "--set", f"train.iters={iters}", "--set", f"run.dir={run_dir}"]
    for s in sets:
        args += ["--set", s]
    if nan_loss_steps or stall_async_save_from:  # k2m-train behind a fault plan
        faults = (["--nan-loss-steps", nan_loss_steps] if nan_loss_steps else []) + (
            ["--stall-async-save-from", str(stall_async_save_from)] if stall_async_save_from
            else [])
        return local_command(nproc, K2M_TRAIN_FAULTS, [*faults, "--", *args])
    return local_command(nproc, K2M_TRAIN, args)


_env = local_env


def _run(nproc, sets, run_dir, iters, *, expect=0, nan_loss_steps="", **env):
    proc = subprocess.run(_cmd(nproc, sets, run_dir, iters, nan_loss_steps), env=_env(**env),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stderr[-3000:] + proc.stdout[-2000:]
    return proc


def _losses(run_dir: str) -> dict[int, float]:
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if l.strip()]
    return {r["step"]: r["loss"] for r in rows}


def _rows(run_dir: str) -> list[dict]:
    return [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if l.strip()]


def _close(a: dict, b: dict, steps, rtol: float) -> float:
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in steps)
    assert worst <= rtol, (worst, {s: (a[s], b[s]) for s in steps})
    return worst


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1 rank, 6 uninterrupted steps: the losses every other run is held to."""
    run = str(tmp_path_factory.mktemp("ref"))
    _run(1, [], run, 6)
    return run


def test_metrics_tensorboard_and_plot(reference):
    rows = _rows(reference)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "skipped", "mfu", "eta_s",
                    "max_attn_logit"):
            assert key in r, key
    # evaluated every 5 steps and after the last one
    assert [r["step"] for r in rows if "val_loss" in r] == [5, 6]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in rows if "val_loss" in r)
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0]  # it learns
    # megatron's warmup: 0, then lr * step / warmup_iters
    assert [r["lr"] for r in rows[:3]] == pytest.approx([0.0, 1e-3, 2e-3])
    assert any(f.startswith("events.out.tfevents") for f in
               os.listdir(os.path.join(reference, "tensorboard")))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(reference, "tensorboard"))
    events.Reload()
    assert {"train/loss", "val/loss", "val/ppl"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val/loss")] == [5, 6]
    out = subprocess.run([sys.executable, "-m", "k2mcore.cli.plot", reference],
                         capture_output=True, text=True, env=_env())
    png = os.path.join(reference, "metrics.png")
    assert out.returncode == 0 and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_quiet_console_a_finished_run_and_bad_data_before_anything(tmp_path):
    """With Python's default warning filters (as a user runs it), a training run prints no
    warning; run again, it says in one line that the run is complete; bad data stops with one
    line before the checkpoint is loaded."""
    run = str(tmp_path / "run")
    first = _run(1, ["checkpoint.interval=2"], run, 2, PYTHONWARNINGS="")
    noise = [l for l in (first.stderr + first.stdout).splitlines() if "warn" in l.lower()]
    assert noise == [], noise
    again = _run(1, ["checkpoint.interval=2"], run, 2)
    assert again.stdout.strip().splitlines() == [
        f"k2m-train: the run in {run} is already complete (step 2 of train.iters=2); to go on, "
        "raise train.iters; to start another, --set run.dir=NEW_DIR"], again.stdout
    assert len(_rows(run)) == 2
    missing = str(tmp_path / "nowhere" / "corpus_text_document")
    bad = _run(1, ["checkpoint.interval=2", f"data.blend={missing}"], run, 4, expect=2)
    assert "checkpoint" not in bad.stdout and "resumed" not in bad.stdout, bad.stdout
    err = bad.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("k2m-train: error:") and missing in err[0], err


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_adamw_losses_match_one_rank(reference, layout, tmp_path):
    nproc, sets = LAYOUTS[layout]
    _run(nproc, sets, str(tmp_path), 5)
    worst = _close(_losses(reference), _losses(str(tmp_path)), range(1, 6), 1e-5)
    print(f"{layout}: 5 AdamW steps, worst relative loss difference {worst:.1e}")
    # the logged max attention logit is the max over all heads, layers and tokens: the same
    # whichever ranks hold which heads (TP), layers (PP) or tokens (DP, CP)
    logits = {r["step"]: r["max_attn_logit"] for r in _rows(reference)}
    _close(logits, {r["step"]: r["max_attn_logit"] for r in _rows(str(tmp_path))},
           range(1, 6), 1e-5)
    # validation after step 5 (train.eval_interval=5): the same held-out loss in every layout
    val = {r["step"]: r["val_loss"] for r in _rows(reference) if "val_loss" in r}
    _close(val, {r["step"]: r["val_loss"] for r in _rows(str(tmp_path)) if "val_loss" in r},
           [5], 1e-5)


ASYNC = ["checkpoint.interval=3", "checkpoint.async_save=true"]


def test_resume_equals_uninterrupted_also_under_another_layout(reference, tmp_path):
    """An async save at EP2 x DP2 (step 3, committed by the poll after step 4, while the run
    goes on to step 6) reloads at 1 rank and at TP2 x PP2 on 4 ranks with the uninterrupted
    losses; so does the run that saved it."""
    ck = str(tmp_path / "ck")
    ep2 = ["parallel.ep=2"]
    saving = _run(2, ep2 + ASYNC + [f"checkpoint.dir={ck}"], str(tmp_path / "a"), 6)
    assert "step_00000003: copied in" in saving.stdout, saving.stdout
    step3 = os.path.join(ck, "step_00000003")
    assert os.path.isdir(step3)
    # another layout (1 rank, and TP2 x PP2 on 4 ranks) from the EP2 checkpoint; the same
    # layout's automatic resume: the SIGTERM test here, and test_slurm.py's three reruns.
    # The 1-rank run stops at step 5 and is started again with the same checkpoint.load: its own
    # newest checkpoint comes first (a requeued fine-tune goes on), then it is complete.
    c, load_c = str(tmp_path / "c"), [f"checkpoint.load={step3}", "checkpoint.interval=1"]
    _run(1, load_c, c, 5)
    again = _run(1, load_c, c, 6)
    assert f"resumed from {os.path.join(c, 'checkpoints', 'step_00000005')} at step 5" \
        in again.stdout, again.stdout
    assert "is already complete (step 6 of train.iters=6)" in _run(1, load_c, c, 6).stdout
    _run(4, ["parallel.tp=2", "parallel.sp=true", "parallel.pp=2", f"checkpoint.load={step3}"],
         str(tmp_path / "d"), 6)
    ref = _losses(reference)
    _close(ref, _losses(str(tmp_path / "a")), range(1, 7), 1e-5)
    for run in "cd":
        losses = _losses(str(tmp_path / run))
        assert sorted(losses) == [4, 5, 6], (run, sorted(losses))
        _close(ref, losses, [4, 5, 6], 1e-5)


MUONCLIP = ["optimizer.name=muonclip", "qk_clip.threshold=0.08"]


@pytest.fixture(scope="module")
def muon_reference(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("muon_ref"))
    _run(1, MUONCLIP, run, 6)
    return run


def test_muonclip_resume_under_other_layouts_equals_uninterrupted(muon_reference, tmp_path):
    """Muon momentum saved ZeRO-sharded over DP2, by an async save, reloads at 1 rank and at
    TP2 x EP2; every run continues with the uninterrupted 1-rank losses and clips the same
    number of heads."""
    ck = str(tmp_path / "ck")
    _run(2, MUONCLIP + ASYNC + [f"checkpoint.dir={ck}"], str(tmp_path / "a"), 6)
    step3 = os.path.join(ck, "step_00000003")
    _run(1, MUONCLIP + [f"checkpoint.load={step3}"], str(tmp_path / "b"), 6)
    _run(2, MUONCLIP + ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=1",
                        f"checkpoint.load={step3}"], str(tmp_path / "c"), 6)
    ref = {r["step"]: r for r in _rows(muon_reference)}
    assert sum(r["clipped_heads"] for r in ref.values()) > 0
    for run in "bc":
        rows = {r["step"]: r for r in _rows(str(tmp_path / run))}
        assert sorted(rows) == [4, 5, 6], (run, sorted(rows))
        _close({s: ref[s]["loss"] for s in ref}, {s: rows[s]["loss"] for s in rows}, [4, 5, 6], 1e-5)
        assert [rows[s]["clipped_heads"] for s in (4, 5, 6)] == [ref[s]["clipped_heads"] for s in (4, 5, 6)]
        assert len(rows[4]["max_attn_logit_per_layer"]) == 4
    # Muon momentum is not Adam state: an AdamW run refuses the checkpoint in one line
    proc = _run(1, [f"checkpoint.load={step3}"], str(tmp_path / "d"), 6, expect=2)
    assert "optimizer state is 'muonclip', this run uses 'adamw'" in proc.stderr.strip().splitlines()[-1]


def _wait_for_step(run_dir: str, step: int, proc: subprocess.Popen, timeout: float = 300):
    path = os.path.join(run_dir, "metrics.jsonl")
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, "the run ended before it was interrupted"
        if os.path.exists(path) and len(_rows(run_dir)) >= step:
            return
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} in {path}")


def test_sigterm_saves_and_exits_zero_then_resume(reference, tmp_path):
    run = str(tmp_path / "run")
    # a long run, so the signal always lands mid-run; the schedule is fixed by decay_iters
    proc = subprocess.Popen(_cmd(1, [], run, 30), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    stopped_at = len(_rows(run))
    assert stopped_at < 6 and "stop signal" in out
    assert os.path.isdir(os.path.join(run, "checkpoints", f"step_{stopped_at:08d}"))
    _run(1, [], run, 6)  # automatic resume from <run.dir>/checkpoints
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    _close(_losses(reference), {r["step"]: r["loss"] for r in rows}, range(1, 7), 1e-5)


def test_a_stop_file_saves_and_is_consumed_so_the_next_start_trains_on(reference, tmp_path):
    """<run.dir>/STOP (what slurm/train.sbatch writes on Slurm's notice) stops the run after the
    step under way, with a save; the trainer then removes it, and a plain rerun resumes and
    trains to the end with the uninterrupted losses."""
    run = str(tmp_path / "run")
    os.makedirs(run)
    open(os.path.join(run, "STOP"), "w").close()
    first = _run(1, [], run, 6)
    assert [r["step"] for r in _rows(run)] == [1]
    assert os.path.isdir(os.path.join(run, "checkpoints", "step_00000001"))
    assert not os.path.exists(os.path.join(run, "STOP")) and "removed" in first.stdout
    _run(1, [], run, 6)
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    _close(_losses(reference), {r["step"]: r["loss"] for r in rows}, range(1, 7), 1e-5)


def test_kill_during_an_async_save_leaves_the_previous_checkpoint_newest(reference, tmp_path):
    """kill -9 while the step-4 checkpoint is half written in the background (its writer
    stalls mid-file; training goes on meanwhile): step 2 stays the newest, and the rerun resumes
    from it with the uninterrupted losses and clears the debris."""
    run = str(tmp_path / "run")
    root = os.path.join(run, "checkpoints")
    sets = ["parallel.ep=2", "checkpoint.interval=2", "checkpoint.async_save=true"]
    proc = subprocess.Popen(_cmd(2, sets, run, 30, stall_async_save_from=4), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_for_step(run, 5, proc)  # step 5 ran while step 4's checkpoint was being written
        partial = os.path.join(root, ".tmp_step_00000004")
        assert any(f.endswith(".distcp") for f in os.listdir(os.path.join(partial, "dist")))
    finally:  # torchrun and its ranks (in sessions of their own): every process of this run
        subprocess.run(["pkill", "-KILL", "-f", run])
        out = proc.communicate(timeout=60)[0]
    assert "stalls mid-file" in out, out[-3000:]
    assert ck.latest_checkpoint(root).endswith("step_00000002")
    assert not os.path.exists(os.path.join(root, "step_00000004"))
    _run(2, sets, run, 6)  # resumes from step 2 on its own
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    _close(_losses(reference), {r["step"]: r["loss"] for r in rows}, range(1, 7), 1e-5)
    assert sorted(os.listdir(root)) == ["step_00000004", "step_00000006"]


def test_nan_steps_are_skipped_and_too_many_stop_the_run(tmp_path):
    run = str(tmp_path / "skip")
    _run(1, [], run, 5, nan_loss_steps="2,3")
    rows = _rows(run)
    assert [r["skipped"] for r in rows] == [0, 1, 1, 0, 0]
    assert math.isnan(rows[1]["loss"]) and rows[-1]["skipped_total"] == 2
    # a skipped step does not advance the schedule: step 4 applies step 2's warmup rate
    assert rows[3]["lr"] == pytest.approx(rows[1]["lr"])
    proc = _run(1, ["train.max_consecutive_skips=2"], str(tmp_path / "stop"), 5, expect=1,
                nan_loss_steps="2,3")
    assert "2 updates in a row skipped" in proc.stderr
    assert "Traceback" not in proc.stderr
