"""What the run tells its user: a console line, metrics.jsonl, TensorBoard, optionally W&B."""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Any

from k2mcore.config.schema import K2Config, ModelConfig


def flops_per_token(model: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token: 6 x active matmul params + attention's score/value matmuls.

    The attention term is PaLM's 12·L·H·Q·T with MLA's q/k and v head dims
    (6·L·H·(d_qk + d_v)·T), counting the full (non-causal) square as Megatron-LM does.
    """
    from k2mcore.parallel.param_counts import count_parameters

    active = count_parameters(model)["active"] - count_parameters(model)["embedding"]
    d_qk = model.qk_nope_head_dim + model.qk_rope_head_dim
    attn = 6 * model.num_layers * model.num_attention_heads * (d_qk + model.v_head_dim)
    return 6.0 * active + attn * seq_length


def attention_report(cfg: K2Config, optimizer: Any, model: list, groups: Any,
                     stepped: bool) -> dict:
    """max_attn_logit (+ per layer, clipped_heads under QK-Clip) over all ranks; resets probes.

    Collective. `stepped`: the optimizer applied this step (QK-Clip's stats are then fresh)."""
    from k2mcore.optim.chain import qk_clip_hook
    from k2mcore.optim.muonclip.qk_clip import attn_logit_report

    hook = qk_clip_hook(optimizer) if cfg.qk_clip_active else None
    stats = hook.last_stats if hook is not None and stepped else None
    if hook is not None:
        hook.last_stats = None
    report = attn_logit_report(
        [getattr(c, "module", c) for c in model], cfg.model.num_layers, stats,
        count_clipped=groups.dp_cp_rank == 0)
    if hook is None:
        return {"max_attn_logit": report["max_attn_logit"]}
    return report


class MetricsLogger:
    """Rank 0 writes; every rank may call (others are no-ops)."""

    def __init__(
        self, cfg: K2Config, *, world_size: int, is_writer: bool, start_step: int = 0
    ) -> None:
        self.cfg = cfg
        self.is_writer = is_writer
        self.world_size = world_size
        self.path = os.path.join(cfg.run.dir, "metrics.jsonl")
        self.flops = flops_per_token(cfg.model, cfg.train.seq_length)
        self.tb = None
        self.wandb = None
        self._start = time.perf_counter()
        if not is_writer:
            return
        os.makedirs(cfg.run.dir, exist_ok=True)
        self._truncate(start_step)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.run.dir, "tensorboard"))
        if cfg.logging.wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.logging.wandb_project, name=cfg.run.name,
                                        dir=cfg.run.dir)
            except Exception as exc:  # optional: never stop training for it
                warnings.warn(f"logging.wandb_project set but W&B is unavailable: {exc}")

    def _truncate(self, start_step: int) -> None:
        """Keep the rows up to the step training (re)starts from: after a crash the rows past
        the last checkpoint describe steps that are about to be redone."""
        kept = [r for r in read_metrics(self.path) if r["step"] <= start_step] \
            if os.path.exists(self.path) else []
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)

    def log(self, row: dict[str, Any], *, step_time: float, first_step: int,
            console: bool = True) -> dict[str, Any]:
        """Complete `row` (step, loss, lr, grad_norm, skipped, ...) with speed, MFU and ETA;
        write it; print it at the logging interval (`console`: k2m-rl prints its own line)."""
        t = self.cfg.train
        tokens = t.global_batch_size * t.seq_length
        row["tokens_per_s"] = tokens / step_time
        peak = self.cfg.logging.peak_tflops * 1e12 * self.world_size
        row["mfu"] = row["tokens_per_s"] * self.flops / peak
        done = row["step"] - first_step + 1
        row["eta_s"] = (time.perf_counter() - self._start) / done * (t.iters - row["step"])
        if not self.is_writer:
            return row
        self.write(row)
        if console and (row["step"] % self.cfg.logging.interval == 0 or row["step"] == t.iters
                        or "val_loss" in row):
            print(self.console_line(row), flush=True)
        return row

    def write(self, row: dict[str, Any]) -> None:
        """`row` as it is to metrics.jsonl, TensorBoard and W&B (the writer rank only)."""
        if not self.is_writer:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                    self.tb.add_scalar(tag, value, row["step"])
            for i, value in enumerate(row.get("max_attn_logit_per_layer") or []):
                if value is not None:
                    self.tb.add_scalar(f"attn_logit/layer_{i + 1:03d}", value, row["step"])
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    @staticmethod
    def console_line(row: dict[str, Any]) -> str:
        gn = row.get("grad_norm")
        parts = [
            f"step {row['step']:6d}",
            f"loss {row['loss']:.4f}",
            f"lr {row['lr']:.2e}",
            f"grad norm {gn:.3f}" if gn is not None else "grad norm -",
            f"{row['tokens_per_s']:.0f} tok/s",
            f"MFU {100 * row['mfu']:.2f}%",
            f"ETA {_hms(row['eta_s'])}",
            f"skipped {row['skipped_total']}",
        ]
        if "reward_mean" in row:  # the RL policy update (k2mcore.rl)
            parts.append(f"reward {row['reward_mean']:.3f} | clip {row['clip_frac']:.3f} | "
                         f"entropy {row['entropy']:.3f} | ratio max {row['ratio_max']:.3f} | "
                         f"dropped groups {row['dropped_groups']}")
        if "val_loss" in row:
            parts.append(f"val loss {row['val_loss']:.4f} (ppl {row['val_ppl']:.4g})")
        if row.get("max_attn_logit") is not None:
            parts.append(f"max logit {row['max_attn_logit']:.3g}")
        if "clipped_heads" in row:
            parts.append(f"clipped heads {row['clipped_heads']}")
        per_layer = row.get("max_attn_logit_per_layer")
        if per_layer and len(per_layer) <= 16:  # one figure per layer fits a console line
            parts.append("per layer " + " ".join("-" if v is None else f"{v:.3g}" for v in per_layer))
        return " | ".join(parts)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
