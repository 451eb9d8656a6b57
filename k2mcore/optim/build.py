"""Building the run's optimizer from the config: megatron's optimizer (Adam with decoupled weight
decay = AdamW; ZeRO-1 when the distributed optimizer is on), turned into MuonClip when
`optimizer.name: muonclip`, and its LR/WD scheduler."""
from __future__ import annotations

from typing import Any, Optional

from k2mcore.config.schema import K2Config
from k2mcore.parallel.groups import ProcessGroups


def build_optimizer(cfg: K2Config, model: list, groups: ProcessGroups, *,
                    param_layout: Optional[Any] = None) -> tuple[Any, Any]:
    """(megatron optimizer, OptimizerParamScheduler) for the DDP-wrapped `model` chunks.
    `param_layout`: what k2mcore.parallel.ddp.ddp_param_layout gave `wrap_ddp` (its NS
    offloads go to MuonClip)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optimizer
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            clip_grad=cfg.train.clip_grad, bf16=model[0].config.bf16,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        ),
        model,
        use_gloo_process_groups=False,
    )
    if cfg.parallel.distributed_optimizer:
        from k2mcore.compat import param_sync

        param_sync.install()  # one parameter all-gather per buffer, also with EP's two children
    sched = build_scheduler(cfg, opt)
    if o.name == "muonclip":
        _install_muonclip(cfg, opt, model, groups,
                          offloads=getattr(param_layout, "offloads", ()))
    return opt, sched


def build_scheduler(cfg: K2Config, opt: Any) -> Any:
    """megatron's OptimizerParamScheduler: warmup, then constant, cosine, linear or WSD decay."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optimizer
    iters = o.decay_iters or cfg.train.iters
    wsd = o.decay_style == "wsd"
    return OptimizerParamScheduler(
        opt, init_lr=0.0 if o.warmup_iters else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_iters, lr_decay_steps=max(iters, o.warmup_iters + 1),
        lr_decay_style="WSD" if wsd else o.decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=iters,
        wd_incr_style="constant",
        wsd_decay_steps=(o.wsd_decay_iters or max(1, iters // 10)) if wsd else None,
        lr_wsd_decay_style=o.wsd_decay_style if wsd else None,
    )


def _install_muonclip(cfg: K2Config, opt: Any, model: list, groups: ProcessGroups, *,
                      offloads: Any = ()) -> None:
    """megatron's distributed AdamW becomes MuonClip: Muon on the hidden matrices (sharded
    Newton-Schulz), AdamW on the rest, QK-Clip after each step (k2mcore.optim.muonclip.install)."""
    from k2mcore.optim.muonclip.hparams import MuonHyperParams
    from k2mcore.optim.muonclip.install import install_muonclip

    m = cfg.optimizer.muon
    install_muonclip(
        opt, [getattr(c, "module", c) for c in model], MuonHyperParams.from_config(m), groups,
        router_in_muon=m.router_in_muon, split_gated=m.split_gated,
        qk_clip_threshold=cfg.qk_clip.threshold if cfg.qk_clip_active else None,
        qk_clip_alpha=cfg.qk_clip.alpha, offloads=offloads,
    )
