"""The communication term of the planner: bytes one rank hands to collectives per training step.

Pure python (no torch or megatron at import), so `k2m-plan` prices the 1T kimi-k2 preset in
milliseconds. The accounting is tests/harness/comm_bytes.py's, which counts real runs: an all-reduce
or a reduce-scatter counts its whole input, an all-gather the local shard, an all-to-all its whole
input (the split a rank keeps for itself included: megatron's dispatcher and MuonClip hand
all_to_all_single one tensor holding every destination's rows), a broadcast the source's tensor, a
point-to-point send what it sends; a 1-rank group counts nothing. One step = zero_grad, megatron's
forward/backward schedule (k2mcore.training.step.forward_backward, with the DDP gradient
reduce-scatter in finalize_model_grads), optimizer.step (the parameter all-gather) and
k2mcore.training.metrics.attention_report; the first step of a run (megatron caches one flag
exchange of the optimizer after it: `first_step`).

Kinds:
  tp         tensor parallelism: SP all-gathers / reduce-scatters (or, without SP, all-reduces)
             of the linears, MLA's rotary-key gather, the vocab-parallel embedding and
             cross-entropy, the MoE dispatcher's expert-TP gather / reduce-scatter, the TP
             all-reduce of the replicated (SP-marked, q_layernorm) weights' gradients, the loss
             total over TP.
  ep         the alltoall dispatcher's all-to-alls (tokens and probs, forward and backward) under
             uniform routing (dropless: no capacity factor, which k2mcore's config never sets)
             and its tokens-per-expert all-gather over TP x EP.
  pp         pipeline p2p sends (activations forward, gradients backward; megatron's
             batch_isend_irecv on NCCL, the unbatched isends on gloo: the same tensors, no shape
             exchange since variable_seq_lengths is off), the loss total over PP and the
             schedule's token-count broadcast from the last stage.
  dp         the DDP buffers' gradient reduce-scatter (fp32) and parameter all-gather (once per
             buffer: k2mcore.compat.param_sync keeps EP's two optimizers apart), the grad
             norm and its group flags over the world, the router expert-bias token counts over
             TP x DP x CP, the loss total and token count over DP.
  optimizer  MuonClip's Newton-Schulz exchanges (two all_to_alls per holder group, when not
             silent), QK-Clip's per-head max-logit all-reduce over DP x CP, and the attention
             report's two all-reduces over the world (also under AdamW, when logits are measured).

Exactness (tests/parity/comm_probe.py against real k2-tiny runs): every kind exact per rank at
1 rank, TP2+SP, PP2xVPP2, EP2, DP2 (ep there within 4%: routing is not uniform). At
TP2xPP2xEP2 (SP, ETP 2, DP 2) pp and dp are exact per rank; tp, ep and the MuonClip exchange are
exact summed over each pipeline stage's ranks, not per rank: with EP > 1 the expert-TP gather /
reduce-scatter carries the rows the EP all-to-all delivered (routing-dependent, like ep), and
at DP > 1 with TP > 1 the Newton-Schulz pieces sit where the owner-aligned shard planner put
them (k2mcore.optim.muonclip.shard_plan), which the even spread assumed here does not follow.

Not modelled: NS offloads (optimizer.muon.ns_offload_budget > 0), CP > 1, tied embeddings'
embedding-group all-reduce. MuonClip's exchange at DP > 1 with TP > 1 (`_muon_exchange`) is
priced spread evenly over DP, as said above.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

KINDS = ("tp", "ep", "pp", "dp", "optimizer")
FP32, INT32, INT64, FP64 = 4, 4, 8, 8


@dataclass(frozen=True)
class _Rank:
    pp: int
    tp: int
    ep: int
    dp: int


def _coords(layout: Any, rank: Optional[dict]) -> _Rank:
    r = rank or {}
    return _Rank(pp=int(r.get("pp", 0)), tp=int(r.get("tp", 0)), ep=int(r.get("ep", 0)),
                 dp=int(r.get("dp", 0)))


def _chunks(cfg: Any, layout: Any, pp_rank: int) -> list[tuple[str, list[int]]]:
    """[(layout chars, global layer ids)] of this pipeline rank's virtual chunks."""
    return [(text, layout.layer_ids(pp_rank, v))
            for v, text in enumerate(layout.stages[pp_rank])]


def _is_moe(cfg: Any, layer: int) -> bool:
    return layer >= cfg.model.first_k_dense and cfg.model.num_experts > 0


# ---------------------------------------------------------------- tensor parallelism
def _tp_bytes(cfg: Any, layout: Any, me: _Rank, a: int) -> int:
    m, t = cfg.model, cfg.train
    tp, sp = layout.tp, layout.sp
    s, b, h = t.seq_length, t.micro_batch_size, m.hidden_size
    n = 0
    if tp > 1:
        full = s * b  # tokens of a micro-batch
        shard = full // tp if sp else full
        q_in = m.q_lora_rank if m.q_lora_rank is not None else h
        per_mb = 0
        for text, layers in _chunks(cfg, layout, me.pp):
            col = [q_in, m.kv_lora_rank]  # MLA's column-parallel up projections' input widths
            cols = []  # every column-parallel linear's input width
            rows = 0  # row-parallel linears (output h)
            rope = 0
            for i in layers:
                cols += col
                rows += 1  # linear_proj
                rope += 1
                if _is_moe(cfg, i):
                    if m.num_shared_experts:
                        cols.append(h)
                        rows += 1
                else:
                    cols.append(h)
                    rows += 1
            if "L" in text:
                cols.append(h)  # the output layer (vocab-parallel column linear)
            emb = 1 if "E" in text else 0
            if sp:
                # column: forward gather, backward re-gather (for the weight grad) + input-grad
                # reduce-scatter; row: forward reduce-scatter, backward gather; the embedding
                # reduce-scatters its output like a row linear; MLA gathers its rotary key
                per_mb += sum(a * shard * c * 2 + a * full * c for c in cols)
                per_mb += (rows + emb) * (a * full * h + a * shard * h)
                per_mb += rope * (a * shard * m.qk_rope_head_dim + a * full * m.qk_rope_head_dim)
            else:
                # row outputs (and the embedding's) all-reduced forward, column inputs' grads
                # all-reduced backward
                per_mb += (rows + emb) * a * full * h + sum(a * full * c for c in cols)
            if "L" in text:
                per_mb += 3 * FP32 * full  # vocab-parallel CE: max, target logit, sum of exp
        n += per_mb * layout.num_microbatches
        n += _sp_grad_numel(cfg, layout, me) * FP32  # main_grads are fp32
        n += 2 * FP64  # the loss total over TP (k2mcore.training.step.loss_totals)
    n += _moe_tp_bytes(cfg, layout, me, a)
    return n


def _sp_grad_numel(cfg: Any, layout: Any, me: _Rank) -> int:
    """Gradient elements finalize_model_grads all-reduces over TP: the SP-marked replicated
    weights (norms, MLA down projections, router) with SP, the q_layernorm weights always
    (megatron matches 'q_layernorm' by name when qk_layernorm is on; MLA's kv_layernorm is not
    matched)."""
    m, h = cfg.model, cfg.model.hidden_size
    n = 0
    for text, layers in _chunks(cfg, layout, me.pp):
        for i in layers:
            if layout.sp:
                n += 2 * h + m.kv_lora_rank + h * (m.kv_lora_rank + m.qk_rope_head_dim)
                if m.q_lora_rank is not None:
                    n += m.q_lora_rank + h * m.q_lora_rank
                if _is_moe(cfg, i):
                    n += m.num_experts * h
            elif m.q_lora_rank is not None:
                n += m.q_lora_rank
        if "L" in text and layout.sp:
            n += h
    return n


def _moe_tokens(cfg: Any, layout: Any) -> int:
    """Tokens one rank routes per micro-batch (its SP shard with SP)."""
    t = cfg.train
    full = t.seq_length * t.micro_batch_size
    return full // layout.tp if layout.sp else full


def _moe_layers(cfg: Any, layout: Any, me: _Rank) -> int:
    return sum(_is_moe(cfg, i) for _, layers in _chunks(cfg, layout, me.pp) for i in layers)


def _moe_tp_bytes(cfg: Any, layout: Any, me: _Rank, a: int) -> int:
    """The alltoall dispatcher's expert-TP gather (tokens, probs) and reduce-scatter (combine,
    in the probs' fp32), forward and backward, under uniform routing."""
    etp = layout.etp
    if etp <= 1:
        return 0
    h = cfg.model.hidden_size
    rows = _moe_tokens(cfg, layout) * cfg.model.moe_topk  # rows this rank gets from its EP a2a
    per_layer = (a * rows * h + FP32 * rows          # forward gather: tokens, probs
                 + FP32 * etp * rows * h             # forward combine reduce-scatter (fp32)
                 + a * etp * rows * h + FP32 * etp * rows  # backward of the gathers
                 + FP32 * rows * h)                  # backward of the combine: gather (fp32)
    return per_layer * _moe_layers(cfg, layout, me) * layout.num_microbatches


# ---------------------------------------------------------------- expert parallelism
def _ep_bytes(cfg: Any, layout: Any, me: _Rank, a: int) -> int:
    m = cfg.model
    layers = _moe_layers(cfg, layout, me) * layout.num_microbatches
    if not layers:
        return 0
    n = 0
    if layout.ep * layout.etp > 1:  # tokens-per-expert all-gather over TP x EP (int64)
        n += INT64 * m.num_experts * layers
    if layout.ep > 1:
        rows = _moe_tokens(cfg, layout) * m.moe_topk
        # dispatch (tokens, probs) and combine forward; their backward the same sizes
        n += 2 * (2 * a * rows * m.hidden_size + FP32 * rows) * layers
    return n


# ---------------------------------------------------------------- pipeline parallelism
def _pp_bytes(cfg: Any, layout: Any, me: _Rank, a: int) -> int:
    if layout.pp <= 1:
        return 0
    t, h = cfg.train, cfg.model.hidden_size
    s = t.seq_length // layout.tp if layout.sp else t.seq_length
    tensor = a * s * t.micro_batch_size * h
    chunks = len(layout.stages[me.pp])
    sends = 0
    for v in range(chunks):
        sends += 0 if (me.pp == layout.pp - 1 and v == chunks - 1) else 1  # activations
        sends += 0 if (me.pp == 0 and v == 0) else 1  # gradients
    n = sends * layout.num_microbatches * tensor
    n += 2 * FP64  # loss total over PP
    if me.pp == layout.pp - 1:
        n += INT32  # the schedule broadcasts the token count from the last stage
    return n


# ---------------------------------------------------------------- data parallelism
def _dp_bytes(cfg: Any, layout: Any, me: _Rank, dp_buffers: Optional[Iterable[Sequence]],
              a: int, first_step: bool) -> int:
    n = 0
    buffers = [tuple(x) for x in (dp_buffers or [])]
    optimizers = _num_distributed_optimizers(cfg, layout)
    for entry in buffers:
        numel, shard, size = entry[:3]
        if size > 1:
            n += FP32 * numel  # grad_reduce_in_fp32: the whole bucket
            n += a * shard  # the parameter all-gather, once (k2mcore.compat.param_sync)
    if layout.world_size > 1:
        n += FP32  # the grad norm over the world
        if first_step:
            n += optimizers * INT32  # has_grad_norm_group flags (cached after the first step)
    if layout.tp * layout.dp * layout.cp > 1 and cfg.model.moe_router_bias_update_rate:
        n += FP32 * _moe_layers(cfg, layout, me) * cfg.model.num_experts
    if layout.dp * layout.cp > 1:
        n += 2 * FP64 + INT32  # loss total (step.loss_totals) and the schedule's token count
    return n


def _num_distributed_optimizers(cfg: Any, layout: Any) -> int:
    """megatron chains a dense and an expert DistributedOptimizer when experts have their own
    buffers (EP > 1); at EP = 1 they share the dense buffers and one optimizer."""
    return 2 if layout.ep > 1 and cfg.model.num_experts and cfg.model.num_layers > \
        cfg.model.first_k_dense else 1


# ---------------------------------------------------------------- optimizer (MuonClip)
def _optimizer_bytes(cfg: Any, layout: Any, me: _Rank, a: int) -> int:
    m = cfg.model
    n = 0
    if layout.world_size > 1:  # attention_report: per-layer max and clipped count (fp64)
        n += FP64 * (m.num_layers + 1)
    if cfg.optimizer.name != "muonclip":
        return n
    layers = sum(len(ls) for _, ls in _chunks(cfg, layout, me.pp))
    if cfg.qk_clip_active and layout.dp * layout.cp > 1 and layers:
        n += FP32 * layers * (m.num_attention_heads // layout.tp)
    n += _muon_exchange(cfg, layout, me, a)
    return n


def _ns_flops(p: int, q: int, steps: int = 5) -> int:
    p, q = min(p, q), max(p, q)
    return steps * (4 * p * p * q + 2 * p ** 3)


def _balance(costs: Sequence[int], size: int, candidates: Sequence[Optional[Sequence[int]]]):
    """k2mcore.optim.muonclip.sharded.balance with candidates (longest job first, ties by index,
    then rank)."""
    owner, loads = [0] * len(costs), [0] * size
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(candidates[i] or range(size), key=lambda r: (loads[r], r))
        owner[i] = r
        loads[r] += costs[i]
    return owner


def _muon_matrices(cfg: Any, layout: Any, me: _Rank, expert: bool) -> list[tuple]:
    """(full rows, cols, split_rows, tp-sharded) of the Muon matrices one optimizer steps on
    this rank, in the model's parameter order."""
    m, h = cfg.model, cfg.model.hidden_size
    mu = cfg.optimizer.muon
    heads = m.num_attention_heads
    q_head = m.qk_nope_head_dim + m.qk_rope_head_dim
    gate = 2 if mu.split_gated else 1
    out = []
    shared_experts = layout.ep == 1  # at EP = 1 the experts ride in the dense optimizer
    for _, layers in _chunks(cfg, layout, me.pp):
        for i in layers:
            if not expert:
                if m.q_lora_rank is None:
                    out.append((heads * q_head, h, 1, True))
                else:
                    out += [(m.q_lora_rank, h, 1, False), (heads * q_head, m.q_lora_rank, 1, True)]
                out += [(m.kv_lora_rank + m.qk_rope_head_dim, h, 1, False),
                        (heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank, 1, True),
                        (h, heads * m.v_head_dim, 1, True)]
            if not _is_moe(cfg, i):
                if not expert:
                    out += [(2 * m.ffn_hidden_size, h, gate, True), (h, m.ffn_hidden_size, 1, True)]
                continue
            if not expert and mu.router_in_muon:
                out.append((m.num_experts, h, 1, False))
            if expert or shared_experts:
                local = m.num_experts // layout.ep
                out += [(2 * m.moe_ffn_hidden_size, h, gate, True),
                        (h, m.moe_ffn_hidden_size, 1, True)] * local
            if not expert and m.num_shared_experts:
                f = m.num_shared_experts * m.moe_ffn_hidden_size
                out += [(2 * f, h, gate, True), (h, f, 1, True)]
    return out


def _muon_exchange(cfg: Any, layout: Any, me: _Rank, a: int) -> int:
    """The two all_to_alls of each holder group (k2mcore.optim.muonclip.sharded.ExchangePlan):
    every source piece to its matrix's owner, then every holder's slice of the update back.
    With owner-aligned shards and no TP every piece already sits on its owner (silent: no
    exchange). With TP (DP = 1 per holder group) each TP rank holds a whole shard of a split
    matrix (owner: the least loaded by Newton-Schulz FLOPs) and a full copy of a replicated one
    (TP rank 0 the only source and the owner)."""
    ns = getattr(cfg.optimizer.muon, "ns_dtype", "auto")
    wire = {"fp32": 4, "bf16": 2}.get(ns, a)
    n = 0
    for expert in (False, True):
        if expert and layout.ep == 1:
            continue  # one optimizer at EP = 1
        tp, rank = (layout.etp, me.tp % layout.etp) if expert else (layout.tp, me.tp)
        dp = layout.expert_dp if expert else layout.dp * layout.cp
        if tp == 1:
            continue  # silent (owner-aligned shards) or one rank
        mats = _muon_matrices(cfg, layout, me, expert)
        if not mats:
            continue
        costs = [k * _ns_flops(r // k, c) for r, c, k, _ in mats]
        cands = [None if sharded else [0] for *_, sharded in mats]
        owner = _balance(costs, tp, cands)
        send = back = 0
        for (r, c, _, sharded), o in zip(mats, owner):
            numel = r * c
            if sharded:
                send += numel // tp
                back += numel if o == rank else 0
            else:
                send += numel if rank == 0 else 0
                back += tp * numel if o == rank else 0
        n += wire * (send + back) // dp  # DP > 1: an even spread assumed (not exact)
    return n


# ---------------------------------------------------------------- API
def comm_bytes(cfg: Any, layout: Any, *, rank: Optional[dict] = None,
               dp_buffers: Optional[Iterable[Sequence]] = None, dtype_bytes: int = 2,
               first_step: bool = True) -> dict[str, int]:
    """{kind: bytes} one rank hands to collectives and p2p sends in one training step.

    `rank`: its coordinates {"pp", "tp", "ep", "dp"} (default all 0; `busiest` for the max).
    `dp_buffers`: per DDP bucket of this rank (buffer numel, this rank's shard numel, DP group
    size) until k2mcore.plan.state gives them; without them the DP term has only its small
    collectives. `dtype_bytes`: activations and parameters (bf16 = 2; CPU runs fp32 = 4)."""
    me = _coords(layout, rank)
    a = dtype_bytes
    return {"tp": _tp_bytes(cfg, layout, me, a), "ep": _ep_bytes(cfg, layout, me, a),
            "pp": _pp_bytes(cfg, layout, me, a),
            "dp": _dp_bytes(cfg, layout, me, dp_buffers, a, first_step),
            "optimizer": _optimizer_bytes(cfg, layout, me, a)}


def ranks(layout: Any) -> list[dict]:
    """Every distinct rank position (pp, tp, ep, dp) of the layout."""
    return [{"pp": p, "tp": t, "ep": e, "dp": d} for p in range(layout.pp)
            for t in range(layout.tp) for e in range(layout.ep) for d in range(layout.dp)]


def busiest(cfg: Any, layout: Any, *, dp_buffers_of=None, dtype_bytes: int = 2,
            first_step: bool = True) -> dict[str, int]:
    """comm_bytes of the rank handing over the most bytes in total. `dp_buffers_of(rank)`:
    that rank's buffers (optional)."""
    best = None
    for r in ranks(layout):
        got = comm_bytes(cfg, layout, rank=r, dtype_bytes=dtype_bytes, first_step=first_step,
                         dp_buffers=dp_buffers_of(r) if dp_buffers_of else None)
        if best is None or sum(got.values()) > sum(best.values()):
            best = got
    return best
