"""The parallel layout of a run: resolved once from the config and the world size, validated
against megatron-core 0.19.2's rules, then carried by the run (process groups, data-parallel
split, microbatches, checkpoint metadata). No torch or megatron imports: `k2m-train --check` and
`k2m-plan` resolve layouts for 1T-parameter presets in a fraction of a second.

Config fields that do not depend on the world size are checked by k2mcore.config.validate first;
the rules here are those of the layout: divisibility of the model's dimensions by the parallel
sizes, the world size by the model-parallel products, the batch by data parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

from k2mcore.config.schema import K2Config
from k2mcore.config.validate import validate
from k2mcore.errors import ConfigError

from .pipeline import pipeline_stages


def megatron_sizes(sizes: Any) -> dict:
    """The parallel sizes under megatron's keyword names, shared by initialize_model_parallel and
    TransformerConfig; `sizes`: a Layout or a ParallelConfig (anything with tp/pp/cp/ep/etp)."""
    return {"tensor_model_parallel_size": sizes.tp, "pipeline_model_parallel_size": sizes.pp,
            "context_parallel_size": sizes.cp, "expert_model_parallel_size": sizes.ep,
            "expert_tensor_parallel_size": sizes.etp}


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    pp: int
    vpp: Optional[int]  # as megatron resolves it: None = no interleaving
    ep: int
    etp: int
    cp: int
    dp: int
    expert_dp: int  # world / (etp * ep * pp): replicas of each expert shard
    sp: bool
    num_microbatches: int  # per step and data-parallel rank
    stages: list[list[str]]  # [pp_rank][vp_stage] -> megatron layout chars, e.g. "Et"
    layers: list[list[int]]  # [pp_rank][vp_stage] -> decoder layers in that chunk
    embedding_stage: tuple[int, int]  # (pp_rank, vp_stage)
    loss_stage: tuple[int, int]

    def sizes(self) -> dict:
        """The parallel sizes, as a checkpoint records the layout it was saved in."""
        return {"world_size": self.world_size, "tp": self.tp, "pp": self.pp, "vpp": self.vpp,
                "ep": self.ep, "etp": self.etp, "cp": self.cp, "dp": self.dp, "sp": self.sp}

    def layer_ids(self, pp_rank: int, vp_stage: int = 0) -> list[int]:
        """Global decoder-layer numbers held by one chunk (chunks run vp-major, then pp rank)."""
        offset = sum(self.layers[r][v] for v in range(vp_stage) for r in range(self.pp))
        offset += sum(self.layers[r][vp_stage] for r in range(pp_rank))
        return list(range(offset, offset + self.layers[pp_rank][vp_stage]))

    def describe_stages(self) -> str:
        """Compact per-rank summary, identical neighbouring ranks merged: `pp0: [E+1, 2] ...`."""

        def chunk(text: str) -> str:
            n = text.count("t")
            parts = (["E"] if "E" in text else []) + ([str(n)] if n or text == "" else [])
            return "+".join(parts + (["L"] if "L" in text else []))

        rows = [f"[{', '.join(chunk(s) for s in ranks)}]" for ranks in self.stages]
        out, start = [], 0
        for r in range(1, self.pp + 1):
            if r == self.pp or rows[r] != rows[start]:
                name = f"pp{start}" if r - 1 == start else f"pp{start}-{r - 1}"
                out.append(f"{name}: {rows[start]}")
                start = r
        return "  ".join(out)


def _divides(divisor_desc: str, divisor: int, pairs: Iterable[tuple[str, int]]) -> None:
    """Each (key, value) must be divisible by `divisor` (megatron's `divide` asserts)."""
    for key, value in pairs:
        if value % divisor:
            raise ConfigError(f"{key}={value} is not divisible by {divisor_desc}={divisor}")


def _check_parallel(cfg: K2Config) -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    has_moe = m.first_k_dense < m.num_layers
    if p.sp and p.tp == 1:
        raise ConfigError("parallel.sp=true requires parallel.tp > 1 (got tp=1)")
    if m.num_attention_heads % p.tp:
        raise ConfigError(
            f"parallel.tp={p.tp} does not divide model.num_attention_heads={m.num_attention_heads}"
        )
    if has_moe and m.num_experts % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} does not divide model.num_experts={m.num_experts}")
    # TP-split dimensions (megatron's Column/RowParallelLinear and VocabParallelEmbedding divide
    # them; the q/kv down-projections are replicated).
    tp_dims = [("model.vocab_size", m.vocab_size), ("model.ffn_hidden_size", m.ffn_hidden_size)]
    if has_moe and m.num_shared_experts:
        tp_dims.append(("model.num_shared_experts * model.moe_ffn_hidden_size",
                        m.num_shared_experts * m.moe_ffn_hidden_size))
    _divides("parallel.tp", p.tp, tp_dims)
    if has_moe:
        _divides("parallel.etp", p.etp, [("model.moe_ffn_hidden_size", m.moe_ffn_hidden_size)])
        if p.ep == 1 and p.etp != p.tp:
            # megatron reduces expert grads over the expert-DP group only when ep > 1; with
            # ep=1 the TP ranks' token shards would each train their own expert copy.
            raise ConfigError(
                f"parallel.etp={p.etp} with parallel.ep=1 must equal parallel.tp={p.tp} "
                f"(or use parallel.ep>1)"
            )
        if p.tp > 1 and not p.sp:  # MoELayer.forward raises this during training
            raise ConfigError(
                f"parallel.sp=false: MoE layers with parallel.tp={p.tp} need sequence parallelism "
                f"(set parallel.sp=true)"
            )
    if p.sp and t.seq_length % (p.tp * p.cp):
        raise ConfigError(
            f"train.seq_length={t.seq_length} is not divisible by parallel.tp*cp={p.tp * p.cp} "
            f"(sequence parallelism splits each context-parallel shard over tp)"
        )
    if p.cp > 1 and t.seq_length % (2 * p.cp):
        raise ConfigError(
            f"train.seq_length={t.seq_length} is not divisible by 2*parallel.cp={2 * p.cp} "
            f"(context parallelism splits the sequence into 2*cp load-balanced chunks)"
        )
    if p.vpp is not None and p.pp == 1:
        raise ConfigError(f"parallel.vpp={p.vpp} requires parallel.pp > 1 (got pp=1)")


def resolve_layout(cfg: K2Config, world_size: int) -> Layout:
    """Validate `cfg` for `world_size` ranks and return its parallel layout, the one the run
    carries (process groups, data-parallel split, microbatches, checkpoint metadata).

    Raises ConfigError (one line) if `cfg` cannot run on `world_size` ranks.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world size must be a positive integer, got {world_size!r}")
    validate(cfg)
    _check_parallel(cfg)
    p, t = cfg.parallel, cfg.train

    stages, vpp = pipeline_stages(cfg.model, p)
    if vpp is not None and p.pp == 1:
        raise ConfigError(
            f"parallel.pipeline_layout={p.pipeline_layout!r} gives {vpp} virtual stages, "
            f"which require parallel.pp > 1 (got pp=1)"
        )

    model_size = p.tp * p.pp * p.cp
    if world_size % model_size:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp*pp*cp = "
            f"{p.tp}*{p.pp}*{p.cp} = {model_size}"
        )
    expert_size = p.etp * p.ep * p.pp  # megatron: world % (etp*ep*pp), expert-DP is the rest
    if world_size % expert_size:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.etp*ep*pp = "
            f"{p.etp}*{p.ep}*{p.pp} = {expert_size}"
        )
    dp = world_size // model_size
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size*dp = {t.micro_batch_size}*{dp} = {t.micro_batch_size * dp}"
        )
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    # Interleaved 1F1B (megatron's default microbatch_group_size_per_vp_stage = pp) needs the
    # number of microbatches to be a multiple of pp.
    if vpp is not None and microbatches % p.pp:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size}: {microbatches} microbatches per step "
            f"(global_batch_size / (micro_batch_size*dp={t.micro_batch_size * dp})) must be a "
            f"multiple of parallel.pp={p.pp} for the interleaved schedule (vpp={vpp})"
        )

    def find(char: str) -> tuple[int, int]:
        return next((r, v) for r in range(p.pp) for v, s in enumerate(stages[r]) if char in s)

    return Layout(
        world_size=world_size, tp=p.tp, pp=p.pp, vpp=vpp, ep=p.ep, etp=p.etp, cp=p.cp,
        dp=dp, expert_dp=world_size // expert_size, sp=p.sp, num_microbatches=microbatches,
        stages=stages, layers=[[s.count("t") for s in ranks] for ranks in stages],
        embedding_stage=find("E"), loss_stage=find("L"),
    )
