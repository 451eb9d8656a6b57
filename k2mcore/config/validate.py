"""Reject configurations megatron-core 0.19.2 would reject later (often after minutes of start-up,
on every rank, with an AssertionError deep in a stack) as one-line ConfigErrors up front.

`validate` checks what does not depend on the world size, from the most specific to the most
general: single fields (enums, ranges), the data section's syntax, then one field against the
model, so the message points at the key that is most likely wrong. The layout's own rules
(pipeline splits, world-size products, batch arithmetic) follow in
k2mcore.parallel.layout.resolve_layout, which calls `validate` first.
"""
from __future__ import annotations

from typing import Any, Optional

from k2mcore.config.schema import K2Config
from k2mcore.data.blend import parse_blend, parse_split
from k2mcore.errors import ConfigError

CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer.name": ("adamw", "muonclip"),
    "optimizer.decay_style": ("constant", "linear", "cosine", "wsd"),
    "optimizer.wsd_decay_style": ("linear", "cosine", "exponential", "minus_sqrt"),
    "train.dtype": ("auto", "fp32", "bf16"),
    "train.recompute": ("none", "selective", "full"),
    "train.init": ("layout_invariant", "megatron"),
    "data.loader": ("auto", "dali", "torch"),
    "data.format": ("text", "chat", "rollouts"),
    "rl.advantage": ("grpo", "grpo_no_std"),
    "rl.loss": ("grpo", "gspo", "k2"),
    "rl.routing_replay": ("none", "rollout", "old"),
    "model.rope_scaling.type": ("yarn",),
    "optimizer.muon.ns_dtype": ("auto", "fp32", "bf16"),
    # k2mcore.optim.NS_COEFFICIENTS' names (a test keeps them equal; --check imports no torch)
    "optimizer.muon.coefficients": ("k2", "muon"),
}

POSITIVE_INTS = (
    "model.vocab_size", "model.hidden_size", "model.num_layers", "model.num_attention_heads",
    "model.kv_lora_rank", "model.qk_nope_head_dim", "model.qk_rope_head_dim", "model.v_head_dim",
    "model.ffn_hidden_size", "model.moe_ffn_hidden_size", "model.num_experts", "model.moe_topk",
    "model.n_group", "model.topk_group", "model.max_position_embeddings",
    "parallel.tp", "parallel.pp", "parallel.ep", "parallel.etp", "parallel.cp",
    "train.iters", "train.global_batch_size", "train.micro_batch_size", "train.seq_length",
    "train.max_consecutive_skips", "optimizer.muon.ns_steps",
    "checkpoint.keep", "logging.interval", "train.eval_iters", "data.prefetch",
    "model.attention_block_size", "rl.minibatches",
)
OPTIONAL_POSITIVE_INTS = (
    "model.q_lora_rank", "parallel.vpp", "optimizer.wsd_decay_iters", "optimizer.decay_iters",
    "train.ddp_bucket_size",
    "parallel.first_stage_layers", "parallel.last_stage_layers",
)
NON_NEGATIVE = (
    "model.num_shared_experts", "model.first_k_dense", "train.seed", "train.clip_grad",
    "optimizer.lr", "optimizer.min_lr", "optimizer.weight_decay", "optimizer.adam_eps",
    "optimizer.warmup_iters", "checkpoint.interval", "model.moe_router_bias_update_rate",
    "model.moe_aux_loss_coeff", "data.num_workers", "train.eval_interval",
    "rl.kl_coef", "rl.entropy_coef",
)
POSITIVE_FLOATS = (
    "model.rms_norm_eps", "model.init_std", "model.rope_theta", "logging.peak_tflops",
    "rl.temperature", "rl.tis_cap",
)


def _get(cfg: K2Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part) if obj is not None else None
    return obj


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def _check_fields(cfg: K2Config) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value is not None and value not in allowed:
            raise ConfigError(f"{key}: {_fmt(value)} is not one of {', '.join(allowed)}")
    for key in POSITIVE_INTS:
        if _get(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {_fmt(_get(cfg, key))}")
    for key in OPTIONAL_POSITIVE_INTS:
        value = _get(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key}: must be >= 1 or null, got {_fmt(value)}")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {_fmt(_get(cfg, key))}")
    for key in POSITIVE_FLOATS:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be > 0, got {_fmt(_get(cfg, key))}")
    o = cfg.optimizer
    for key, beta in (("optimizer.adam_beta1", o.adam_beta1),
                      ("optimizer.adam_beta2", o.adam_beta2)):
        if not 0 <= beta < 1:
            raise ConfigError(f"{key}: must be in [0, 1), got {_fmt(beta)}")
    if o.min_lr > o.lr:
        raise ConfigError(f"optimizer.min_lr={_fmt(o.min_lr)} exceeds optimizer.lr={_fmt(o.lr)}")
    _check_muonclip(cfg)
    _check_overlap(cfg)
    _check_recompute(cfg)
    rs = cfg.model.rope_scaling
    if rs is not None:
        if rs.factor < 1:
            raise ConfigError(f"model.rope_scaling.factor: must be >= 1, got {_fmt(rs.factor)}")
        if rs.original_max_position_embeddings < 1:
            raise ConfigError(
                f"model.rope_scaling.original_max_position_embeddings: must be >= 1, "
                f"got {rs.original_max_position_embeddings}"
            )


RECOMPUTE_MODULES = ("core_attn", "layernorm", "mla_up_proj", "mlp", "moe", "moe_act",
                     "shared_experts")


def recompute_modules(cfg: K2Config) -> Optional[list[str]]:
    """train.recompute_modules as a list (None: K2's default set)."""
    text = cfg.train.recompute_modules
    return None if text is None else [m.strip() for m in text.split(",") if m.strip()]


def _check_recompute(cfg: K2Config) -> None:
    mods = recompute_modules(cfg)
    if mods is None:
        return
    if cfg.train.recompute != "selective":
        raise ConfigError(f"train.recompute_modules={_fmt(cfg.train.recompute_modules)} needs "
                          f"train.recompute=selective (got {cfg.train.recompute})")
    unknown = [m for m in mods if m not in RECOMPUTE_MODULES]
    if unknown or not mods:
        raise ConfigError(f"train.recompute_modules: {_fmt(cfg.train.recompute_modules)} "
                          f"(known: {', '.join(RECOMPUTE_MODULES)})")


def _check_muonclip(cfg: K2Config) -> None:
    m, q = cfg.optimizer.muon, cfg.qk_clip
    if not 0 <= m.momentum < 1:
        raise ConfigError(f"optimizer.muon.momentum: must be in [0, 1), got {_fmt(m.momentum)}")
    if not m.lr_scale >= 0:
        raise ConfigError(f"optimizer.muon.lr_scale: must be >= 0, got {_fmt(m.lr_scale)}")
    if m.weight_decay is not None and not m.weight_decay >= 0:
        raise ConfigError(f"optimizer.muon.weight_decay: must be >= 0 or null, got {_fmt(m.weight_decay)}")
    if not 0 <= m.ns_offload_budget <= 0.5:
        raise ConfigError(f"optimizer.muon.ns_offload_budget: must be in [0, 0.5] (a fraction of "
                          f"ZeRO-1's bytes), got {_fmt(m.ns_offload_budget)}")
    if not q.threshold > 0:
        raise ConfigError(f"qk_clip.threshold: must be > 0, got {_fmt(q.threshold)}")
    if not 0 <= q.alpha <= 1:
        raise ConfigError(f"qk_clip.alpha: must be in [0, 1], got {_fmt(q.alpha)}")
    if cfg.optimizer.name == "muonclip" and not cfg.parallel.distributed_optimizer:
        raise ConfigError("optimizer.name=muonclip needs parallel.distributed_optimizer=true "
                          "(its Muon exchange works on the distributed optimizer's shards)")


def _check_overlap(cfg: K2Config) -> None:
    t = cfg.train
    if t.overlap_param_gather and not cfg.parallel.distributed_optimizer:
        raise ConfigError("train.overlap_param_gather=true needs parallel.distributed_optimizer="
                          "true (without ZeRO-1 there is no parameter all-gather to overlap)")
    if t.overlap_param_gather and t.overlap_grad_reduce is False:
        raise ConfigError("train.overlap_param_gather=true needs train.overlap_grad_reduce=true "
                          "(Megatron-LM's rule, and the only pairing tested)")


def _check_data(cfg: K2Config) -> None:
    """The data section's syntax only: whether the files exist is k2mcore.data.check_data's job
    (presets name data that is absent where `k2m-train --check` runs)."""
    d = cfg.data
    try:
        split = parse_split(d.split)
        if d.blend is not None:
            parse_blend(d.blend)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.train.eval_interval and d.blend is not None and split[1] == 0:
        raise ConfigError(f"train.eval_interval: {cfg.train.eval_interval} needs a valid split, "
                          f"but data.split {d.split!r} gives it no documents (e.g. \"98,2,0\", "
                          f"or train.eval_interval=0)")
    if d.format in ("chat", "rollouts") and d.blend is None and not cfg.rl.prompts:
        also = " or rl.prompts (k2m-rl)" if d.format == "rollouts" else ""
        raise ConfigError(f"data.format: {d.format!r} needs data.blend (k2m-preprocess "
                          f"--{d.format} output){also}; megatron's mock data is text")
    if d.blend is not None and not d.tokenizer:
        raise ConfigError(
            "data.tokenizer: required when data.blend is set (the tokenizer.json or tiktoken "
            "file the data was preprocessed with)"
        )
    if d.packing and d.format == "rollouts":
        raise ConfigError("data.packing: true is not supported with data.format=rollouts "
                          "(one rollout per row; see docs/rl.md)")
    if d.packing and d.format != "chat":
        raise ConfigError(f"data.packing: true needs data.format=chat, got {d.format!r} (text "
                          f"samples are already full train.seq_length windows of documents)")
    if d.format == "rollouts" and cfg.train.eval_interval:
        raise ConfigError(f"train.eval_interval: {cfg.train.eval_interval}, but rollouts have no "
                          f"valid split (every rollout trains, in file order); set it to 0")
    if not d.truncate and d.format != "chat":
        raise ConfigError(f"data.truncate: false applies to data.format=chat only, got "
                          f"{d.format!r} (text documents are always cut into sequences)")


def _check_rl(cfg: K2Config) -> None:
    """The rl section: used with data.format=rollouts only, and consistent with its loss."""
    from dataclasses import fields

    from k2mcore.config.schema import RLConfig

    rl, default = cfg.rl, RLConfig()
    if cfg.data.format != "rollouts":
        changed = [f.name for f in fields(RLConfig)
                   if getattr(rl, f.name) != getattr(default, f.name)]
        if changed:
            raise ConfigError(f"rl.{changed[0]}: set, but data.format is {cfg.data.format!r}; "
                              f"the rl section applies to data.format=rollouts only")
        return
    for key in ("clip_low", "clip_high"):
        value = getattr(rl, key)
        if value is not None and not 0 <= value < (1 if key == "clip_low" else float("inf")):
            raise ConfigError(f"rl.{key}: must be in [0, 1), got {_fmt(value)}" if
                              key == "clip_low" else f"rl.{key}: must be >= 0, got {_fmt(value)}")
    if rl.loss == "k2":
        if rl.tau is None:
            raise ConfigError("rl.tau: required with rl.loss=k2 (the K1.5/K2 objective's "
                              "(r - mean r - tau * log ratio)^2)")
        for key in ("clip_low", "clip_high"):
            if getattr(rl, key) is not None:
                raise ConfigError(f"rl.{key}: rl.loss=k2 has no clipping; leave it null")
        if rl.advantage != default.advantage:
            raise ConfigError(f"rl.advantage: {rl.advantage!r} does not apply to rl.loss=k2 "
                              f"(its target is the reward minus the group mean)")
    elif rl.tau is not None:
        raise ConfigError(f"rl.tau: applies to rl.loss=k2 only, got rl.loss={rl.loss!r}")
    if rl.reference is not None and not rl.kl_coef > 0:
        raise ConfigError(f"rl.reference: {rl.reference!r} is only used by the KL term; set "
                          f"rl.kl_coef > 0 (or leave rl.reference null)")
    if rl.tau is not None and not rl.tau > 0:
        raise ConfigError(f"rl.tau: must be > 0, got {_fmt(rl.tau)}")
    if rl.samples < 2:
        raise ConfigError(f"rl.samples: must be >= 2 (a group needs two answers), got "
                          f"{rl.samples}")
    if rl.max_new_tokens < 1:
        raise ConfigError(f"rl.max_new_tokens: must be >= 1, got {rl.max_new_tokens}")
    if rl.heldout_interval < 0:
        raise ConfigError(f"rl.heldout_interval: must be >= 0, got {rl.heldout_interval}")
    if not rl.sync_bucket_mb > 0:
        raise ConfigError(f"rl.sync_bucket_mb: must be > 0, got {_fmt(rl.sync_bucket_mb)}")
    for key in ("temperature", "temperature_final"):
        value = getattr(rl, key)
        if value is not None and not value > 0:
            raise ConfigError(f"rl.{key}: must be > 0, got {_fmt(value)}")


def _check_model(cfg: K2Config) -> None:
    m = cfg.model
    if m.moe_topk > m.num_experts:
        raise ConfigError(f"model.moe_topk={m.moe_topk} exceeds model.num_experts={m.num_experts}")
    if m.num_experts % m.n_group:
        raise ConfigError(
            f"model.n_group={m.n_group} does not divide model.num_experts={m.num_experts}"
        )
    if m.topk_group > m.n_group:
        raise ConfigError(f"model.topk_group={m.topk_group} exceeds model.n_group={m.n_group}")
    if m.first_k_dense > m.num_layers:
        raise ConfigError(
            f"model.first_k_dense={m.first_k_dense} exceeds model.num_layers={m.num_layers}"
        )
    if cfg.train.seq_length > m.max_position_embeddings:
        raise ConfigError(
            f"train.seq_length={cfg.train.seq_length} exceeds "
            f"model.max_position_embeddings={m.max_position_embeddings}"
        )


def validate(cfg: K2Config) -> None:
    """Check every field of `cfg` that does not depend on the world size (k2mcore.parallel.layout.
    resolve_layout checks the rest); raises ConfigError (one line) naming the field."""
    cfg.parallel.resolve()
    _check_fields(cfg)
    _check_data(cfg)
    _check_rl(cfg)
    _check_model(cfg)
