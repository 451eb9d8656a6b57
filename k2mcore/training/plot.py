"""metrics.jsonl -> one PNG of loss (and validation loss), learning rate, grad norm (and max
attention logit)."""
from __future__ import annotations

import os
from typing import Optional

from .metrics import read_metrics


def plot_run(metrics_path: str, out_path: Optional[str] = None) -> str:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters or CI
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        raise ValueError(f"{metrics_path}: no metrics rows")
    panels = [("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "grad norm")]
    if any(r.get("max_attn_logit") is not None for r in rows):
        panels.append(("max_attn_logit", "max attention logit"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), sharex=True)
    for ax, (key, title) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, label="train")
        if key == "loss" and any("val_loss" in r for r in rows):
            val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
            ax.plot([p[0] for p in val], [p[1] for p in val], "o-", lw=1.2, ms=3,
                    label="validation")
            ax.legend(loc="upper right")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        skipped = [r["step"] for r in rows if r.get("skipped")]
        for s in skipped:
            ax.axvline(s, color="red", alpha=0.2)
    axes[-1].set_xlabel("step")
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
    fig.tight_layout()
    out_path = out_path or os.path.join(os.path.dirname(metrics_path), "metrics.png")
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
