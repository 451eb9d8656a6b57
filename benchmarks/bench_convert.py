"""Checkpoint conversion: peak memory and throughput against a plain copy of the same bytes.

    python benchmarks/bench_convert.py [--layers 3] [--widths narrow wide] [--keep DIR]

Builds synthetic Kimi-K2-shaped Hugging Face checkpoints (K2's structure: MLA with q LoRA, 384
routed experts + 1 shared, first layer dense, bf16 safetensors sharded per layer, narrow
widths; and wide ones, 16 experts of K2's per-expert size) of 1x and 4x the layers, then for each: `k2m-convert hf-to-mcore` and `mcore-to-hf` in
fresh processes (peak RSS from the process itself; time from after the imports) and a plain
copy of the source directory (read, write, fsync: the throughput baseline), each the fastest
of --repeats runs (peak RSS: the highest of them). Each reads its source from the page cache
(read once before it); compare the ratios within one run. The converters write with O_DIRECT
and fsync, the copy buffered and fsyncs: both durable. Targets: flat peak RSS from 1x to 4x,
at least half the copy's throughput.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HIDDEN, EXPERTS, MOE_FFN, FFN, HEADS = 256, 384, 128, 512, 8
Q_LORA, KV_LORA, NOPE, ROPE, V = 128, 64, 32, 16, 32


def _config(layers: int) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "vocab_size": 4096,
        "hidden_size": HIDDEN, "intermediate_size": FFN, "moe_intermediate_size": MOE_FFN,
        "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
        "n_shared_experts": 1, "n_routed_experts": EXPERTS, "num_experts_per_tok": 8,
        "routed_scaling_factor": 2.827, "kv_lora_rank": KV_LORA, "q_lora_rank": Q_LORA,
        "qk_rope_head_dim": ROPE, "qk_nope_head_dim": NOPE, "v_head_dim": V, "n_group": 1,
        "topk_group": 1, "first_k_dense_replace": 1, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096, "rope_theta": 50000.0, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }


def _layer(i: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    p = f"model.layers.{i}."
    t = {p + "input_layernorm.weight": w(HIDDEN), p + "post_attention_layernorm.weight": w(HIDDEN),
         p + "self_attn.q_a_proj.weight": w(Q_LORA, HIDDEN), p + "self_attn.q_a_layernorm.weight": w(Q_LORA),
         p + "self_attn.q_b_proj.weight": w(HEADS * (NOPE + ROPE), Q_LORA),
         p + "self_attn.kv_a_proj_with_mqa.weight": w(KV_LORA + ROPE, HIDDEN),
         p + "self_attn.kv_a_layernorm.weight": w(KV_LORA),
         p + "self_attn.kv_b_proj.weight": w(HEADS * (NOPE + V), KV_LORA),
         p + "self_attn.o_proj.weight": w(HIDDEN, HEADS * V)}
    mlp = p + "mlp."
    if i == 0:
        t.update({mlp + "gate_proj.weight": w(FFN, HIDDEN), mlp + "up_proj.weight": w(FFN, HIDDEN),
                  mlp + "down_proj.weight": w(HIDDEN, FFN)})
        return t
    t[mlp + "gate.weight"] = w(EXPERTS, HIDDEN)
    t[mlp + "gate.e_score_correction_bias"] = torch.zeros(EXPERTS)
    for e in [f"experts.{k}." for k in range(EXPERTS)] + ["shared_experts."]:
        t.update({mlp + e + "gate_proj.weight": w(MOE_FFN, HIDDEN), mlp + e + "up_proj.weight": w(MOE_FFN, HIDDEN),
                  mlp + e + "down_proj.weight": w(HIDDEN, MOE_FFN)})
    return t


def make_hf(path: str, layers: int) -> int:
    """A sharded bf16 safetensors directory (one shard per layer); returns its bytes."""
    from safetensors.torch import save_file

    os.makedirs(path)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    parts = [("embed", {"model.embed_tokens.weight": (torch.randn(4096, HIDDEN, generator=g) * 0.02).to(torch.bfloat16),
                        "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                        "lm_head.weight": (torch.randn(4096, HIDDEN, generator=g) * 0.02).to(torch.bfloat16)})]
    parts += [(f"layer{i}", None) for i in range(layers)]
    n = len(parts)
    for k, (name, tensors) in enumerate(parts):
        tensors = tensors if tensors is not None else _layer(k - 1, g)
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({t: fname for t in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_config(layers), f)
    return sum(os.path.getsize(os.path.join(path, x)) for x in os.listdir(path))


_RUN = """
import resource, sys, time
from k2mcore.cli.convert import main
import k2mcore.convert.hf_to_mcore, k2mcore.convert.mcore_to_hf  # imports are not conversion
start = time.perf_counter()
rc = main(sys.argv[1:] + ["--no-progress"])
print("RESULT", time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
sys.exit(rc)
"""


def _convert(args: list[str]) -> tuple[float, int]:
    proc = subprocess.run([sys.executable, "-c", _RUN, *args], capture_output=True, text=True, check=True)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    seconds, rss = line.split()[1:]
    return float(seconds), int(rss)


def _copy(src: str, dst: str) -> float:
    """A plain copy of the same bytes through user space: read, write, fsync each file (what
    the converters do, minus the conversion). Not `cp`: it may use copy_file_range or reflinks,
    which move no bytes at all on some file systems."""
    start = time.perf_counter()
    os.makedirs(dst)
    for name in sorted(os.listdir(src)):
        with open(os.path.join(src, name), "rb") as fin, open(os.path.join(dst, name), "wb") as fout:
            while block := fin.read(8 << 20):
                fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
    return time.perf_counter() - start


def _warm(path: str) -> None:
    """Read every file under `path` once, so the copy and both conversions read their source
    from the page cache alike (the converters write with O_DIRECT, which leaves none of their
    output cached for the next step)."""
    for d, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(d, name), "rb", buffering=0) as f:
                while f.read(8 << 20):
                    pass


WIDTHS = {  # HIDDEN, EXPERTS, MOE_FFN, FFN
    "narrow": (256, 384, 128, 512),  # K2's 384 experts, 64 KiB tensors: per-tensor costs
    # 16 experts of K2's per-expert size order (hidden 2048, 4 MiB tensors): per-byte costs
    "wide": (2048, 16, 1024, 4096),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=3, help="layers of the 1x model")
    ap.add_argument("--keep", help="write here instead of a temporary directory")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each; the fastest counts")
    ap.add_argument("--widths", nargs="+", choices=list(WIDTHS), default=list(WIDTHS))
    args = ap.parse_args()
    for width in args.widths:
        _measure(width, args)


def _measure(width: str, args: argparse.Namespace) -> None:
    global HIDDEN, EXPERTS, MOE_FFN, FFN
    HIDDEN, EXPERTS, MOE_FFN, FFN = WIDTHS[width]
    work = args.keep or tempfile.mkdtemp(prefix="k2m-bench-convert-")
    rows = []
    try:
        for scale in (1, 4):
            layers = args.layers * scale
            hf = os.path.join(work, f"{width}{scale}")
            size = make_hf(hf, layers)
            best: dict = {}
            for _ in range(args.repeats):  # best of N: the disk's write-back makes single runs noisy
                for d in (hf + "-copy", hf + "-mcore", hf + "-back"):
                    shutil.rmtree(d, ignore_errors=True)
                _warm(hf)
                copy_s = _copy(hf, hf + "-copy")
                _warm(hf)
                to = _convert(["hf-to-mcore", "--hf-dir", hf, "--out", hf + "-mcore"])
                _warm(hf + "-mcore")  # written with O_DIRECT: not in the page cache
                back = _convert(["mcore-to-hf", "--ckpt", hf + "-mcore", "--out", hf + "-back"])
                for key, (seconds, rss) in (("copy", (copy_s, 0)), ("to", to), ("back", back)):
                    # the fastest run's time, the highest run's peak RSS
                    old_s, old_rss = best.get(key, (seconds, rss))
                    best[key] = (min(old_s, seconds), max(old_rss, rss))
            rows.append((scale, layers, size, best["copy"][0], *best["to"], *best["back"]))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{width}: synthetic K2-shaped checkpoints ({EXPERTS} experts, hidden {HIDDEN}, bf16), "
          "sources read from the page cache")
    print(f"{'size':>5s} {'layers':>6s} {'GiB':>6s} {'copy MiB/s':>10s} {'hf->mcore MiB/s':>16s} {'x copy':>7s} "
          f"{'peak RSS MiB':>12s} {'mcore->hf MiB/s':>16s} {'x copy':>7s} {'peak RSS MiB':>12s}")
    for scale, layers, size, copy_s, to_s, to_rss, back_s, back_rss in rows:
        mib = size / 2**20
        print(f"{scale:>4d}x {layers:6d} {size / 2**30:6.2f} {mib / copy_s:10.0f} {mib / to_s:16.0f} "
              f"{copy_s / to_s:7.2f} {to_rss / 2**20:12.0f} {mib / back_s:16.0f} {copy_s / back_s:7.2f} "
              f"{back_rss / 2**20:12.0f}")
    (_, _, s1, _, _, r1, _, b1), (_, _, s4, _, _, r4, _, b4) = rows
    print(f"4x/1x: bytes {s4 / s1:.2f}x, peak RSS hf->mcore {r4 / r1:.2f}x, mcore->hf {b4 / b1:.2f}x")


if __name__ == "__main__":
    main()
