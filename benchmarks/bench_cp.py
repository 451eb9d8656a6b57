"""Context parallelism for MLA: the bytes CP moves per layer, against what gathering K/V or a
K/V ring would move, and the bytes saved for backward per rank.

    python benchmarks/bench_cp.py [--seq 4096] [--block 512]

1. Counted, on k2-tiny (fp32, gloo ranks, one micro-batch of --seq tokens forward and backward):
   1 rank with the plain attention (the baseline), 1 rank blockwise, CP2 and CP4 (blockwise,
   --block-token key blocks). Per run: the loss; the peak bytes saved for backward per rank
   (tests/harness/saved_bytes.py, parameters excluded) against the baseline's; and per layer and
   rank the CP bytes counted at the collectives (tests/harness/comm_bytes.py, 'cp' kind, bus
   bytes): the latent's all-gather in forward, its gradient's reduce-scatter in backward.
   Beside them, for the same tokens and dtype, what the up-projected K/V would move: gathered
   ((cp-1)/cp of the sequence's K/V) or passed around a ring as Transformer-Engine's CP does
   (cp-1 steps of a rank's K/V: the same bytes forward; backward passes K/V and dK/dV, twice).
2. Computed, at K2's shapes (64 heads, q/k head 192, v head 128, latent 512 + rope key 64, bf16)
   at 32k and 128k tokens: the latent's gather per layer and rank, the K/V gather at TP 1, 2, 4
   and 8 (heads split over TP, the latent is per token), and their ratio.
Targets (issue 32): the latent gather at most 1/30 of the K/V gather at TP1; at CP4 the peak
saved for backward per rank at most 0.35x the baseline's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests"),
                os.path.join(os.path.dirname(HERE), "tests", "parity")]

#: name -> (ranks, cp, blockwise)
RUNS = {"1 rank, plain": (1, 1, False), "1 rank, blockwise": (1, 1, True),
        "CP2": (2, 2, True), "CP4": (4, 4, True)}
K2 = {"heads": 64, "qk": 192, "v": 128, "latent": 512 + 64, "bytes": 2}


def kv_bytes(seq: int, cp: int, heads: int, qk: int, v: int, dtype_bytes: int) -> float:
    """Bytes a rank receives when the up-projected K/V of the other CP ranks' tokens come to it
    (gathered, or over cp-1 ring steps): (cp-1)/cp of the sequence's K and V."""
    return (cp - 1) / cp * seq * heads * (qk + v) * dtype_bytes


def latent_bytes(seq: int, cp: int, width: int, dtype_bytes: int) -> float:
    """Bytes a rank receives in the latent's all-gather (bus bytes)."""
    return (cp - 1) / cp * seq * width * dtype_bytes


def worker(names: list, seq: int, block: int, out: str) -> None:
    import torch.distributed as dist
    from cp_probe import measure

    rows = {}
    for name in names:
        _, cp, blockwise = RUNS[name]
        # blockwise at 1 rank: a block shorter than the sequence; plain: one block of it all
        rows[name] = measure(name, "", cp=cp, seq=seq, block=block if blockwise else seq)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def _collect(seq: int, block: int) -> dict:
    from harness.launching import local_command, local_env

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in sorted({r for r, _, _ in RUNS.values()}):
            names = [n for n, (r, _, _) in RUNS.items() if r == ranks]
            out = os.path.join(tmp, f"{ranks}.json")
            cmd = local_command(ranks, __file__, ["--worker", "--names", *names, "--out", out,
                                                  "--seq", str(seq), "--block", str(block)])
            subprocess.run(cmd, env=local_env(), check=True, capture_output=True)
            with open(out) as f:
                rows.update(json.load(f))
    return rows


def report(rows: dict) -> bool:
    mb = 1e6
    base = rows["1 rank, plain"]
    peak0 = base["per_rank"][0]["saved_peak"]
    print(f"k2-tiny, {base['seq']} tokens, fp32, one micro-batch; per layer and rank, MB "
          f"(bus bytes); K/V alternatives for the same tokens")
    print(f"{'run':18s} {'block':>6s} {'loss':>10s} {'saved peak MB':>13s} {'x base':>7s} "
          f"{'latent AG':>9s} {'latent RS':>9s} {'K/V AG':>8s} {'ring fwd':>8s} "
          f"{'ring bwd':>8s} {'latent/KV':>9s}")
    ok = True
    for name, r in rows.items():
        peak = max(x["saved_peak"] for x in r["per_rank"])
        ops = r["per_rank"][0]["cp_ops"]
        layers = r["layers"]
        ag = ops.get("all_gather_into_tensor", (0, 0.0, 0))[1] / layers
        rs = ops.get("reduce_scatter_tensor", (0, 0.0, 0))[1] / layers
        kv = kv_bytes(r["seq"], r["cp"], r["heads"], r["qk"], r["v"], 4)
        ratio = f"{ag / kv:9.4f}" if kv else f"{'-':>9s}"
        print(f"{name:18s} {r['block']:6d} {r['loss']:10.6f} {peak / mb:13.2f} "
              f"{peak / peak0:7.4f} {ag / mb:9.4f} {rs / mb:9.4f} {kv / mb:8.4f} "
              f"{kv / mb:8.4f} {2 * kv / mb:8.4f} {ratio}")
        if r["cp"] > 1:
            ok &= ag == latent_bytes(r["seq"], r["cp"], r["latent_width"], 4)
        if name == "CP4":
            ok &= peak <= 0.35 * peak0
    print("(k2-tiny's latent is 40 values a token against 4 heads x 40 of K/V: 1/4; at K2's "
          "shapes below it is 576 against 64 x 320)")
    print()
    print("K2's shapes, bf16, per layer and rank: the latent's all-gather vs the K/V gather "
          "(a ring moves the same forward), MB")
    tps = (1, 2, 4, 8)
    print(f"{'tokens':>7s} {'cp':>3s} {'latent':>9s} " + " ".join(
        f"{'K/V tp' + str(t):>10s} {'ratio':>7s}" for t in tps))
    for seq in (32_768, 131_072):
        for cp in (2, 4, 8, 16):
            lat = latent_bytes(seq, cp, K2["latent"], K2["bytes"])
            cells = []
            for tp in tps:
                kv = kv_bytes(seq, cp, K2["heads"] // tp, K2["qk"], K2["v"], K2["bytes"])
                cells.append(f"{kv / mb:10.1f} {lat / kv:7.4f}")
                if tp == 1:
                    ok &= lat / kv <= 1 / 30
            print(f"{seq:7d} {cp:3d} {lat / mb:9.2f} " + " ".join(cells))
    print(f"targets (latent <= 1/30 of K/V at TP1; CP4 saved peak <= 0.35x the 1-rank plain "
          f"run's): {'met' if ok else 'MISSED'}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--names", nargs="+", default=[])
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        worker(args.names, args.seq, args.block, args.out)
        return
    report(_collect(args.seq, args.block))


if __name__ == "__main__":
    main()
