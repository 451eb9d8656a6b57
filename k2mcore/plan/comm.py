"""The communication term of the planner: bytes one rank moves per training step, by kind.

Pure python (no torch or megatron at import), so `k2m-plan` prices the 1T kimi-k2 preset in
milliseconds. Two conventions, both tests/harness/comm_bytes.py's, which counts real runs
(docs/testing.md, 'Counting bytes'):
- handed over (`comm_bytes`): an all-reduce or a reduce-scatter counts its whole input, an
  all-gather the local shard, an all-to-all its whole input (the split a rank keeps for itself
  included: megatron's dispatcher and MuonClip hand all_to_all_single one tensor holding every
  destination's rows), a broadcast the source's tensor, a point-to-point send what it sends;
- bus bytes (`bus_bytes`, NCCL-tests' convention, what the step time divides by link bandwidth):
  a reduce-scatter N_in(d-1)/d, an all-gather N_out(d-1)/d, an all-reduce 2N(d-1)/d, an
  all-to-all what goes to the other ranks, a broadcast N on every rank, a send N.
A 1-rank group counts nothing in either. One step = zero_grad, megatron's
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
  cp         context parallelism: MLA's latent all-gather per layer, its gradient's
             reduce-scatter (k2mcore's blockwise attention from the gathered latent).
  dp         the DDP buffers' gradient reduce-scatter (fp32) and parameter all-gather (once per
             buffer: k2mcore.compat.param_sync keeps EP's two optimizers apart), the grad
             norm and its group flags over the world, the router expert-bias token counts over
             TP x DP x CP, the loss total and token count over DP.
  optimizer  MuonClip's Newton-Schulz exchanges (two all_to_alls per holder group, when not
             silent), QK-Clip's per-head max-logit all-reduce over DP x CP, and the attention
             report's two all-reduces over the world (also under AdamW, when logits are measured).

Exactness (tests/parity/comm_probe.py against real k2-tiny runs, both conventions): every kind
exact per rank at
1 rank, TP2+SP, PP2xVPP2, EP2, DP2 (ep there within 4%: routing is not uniform). At
TP2xPP2xEP2 (SP, ETP 2, DP 2) pp and dp are exact per rank; tp, ep and the MuonClip exchange are
exact summed over each pipeline stage's ranks, not per rank: with EP > 1 the expert-TP gather /
reduce-scatter carries the rows the EP all-to-all delivered (routing-dependent, like ep), and
at DP > 1 with TP > 1 the Newton-Schulz pieces sit where the owner-aligned shard planner put
them (k2mcore.optim.muonclip.shard_plan), which the even spread assumed here does not follow.

Not modelled: NS offloads (optimizer.muon.ns_offload_budget > 0), tied embeddings'
embedding-group all-reduce, Transformer-Engine's CP ring (the cp kind is k2mcore's latent
exchange). MuonClip's exchange at DP > 1 with TP > 1 (`_muon_exchange`) is
priced spread evenly over DP, as said above.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

KINDS = ("tp", "ep", "pp", "dp", "cp", "optimizer")
FP32, INT32, INT64, FP64 = 4, 4, 8, 8


class _Tally:
    """One kind's bytes on one rank in both conventions (module docstring), collective by
    collective; `d` is the group's size, and a group of one rank adds nothing."""

    def __init__(self) -> None:
        self.handed, self.bus = 0, 0.0

    def reduce_scatter(self, n_in: int, d: int, times: int = 1) -> None:
        if d > 1:
            self.handed += times * n_in
            self.bus += times * n_in * (d - 1) / d

    def all_gather(self, shard: int, d: int, times: int = 1, *, out: Optional[int] = None) -> None:
        if d > 1:
            self.handed += times * shard
            self.bus += times * (shard * d if out is None else out) * (d - 1) / d

    def all_reduce(self, n: int, d: int, times: int = 1) -> None:
        if d > 1:
            self.handed += times * n
            self.bus += times * 2 * n * (d - 1) / d

    def all_to_all(self, n: int, d: int, times: int = 1, *, kept: Optional[int] = None) -> None:
        """`kept`: the split this rank sends itself (default an even one, n / d)."""
        if d > 1:
            self.handed += times * n
            self.bus += times * (n - (n / d if kept is None else kept))

    def broadcast(self, n: int, d: int, source: bool) -> None:
        if d > 1:
            self.handed += n if source else 0
            self.bus += n

    def send(self, n: int) -> None:
        self.handed += n
        self.bus += n


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


def _tokens(cfg: Any, layout: Any) -> int:
    """Tokens of a micro-batch on one rank: its CP share of every sequence."""
    return cfg.train.seq_length * cfg.train.micro_batch_size // layout.cp


def _blockwise(cfg: Any, layout: Any) -> bool:
    """Whether MLA attends blockwise from the gathered latent (k2mcore.model.mla, the local
    spec): at CP > 1, or past model.attention_block_size tokens."""
    return layout.cp > 1 or cfg.train.seq_length > getattr(cfg.model, "attention_block_size",
                                                            cfg.train.seq_length)


# ---------------------------------------------------------------- tensor parallelism
def _tp_bytes(cfg: Any, layout: Any, me: _Rank, a: int, t: _Tally) -> None:
    m = cfg.model
    tp, sp = layout.tp, layout.sp
    h = m.hidden_size
    blockwise = _blockwise(cfg, layout)
    if tp > 1:
        full = _tokens(cfg, layout)  # tokens of a micro-batch
        shard = full // tp if sp else full
        q_in = m.q_lora_rank if m.q_lora_rank is not None else h
        mbs = layout.num_microbatches
        latent = m.kv_lora_rank
        for text, layers in _chunks(cfg, layout, me.pp):
            # MLA's column-parallel up projections' input widths; blockwise, the kv up
            # projection's weight is used per key block and its input (the latent) is gathered
            # over SP once (backward: one reduce-scatter), or all-reduced backward without SP
            col = [q_in] if blockwise else [q_in, latent]
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
                for c in cols:
                    t.all_gather(a * shard * c, tp, 2 * mbs)
                    t.reduce_scatter(a * full * c, tp, mbs)
                t.reduce_scatter(a * full * h, tp, (rows + emb) * mbs)
                t.all_gather(a * shard * h, tp, (rows + emb) * mbs)
                t.all_gather(a * shard * m.qk_rope_head_dim, tp, rope * mbs)
                t.reduce_scatter(a * full * m.qk_rope_head_dim, tp, rope * mbs)
                if blockwise:
                    t.all_gather(a * shard * latent, tp, rope * mbs)
                    t.reduce_scatter(a * full * latent, tp, rope * mbs)
            else:
                # row outputs (and the embedding's) all-reduced forward, column inputs' grads
                # all-reduced backward
                t.all_reduce(a * full * h, tp, (rows + emb) * mbs)
                for c in cols:
                    t.all_reduce(a * full * c, tp, mbs)
                if blockwise:  # the latent and the rope key, replicated over TP
                    t.all_reduce(a * full * (latent + m.qk_rope_head_dim), tp, rope * mbs)
            if "L" in text:
                t.all_reduce(FP32 * full, tp, 3 * mbs)  # vocab-parallel CE: max, target, sum exp
        t.all_reduce(_sp_grad_numel(cfg, layout, me) * FP32, tp)  # main_grads are fp32
        t.all_reduce(2 * FP64, tp)  # the loss total over TP (k2mcore.training.step.loss_totals)
    _moe_tp_bytes(cfg, layout, me, a, t)


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
    """Tokens one rank routes per micro-batch (its CP share, its SP shard of that with SP)."""
    full = _tokens(cfg, layout)
    return full // layout.tp if layout.sp else full


def _moe_layers(cfg: Any, layout: Any, me: _Rank) -> int:
    return sum(_is_moe(cfg, i) for _, layers in _chunks(cfg, layout, me.pp) for i in layers)


def _moe_tp_bytes(cfg: Any, layout: Any, me: _Rank, a: int, t: _Tally) -> None:
    """The alltoall dispatcher's expert-TP gather (tokens, probs) and reduce-scatter (combine,
    in the probs' fp32), forward and backward, under uniform routing."""
    etp = layout.etp
    if etp <= 1:
        return
    h = cfg.model.hidden_size
    rows = _moe_tokens(cfg, layout) * cfg.model.moe_topk  # rows this rank gets from its EP a2a
    n = _moe_layers(cfg, layout, me) * layout.num_microbatches
    t.all_gather(a * rows * h, etp, n)  # forward gather: tokens
    t.all_gather(FP32 * rows, etp, n)  # and probs
    t.reduce_scatter(FP32 * etp * rows * h, etp, n)  # forward combine (fp32)
    t.reduce_scatter(a * etp * rows * h, etp, n)  # backward of the gathers
    t.reduce_scatter(FP32 * etp * rows, etp, n)
    t.all_gather(FP32 * rows * h, etp, n)  # backward of the combine (fp32)


# ---------------------------------------------------------------- expert parallelism
def _ep_bytes(cfg: Any, layout: Any, me: _Rank, a: int, t: _Tally) -> None:
    m = cfg.model
    layers = _moe_layers(cfg, layout, me) * layout.num_microbatches
    if not layers:
        return
    # tokens-per-expert all-gather over TP x EP (int64)
    t.all_gather(INT64 * m.num_experts, layout.ep * layout.etp, layers)
    rows = _moe_tokens(cfg, layout) * m.moe_topk
    # dispatch (tokens, probs) and combine forward; their backward the same sizes
    t.all_to_all(a * rows * m.hidden_size, layout.ep, 4 * layers)
    t.all_to_all(FP32 * rows, layout.ep, 2 * layers)


# ---------------------------------------------------------------- pipeline parallelism
def _pp_bytes(cfg: Any, layout: Any, me: _Rank, a: int, t: _Tally) -> None:
    if layout.pp <= 1:
        return
    h = cfg.model.hidden_size
    tokens = _tokens(cfg, layout)
    tensor = a * (tokens // layout.tp if layout.sp else tokens) * h
    chunks = len(layout.stages[me.pp])
    sends = 0
    for v in range(chunks):
        sends += 0 if (me.pp == layout.pp - 1 and v == chunks - 1) else 1  # activations
        sends += 0 if (me.pp == 0 and v == 0) else 1  # gradients
    t.send(sends * layout.num_microbatches * tensor)
    t.all_reduce(2 * FP64, layout.pp)  # loss total over PP
    # the schedule broadcasts the token count from the last stage
    t.broadcast(INT32, layout.pp, source=me.pp == layout.pp - 1)


# ---------------------------------------------------------------- context parallelism
def _cp_bytes(cfg: Any, layout: Any, me: _Rank, a: int, t: _Tally) -> None:
    """k2mcore's MLA over CP (k2mcore.model.mla): per layer and micro-batch, the all-gather of
    every rank's latent and rotated rope key (kv_lora_rank + qk_rope_head_dim values a token) and,
    in backward, the reduce-scatter of their gradient. (Transformer-Engine's CP ring would pass
    the up-projected K/V instead: benchmarks/bench_cp.py.)"""
    if layout.cp <= 1:
        return
    m = cfg.model
    width = m.kv_lora_rank + m.qk_rope_head_dim
    layers = sum(len(ls) for _, ls in _chunks(cfg, layout, me.pp)) * layout.num_microbatches
    local = a * _tokens(cfg, layout) * width
    t.all_gather(local, layout.cp, layers)
    t.reduce_scatter(local * layout.cp, layout.cp, layers)


# ---------------------------------------------------------------- data parallelism
def _dp_bytes(cfg: Any, layout: Any, me: _Rank, dp_buffers: Optional[Iterable[Sequence]],
              a: int, first_step: bool, t: _Tally) -> None:
    buffers = [tuple(x) for x in (dp_buffers or [])]
    optimizers = _num_distributed_optimizers(cfg, layout)
    for entry in buffers:
        numel, shard, size = entry[:3]
        if cfg.parallel.distributed_optimizer:
            t.reduce_scatter(FP32 * numel, size)  # grad_reduce_in_fp32: the whole bucket
            # the parameter all-gather, once (k2mcore.compat.param_sync)
            t.all_gather(a * shard, size, out=a * numel)
        else:
            t.all_reduce(FP32 * numel, size)
    world = layout.world_size
    t.all_reduce(FP32, world)  # the grad norm over the world
    if first_step:
        t.all_reduce(INT32, world, optimizers)  # has_grad_norm_group flags (cached after)
    if cfg.model.moe_router_bias_update_rate:
        t.all_reduce(FP32 * cfg.model.num_experts, layout.tp * layout.dp * layout.cp,
                     _moe_layers(cfg, layout, me))
    t.all_reduce(2 * FP64, layout.dp * layout.cp)  # loss total (step.loss_totals)
    t.all_reduce(INT32, layout.dp * layout.cp)  # the schedule's token count


def _num_distributed_optimizers(cfg: Any, layout: Any) -> int:
    """megatron chains a dense and an expert DistributedOptimizer when experts have their own
    buffers (EP > 1); at EP = 1 they share the dense buffers and one optimizer."""
    return 2 if layout.ep > 1 and cfg.model.num_experts and cfg.model.num_layers > \
        cfg.model.first_k_dense else 1


# ---------------------------------------------------------------- optimizer (MuonClip)
def _optimizer_bytes(cfg: Any, layout: Any, me: _Rank, a: int, t: _Tally) -> None:
    m = cfg.model
    # attention_report: per-layer max and clipped count (fp64)
    t.all_reduce(FP64 * (m.num_layers + 1), layout.world_size)
    if cfg.optimizer.name != "muonclip":
        return
    layers = sum(len(ls) for _, ls in _chunks(cfg, layout, me.pp))
    if cfg.qk_clip_active and layers:
        t.all_reduce(FP32 * layers * (m.num_attention_heads // layout.tp), layout.dp * layout.cp)
    _muon_exchange(cfg, layout, me, a, t)


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


def _muon_exchange(cfg: Any, layout: Any, me: _Rank, a: int, t: _Tally) -> None:
    """The two all_to_alls of each holder group (k2mcore.optim.muonclip.sharded.ExchangePlan):
    every source piece to its matrix's owner, then every holder's slice of the update back.
    With owner-aligned shards and no TP every piece already sits on its owner (silent: no
    exchange). With TP (DP = 1 per holder group) each TP rank holds a whole shard of a split
    matrix (owner: the least loaded by Newton-Schulz FLOPs) and a full copy of a replicated one
    (TP rank 0 the only source and the owner)."""
    ns = getattr(cfg.optimizer.muon, "ns_dtype", "auto")
    wire = {"fp32": 4, "bf16": 2}.get(ns, a)
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
        send = back = kept = 0  # kept: what this rank's own all_to_all splits hold
        for (r, c, _, sharded), o in zip(mats, owner):
            numel = r * c
            if sharded:
                send += numel // tp
                back += numel if o == rank else 0
                kept += 2 * (numel // tp) if o == rank else 0  # its own piece, both ways
            else:
                send += numel if rank == 0 else 0
                back += tp * numel if o == rank else 0
                kept += (numel if rank == 0 == o else 0) + (numel if o == rank else 0)  # to, back
        # DP > 1: an even spread assumed (not exact); the a2a size must stay positive
        t.all_to_all(wire * (send + back) // dp, tp, kept=wire * kept // dp)


# ---------------------------------------------------------------- API
def _tallies(cfg: Any, layout: Any, rank: Optional[dict], dp_buffers: Optional[Iterable[Sequence]],
             dtype_bytes: int, first_step: bool) -> dict[str, _Tally]:
    me = _coords(layout, rank)
    a = dtype_bytes
    out = {k: _Tally() for k in KINDS}
    _tp_bytes(cfg, layout, me, a, out["tp"])
    _ep_bytes(cfg, layout, me, a, out["ep"])
    _pp_bytes(cfg, layout, me, a, out["pp"])
    _dp_bytes(cfg, layout, me, dp_buffers, a, first_step, out["dp"])
    _cp_bytes(cfg, layout, me, a, out["cp"])
    _optimizer_bytes(cfg, layout, me, a, out["optimizer"])
    return out


def comm_bytes(cfg: Any, layout: Any, *, rank: Optional[dict] = None,
               dp_buffers: Optional[Iterable[Sequence]] = None, dtype_bytes: int = 2,
               first_step: bool = True) -> dict[str, int]:
    """{kind: bytes} one rank hands to collectives and p2p sends in one training step.

    `rank`: its coordinates {"pp", "tp", "ep", "dp"} (default all 0; `busiest` for the max).
    `dp_buffers`: per DDP bucket of this rank (buffer numel, this rank's shard numel, DP group
    size) until k2mcore.plan.state gives them; without them the DP term has only its small
    collectives. `dtype_bytes`: activations and parameters (bf16 = 2; CPU runs fp32 = 4)."""
    got = _tallies(cfg, layout, rank, dp_buffers, dtype_bytes, first_step)
    return {k: v.handed for k, v in got.items()}


def bus_bytes(cfg: Any, layout: Any, *, rank: Optional[dict] = None,
              dp_buffers: Optional[Iterable[Sequence]] = None, dtype_bytes: int = 2,
              first_step: bool = True) -> dict[str, float]:
    """{kind: bus bytes} of the same step (module docstring; comm_bytes' arguments)."""
    got = _tallies(cfg, layout, rank, dp_buffers, dtype_bytes, first_step)
    return {k: v.bus for k, v in got.items()}


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
