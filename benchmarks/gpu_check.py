"""The GPU check: does the CUDA path train, how fast, and what MuonClip costs there. One call.

    bash benchmarks/gpu_check.sh [--cpu] [--out DIR]     # installs .whl/ first, then runs this

1. correctness: k2-tiny, 5 MuonClip steps with QK-Clip forced on, torch loader, on CUDA in fp32
   (TF32 off), in bf16, and in fp32 with the blockwise latent attention (16-token key blocks,
   the path long and context-parallel sequences take), against the same run on this machine's
   CPU (CUDA_VISIBLE_DEVICES="", same seed, so the same weights and batches; plain attention):
   losses within 1e-4 (fp32) and 2e-2 (bf16) relative, and the same clipped heads per step;
2. a K2-shaped proxy on one device: K2's widths (hidden 7168, MLA ranks 1536/512, 64 heads,
   expert width 2048) with few layers and experts, bf16, selective recompute (the TE spec where
   Transformer-Engine imports, else the local spec);
   tokens/s and MFU against the bf16 GEMM peak measured first (8192^3), with and without the
   max-logit probe;
3. MuonClip against AdamW on that proxy: optimizer-step and whole-step time, and Newton-Schulz
   throughput in bf16 (4p^2q + 2p^3 per iteration) against the measured peak;
4. one table on stdout, also written as JSON (`--out`, default runs/gpu_check).

`--cpu` runs the same code paths at toy sizes on CPU (tests/benchmarks/test_gpu_check.py), so the
script cannot rot between visits of a GPU machine.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = ["--config", "k2-tiny", "--set", "train.iters=5", "--set", "optimizer.name=muonclip",
            "--set", "qk_clip.threshold=0.05", "--set", "train.seed=2024", "--set",
            "data.loader=torch", "--set", "checkpoint.interval=0", "--set", "logging.interval=1",
            "--set", "logging.tensorboard=false"]
# K2's widths; layers, experts and vocabulary cut so that weights, fp32 grads and optimizer
# state (about 18 bytes per parameter) plus activations fill most of an H200's 139 GiB
K2_PROXY = {"model.hidden_size": 7168, "model.num_attention_heads": 64,
            "model.q_lora_rank": 1536, "model.kv_lora_rank": 512, "model.qk_nope_head_dim": 128,
            "model.qk_rope_head_dim": 64, "model.v_head_dim": 128,
            "model.ffn_hidden_size": 18432, "model.moe_ffn_hidden_size": 2048,
            "model.num_layers": 6, "model.first_k_dense": 1, "model.num_experts": 8,
            "model.moe_topk": 2, "model.num_shared_experts": 1, "model.vocab_size": 32768,
            "train.seq_length": 4096, "train.micro_batch_size": 1, "train.global_batch_size": 2}
TOY_PROXY = {"model.hidden_size": 128, "model.num_attention_heads": 4, "model.q_lora_rank": 48,
             "model.kv_lora_rank": 32, "model.qk_nope_head_dim": 16, "model.qk_rope_head_dim": 8,
             "model.v_head_dim": 16, "model.ffn_hidden_size": 256,
             "model.moe_ffn_hidden_size": 64, "model.num_layers": 2, "model.first_k_dense": 1,
             "model.num_experts": 4, "model.moe_topk": 2, "model.num_shared_experts": 1,
             "model.vocab_size": 1024, "train.seq_length": 64, "train.micro_batch_size": 1,
             "train.global_batch_size": 2}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds of `repeat` calls after one warm-up."""
    fn()
    _sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def gemm_peak(cpu: bool) -> dict:
    """The bf16 GEMM rate this device reaches (fp32 on CPU, where bf16 is emulated)."""
    import torch

    n = 512 if cpu else 8192
    dtype = torch.float32 if cpu else torch.bfloat16
    dev = "cpu" if cpu else "cuda"
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    seconds = _timed(lambda: a @ b, 3 if cpu else 20)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops": 2 * n**3 / seconds / 1e12}


# --------------------------------------------------------------------------------------------
# 1. correctness: three k2m-train runs, compared step by step
def _train(run_dir: str, sets: list[str], env: dict) -> list[dict]:
    args = [*TINY_RUN, "--set", f"run.dir={run_dir}", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run([sys.executable, "-m", "k2mcore.cli.train", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"k2m-train {' '.join(sets)} failed (exit {proc.returncode}): {tail}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def correctness(cpu: bool, work: str) -> dict:
    base = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"),
                PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    on_cpu = dict(base, CUDA_VISIBLE_DEVICES="")
    device = on_cpu if cpu else base
    ref = _train(os.path.join(work, "cpu-fp32"), ["train.dtype=fp32"], on_cpu)
    runs = {"fp32": (_train(os.path.join(work, "dev-fp32"), ["train.dtype=fp32"],
                            dict(device, NVIDIA_TF32_OVERRIDE="0")), 1e-4),
            "bf16": (_train(os.path.join(work, "dev-bf16"), ["train.dtype=bf16"], device), 2e-2),
            # the long-sequence path: 16-token key blocks up-projected from MLA's latent
            # (k2mcore.model.blockwise), against the CPU's plain attention
            "blockwise": (_train(os.path.join(work, "dev-blockwise"),
                                 ["train.dtype=fp32", "model.attention_block_size=16"],
                                 dict(device, NVIDIA_TF32_OVERRIDE="0")), 1e-4)}
    out = {"cpu_losses": [r["loss"] for r in ref],
           "cpu_clipped_heads": [r.get("clipped_heads") for r in ref]}
    for name, (rows, tol) in runs.items():
        worst = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(rows, ref))
        clipped = [r.get("clipped_heads") for r in rows]
        # bf16 rounding may move a head across the threshold: its heads are reported only
        same_heads = clipped == out["cpu_clipped_heads"] or name == "bf16"
        out[name] = {"losses": [r["loss"] for r in rows], "max_rel_diff": worst, "tol": tol,
                     "clipped_heads": clipped,
                     "ok": worst <= tol and same_heads and len(rows) == len(ref) == 5}
    return out


# --------------------------------------------------------------------------------------------
# 2 and 3. the proxy, in this process
def _proxy_cfg(cpu: bool, optimizer: str, probe: bool):
    from k2mcore.config.loader import load_config

    sizes = TOY_PROXY if cpu else K2_PROXY
    sets = [f"{k}={v}" for k, v in sizes.items()]
    sets += ["train.dtype=" + ("fp32" if cpu else "bf16"), "train.recompute=selective",
             "train.init=megatron", f"optimizer.name={optimizer}",
             f"model.measure_max_attn_logit={str(probe).lower()}", "qk_clip.threshold=100"]
    return load_config("k2-tiny", sets)


def proxy_run(cpu: bool, optimizer: str, probe: bool, steps: int, peak: float) -> dict:
    import torch

    from k2mcore.model.build import build_model
    from k2mcore.optim.build import build_optimizer
    from k2mcore.parallel.ddp import wrap_ddp
    from k2mcore.parallel.groups import init_distributed
    from k2mcore.parallel.layout import resolve_layout
    from k2mcore.training.metrics import flops_per_token
    from k2mcore.training.step import forward_backward

    cfg = _proxy_cfg(cpu, optimizer, probe)
    t = cfg.train
    groups = init_distributed(resolve_layout(cfg, 1), seed=t.seed)
    model = wrap_ddp(build_model(cfg, groups), groups, distributed_optimizer=True)
    optimizer_, _ = build_optimizer(cfg, model, groups)
    dev = "cpu" if cpu else "cuda"
    gen = torch.Generator().manual_seed(0)
    n_micro = t.global_batch_size // t.micro_batch_size
    tokens = torch.randint(0, cfg.model.vocab_size, (n_micro, t.micro_batch_size,
                                                    t.seq_length + 1), generator=gen)
    batches = [{"tokens": s[:, :-1].to(dev), "labels": s[:, 1:].to(dev),
                "loss_mask": torch.ones(t.micro_batch_size, t.seq_length, device=dev)}
               for s in tokens]
    phases: dict[str, list[float]] = {"fwd_bwd": [], "optimizer": []}
    if not cpu:
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):  # two warm-up steps
        _sync()
        start = time.perf_counter()
        optimizer_.zero_grad()
        forward_backward(model, groups, batches, seq_length=t.seq_length,
                         micro_batch_size=t.micro_batch_size)
        _sync()
        mid = time.perf_counter()
        optimizer_.step()
        _sync()
        if i >= 2:
            phases["fwd_bwd"].append(mid - start)
            phases["optimizer"].append(time.perf_counter() - mid)
    med = {k: sorted(v)[len(v) // 2] for k, v in phases.items()}
    step = med["fwd_bwd"] + med["optimizer"]
    tok_s = t.global_batch_size * t.seq_length / step
    params = sum(p.numel() for c in model for p in c.parameters())
    out = {"optimizer": optimizer, "probe": probe, "params": params, "step_s": step,
           "fwd_bwd_s": med["fwd_bwd"], "optimizer_s": med["optimizer"], "tokens_per_s": tok_s,
           "mfu": flops_per_token(cfg.model, t.seq_length) * tok_s / (peak * 1e12),
           "peak_mem_gib": 0.0 if cpu else torch.cuda.max_memory_allocated() / 2**30}
    del model, optimizer_, batches
    gc.collect()
    if not cpu:
        torch.cuda.empty_cache()
    return out


def ns_throughput(cpu: bool, peak: float) -> dict:
    """Newton-Schulz on the proxy's Muon matrices (gate and up apart), batched by shape."""
    import torch

    from k2mcore.optim.muonclip.newton_schulz import newton_schulz, ns_flops
    from k2mcore.parallel.param_counts import megatron_param_shapes

    cfg = _proxy_cfg(cpu, "muonclip", True)
    shapes: dict[tuple[int, int], int] = {}
    for name, shape in megatron_param_shapes(cfg.model).items():
        if len(shape) != 2 or "embedding" in name or "output_layer" in name:
            continue
        count = 1
        if "linear_fc1" in name:  # SwiGLU: gate and up orthogonalized apart
            shape, count = (shape[0] // 2, shape[1]), 2
        shapes[shape] = shapes.get(shape, 0) + count
    dev, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.bfloat16)
    batches = [torch.randn(n, *s, device=dev) for s, n in shapes.items()]
    seconds = _timed(lambda: [newton_schulz(b, dtype=dtype) for b in batches], 2 if cpu else 5)
    flops = sum(n * ns_flops(*s) for s, n in shapes.items())
    return {"matrices": sum(shapes.values()), "dtype": str(dtype).replace("torch.", ""),
            "seconds": seconds, "tflops": flops / seconds / 1e12,
            "of_peak": flops / seconds / 1e12 / peak}


# --------------------------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300]


def table(r: dict) -> str:
    from k2mcore.cli.train import human

    c, p = r["correctness"], r["proxy"]
    lines = [f"device: {r['device']}  torch {r['torch']}  megatron-core {r['megatron_core']}",
             f"GEMM peak ({r['peak']['dtype']}, {r['peak']['n']}^3): "
             f"{r['peak']['tflops']:.1f} TFLOP/s", "",
             "| check | figure | bound | ok |", "|---|---|---|---|"]
    if "error" in c:
        lines.append(f"| k2-tiny on the device vs CPU | {c['error']} | | NO |")
    for name in ("fp32", "bf16", "blockwise") if "error" not in c else ():
        x = c[name]
        label = "fp32 blockwise attention (16-token blocks)" if name == "blockwise" else name
        lines.append(f"| k2-tiny {label} vs CPU, 5 MuonClip steps | max rel loss diff "
                     f"{x['max_rel_diff']:.2e}, clipped heads {x['clipped_heads']} | "
                     f"{x['tol']:.0e}, CPU heads {c['cpu_clipped_heads']} | "
                     f"{'yes' if x['ok'] else 'NO'} |")
    lines += ["", "| proxy run | params | step s | fwd+bwd s | optimizer s | tokens/s | MFU |"
              " peak GiB |", "|---|---|---|---|---|---|---|---|"]
    for x in p["runs"]:
        if "error" in x:
            lines.append(f"| {x['optimizer']}, probe {'on' if x['probe'] else 'off'} | "
                         f"{x['error'][:60]} | | | | | | |")
            continue
        lines.append(f"| {x['optimizer']}, probe {'on' if x['probe'] else 'off'} | "
                     f"{human(x['params'])} | {x['step_s']:.3f} | {x['fwd_bwd_s']:.3f} | "
                     f"{x['optimizer_s']:.3f} | {x['tokens_per_s']:.0f} | {x['mfu']:.1%} | "
                     f"{x['peak_mem_gib']:.1f} |")
    ns = p["newton_schulz"]
    lines += ["", f"MuonClip / AdamW (probe on): optimizer step {p['muon_vs_adamw_optimizer']:.2f}x,"
              f" whole step {p['muon_vs_adamw_step']:.2f}x; probe costs "
              f"{p['probe_cost']:.2f}x the AdamW step",
              f"Newton-Schulz ({ns['dtype']}, {ns['matrices']} proxy matrices): "
              f"{ns['tflops']:.1f} TFLOP/s = {ns['of_peak']:.0%} of the GEMM peak"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="dry mode: toy sizes on CPU")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_check"))
    ap.add_argument("--steps", type=int, default=None, help="timed proxy steps (default 5; 2)")
    args = ap.parse_args(argv)
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initializes CUDA
    sys.path.insert(0, ROOT)
    from k2mcore.compat import console

    console.install()  # before megatron is imported
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu for the dry mode)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    from importlib.metadata import version

    steps = args.steps or (2 if args.cpu else 5)
    result: dict[str, Any] = {
        "device": "cpu (dry mode)" if args.cpu else torch.cuda.get_device_name(0),
        "torch": torch.__version__, "megatron_core": version("megatron-core"),
        "peak": gemm_peak(args.cpu)}
    peak = result["peak"]["tflops"]
    with tempfile.TemporaryDirectory(prefix="k2m-gpu-check-") as work:
        try:
            result["correctness"] = correctness(args.cpu, work)
        except Exception as exc:
            result["correctness"] = {"error": _one_line(exc)}
    runs = []
    for opt, probe in (("adamw", False), ("adamw", True), ("muonclip", True)):
        try:
            runs.append(proxy_run(args.cpu, opt, probe, steps, peak))
        except Exception as exc:  # OOM or a CUDA-path bug: the other figures still make a table
            runs.append({"optimizer": opt, "probe": probe, "error": _one_line(exc)})
            gc.collect()
            if not args.cpu:
                torch.cuda.empty_cache()
    adam_off, adam_on, muon = runs
    ratio = (lambda a, b, k: a[k] / b[k] if k in a and k in b else float("nan"))
    result["proxy"] = {
        "runs": runs, "newton_schulz": ns_throughput(args.cpu, peak),
        "muon_vs_adamw_optimizer": ratio(muon, adam_on, "optimizer_s"),
        "muon_vs_adamw_step": ratio(muon, adam_on, "step_s"),
        "probe_cost": ratio(adam_on, adam_off, "step_s")}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))
    print(f"\nJSON: {os.path.join(args.out, 'gpu_check.json')}")
    ok = all(result["correctness"].get(k, {}).get("ok") for k in ("fp32", "bf16")) and \
        not any("error" in x for x in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
