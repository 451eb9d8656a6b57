"""Activation memory per pipeline rank: the bytes autograd saves for backward, at the peak of
megatron-core 0.19.2's schedule (k2m-plan's activation term).

Pure python (no torch, no megatron): milliseconds for the 1T preset. Every term below names the
op that saves it; the model was worked out against tests/harness/saved_bytes.py (which counts unique
storages passed to autograd's saved-tensor hooks, parameters excluded) on k2-tiny and a widened
variant, every layout of tests/parity/activation_probe.py (see its docstring for the table).

Shapes: b = train.micro_batch_size, s = train.seq_length / cp (a rank's tokens of each sequence
under context parallelism); the hidden stream holds s/tp tokens per rank with sequence
parallelism (layout.sp), s otherwise; attention, the MLP's and experts' intermediates and the
logits hold all s tokens and 1/tp of the heads / ffn / vocab. k2mcore's blockwise attention (the
local spec at CP > 1 or past model.attention_block_size tokens) also keeps the latent of the
whole sequence, and has one key block's K/V and a logits tile as its workspace.

Routing assumption: UNIFORM. A rank's local experts process b*s*topk routed tokens (with EP
each EP rank's share of the group's b*s*topk*ep assignments; with TP+SP the dispatcher
all-gathers the TP ranks' tokens back to b*s). Measured routing is not uniform: the experts'
terms on one rank move with its actual token count (`routed_tokens` overrides it).

Not modelled (not saved tensors): the schedule's own references to stage inputs/outputs, the
pipeline's p2p buffers, gradients, the optimizer, allocator fragmentation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class StageActivations:
    pp_rank: int
    per_chunk: list[int]  # bytes saved for backward by ONE micro-batch in each virtual chunk
    in_flight: list[int]  # micro-batches of each chunk alive at this rank's peak
    transient: int  # extra bytes live only during a backward (recompute's re-saved tensors)
    total: int  # peak = sum(per_chunk[c] * in_flight[c]) + transient


@dataclass(frozen=True)
class _Layer:
    kept: int  # saved by the forward, alive until this layer's backward
    extra: int  # more bytes alive at the peak of this layer's backward (recompute)


@dataclass(frozen=True)
class _Dims:
    b: int
    s: int  # this rank's tokens of a sequence: the sequence over cp
    t: int  # hidden-stream tokens per rank: b * s / tp with SP, b * s without
    tp: int
    etp: int
    d: int  # activation dtype bytes
    probe: bool
    attention: str
    cp: int = 1
    seq: int = 0  # the whole sequence (every CP rank's tokens)
    block: int = 0  # blockwise attention's key block and query tile; 0: not blockwise


def _norm(t: int, width: int, d: int, x_bytes: Optional[int] = None) -> tuple[int, int, int]:
    """k2mcore RMSNorm (fp32 math): (x32, rsqrt, normalized) saved bytes. x32 is the input
    itself in fp32 (`x.float()` a no-op; then `x_bytes`, the input's storage, counts), a fp32
    copy otherwise; `weight * x_hat` saves x_hat in the activation dtype."""
    x32 = (x_bytes if x_bytes is not None else t * width * 4) if d == 4 else t * width * 4
    return x32, t * 4, t * width * d


K2_SELECTIVE = frozenset({"layernorm", "mla_up_proj", "mlp", "moe"})


def _modules(cfg) -> frozenset:
    """The selective recompute set (train.recompute_modules; None: K2's). Modules this model
    does not price (core_attn, moe_act, shared_experts) are counted as kept: an upper bound."""
    text = getattr(cfg.train, "recompute_modules", None)
    if text is None:
        return K2_SELECTIVE
    return frozenset(x.strip() for x in text.split(",") if x.strip())


def _attention(m, k: _Dims, recompute: str, mods: frozenset = K2_SELECTIVE
               ) -> tuple[int, int]:
    """(kept, backward extra) of one MLA attention block, input layernorm included; the extra
    includes the blockwise attention's workspace, which is not saved for backward."""
    b, s, t, d, tp = k.b, k.s, k.t, k.d, k.tp
    h, n = m.hidden_size, m.num_attention_heads // tp
    dqk, dv, dr = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim, m.qk_rope_head_dim
    qr, kvr = m.q_lora_rank, m.kv_lora_rank
    x_in = t * h * d  # the layer's input (residual stream)
    norm_in = _norm(t, h, d, x_in)
    y = t * h * d  # input_layernorm output: saved by the q/kv down projections (F.linear)
    q_lat = _norm(t, qr, d) if qr else (0, 0, 0)  # q_down output normed; x32 = q_down's output
    q_up_in = t * qr * d if qr else 0  # linear_q_up_proj saves its (local) input
    kv_comb = t * (kvr + dr) * d  # linear_kv_down_proj output [t, kvr + dr]
    kv_lat = _norm(t, kvr, d, kv_comb)  # its kv part is a view of kv_comb
    kv_up_in = t * kvr * d
    rope = 4 * s * dr * d  # cos/sin [s, 1, 1, dr] for q and for k (rope_utils, b-independent)
    # k_pos_emb: all-gathered over TP with SP (a new tensor); otherwise a view of kv_comb
    k_pos = b * s * dr * d if (tp > 1 and k.t != b * s) else (0 if d == 4 else kv_comb)
    proj_in = b * s * n * dv * d  # linear_proj (row parallel) input: core attention output
    if k.block:
        # k2mcore.model.blockwise (CP, or a sequence longer than a block on the local spec):
        # linear_kv_up_proj is not called (its weight is used per block); the function saves
        # the roped query, the latent and rope key gathered over SP and CP (one tensor of the
        # whole sequence), its output and the fp32 log-sum-exp; the gather order's index
        kv_up_in = 0
        qkv = 0
        core = (b * s * n * dqk * d + b * k.seq * (kvr + dr) * d + b * n * s * dv * d
                + b * n * s * 4 + (k.seq * 8 if k.cp > 1 else 0))
    elif k.attention == "fused":
        # TE fused attention: q, k, v (MLA pads v to the qk head dim), softmax stats (fp32);
        # its output is linear_proj's input
        qkv = b * s * n * (2 * dqk + max(dv, dqk)) * d
        core = b * n * s * 4
    else:
        # local: query/key are not saved, the SDPA math path's scaled copies are;
        # v [b, n, s, dv] reshaped to [b * n, s, dv] is a view of `value` at b = 1 (a copy
        # otherwise): then the up-projection recompute's discarded output
        # (the probe's matmuls reshape q and k^T the same way: views of query/key at b = 1)
        viewed = (2 * dqk + dv) if k.probe else dv
        qkv = b * s * n * viewed * d if b == 1 else 0
        copies = b * n * s * (2 * dqk + dv) * d - qkv
        if k.probe:  # explicit fp32 logits: softmax saves fp32 probs; ~mask [s, s] bool
            probs = b * n * s * s * 4 + s * s
        else:  # F.scaled_dot_product_attention's CPU math path (a mask is passed); below
            # fp32 it also keeps the fp32 softmax output (measured in the bf16 run)
            probs = b * n * s * s * d + (b * n * s * s * 4 if d != 4 else 0)
        core = copies + probs
    full = (sum(norm_in) + y + sum(q_lat) + q_up_in + sum(kv_lat) + kv_up_in + rope + k_pos
            + qkv + core + proj_in)
    # the blockwise attention's workspace while it runs, forward and backward (not saved): one
    # key block's K/V and fp32 logits / probabilities of one query tile against it
    work = 0
    if k.block:
        kb, qb = min(k.block, k.seq), min(k.block, s)
        work = b * kb * n * (m.qk_nope_head_dim + dv) * d + 3 * b * n * qb * kb * 4
    if recompute == "none":
        return full, work
    if recompute == "full":
        return x_in, full - (x_in if d == 4 else 0) + work
    # selective: input_layernorm (CheckpointWithoutOutput: saves x, discards y) and the MLA
    # up-projections (saves q/kv latents, k_pos_emb, rotary freqs fp32 [s, 1, 1, dr]; discards
    # query/key/value, which only the fused path saves)
    kept, extra = full, work
    if "layernorm" in mods:
        kept -= sum(norm_in) + y - x_in
        extra += (norm_in[0] if d != 4 else 0) + norm_in[1] + norm_in[2] + y
    if "mla_up_proj" in mods and not k.block:  # query/key/value discarded: qkv recomputed
        kept += s * dr * 4 - rope - qkv
        extra += rope + qkv
    return kept, extra


def _mlp(m, k: _Dims, moe: bool, recompute: str, routed: Optional[int],
         mods: frozenset = K2_SELECTIVE) -> tuple[int, int]:
    """(kept, backward extra) of the pre-MLP layernorm and the dense MLP or MoE block."""
    b, s, t, d, tp = k.b, k.s, k.t, k.d, k.tp
    h = m.hidden_size
    x_in = t * h * d
    norm = _norm(t, h, d, x_in)
    y = t * h * d  # pre_mlp_layernorm output: fc1's / the shared expert's / router's input

    def swiglu(tokens: int, ffn: int) -> int:
        # fc1 output [.., 2 ffn] (silu's input is a view), silu(x) and x_linear + 0 (glu's
        # offset add) saved by the product, the product saved by fc2
        return 5 * tokens * ffn * d

    if not moe:
        inner = swiglu(b * s, m.ffn_hidden_size // tp)
    else:
        e, topk = m.num_experts, m.moe_topk
        # the dispatcher gathers the SP shards over expert-TP, then spreads them over EP:
        # uniform routing gives each rank t * etp * topk rows (b * s * topk at etp = tp)
        r = routed if routed is not None else t * k.etp * topk
        inner = t * e * 4 + t * 4 + t * topk * 4 + t * topk * 8  # sigmoid scores, topk
        inner += t * h * 4 if d != 4 else 0  # router input cast to fp32 (moe_router_dtype)
        inner += e * t * 8 + t * topk * 8  # permute: argsort indices, sorted token indices
        inner += r * h * d + swiglu(r, m.moe_ffn_hidden_size // k.etp) + r * 4  # + probs
        inner += r * (m.moe_ffn_hidden_size // k.etp) * d  # glu output saved by * probs
        if m.num_shared_experts:
            inner += swiglu(b * s, m.num_shared_experts * m.moe_ffn_hidden_size // tp)
    full = sum(norm) + y + inner
    if recompute == "none":
        return full, 0
    if recompute == "full":
        return 0, full  # only the layer's input is kept, counted by the attention block
    # selective: pre_mlp_layernorm checkpointed (saves x), the dense MLP ("mlp") and the MoE
    # layer ("moe", shared experts inside) under tensor_parallel.checkpoint: they save only
    # their input, the discarded norm output
    norm_re = (norm[0] if d != 4 else 0) + norm[1] + norm[2] + y
    block = "moe" if moe else "mlp"
    if "layernorm" in mods and block in mods:
        return x_in, norm_re + inner
    if block in mods:  # the block's checkpoint keeps the norm output, the norm its saves
        return sum(norm) + y, inner
    if "layernorm" in mods:
        return full - (sum(norm) + y - x_in), norm_re
    return full, 0


def _dims(cfg, layout, attention: str, dtype_bytes: int) -> _Dims:
    b, seq, tp, cp = cfg.train.micro_batch_size, cfg.train.seq_length, layout.tp, layout.cp
    s = seq // cp
    t = b * s // tp if layout.sp and tp > 1 else b * s
    probe = bool(cfg.model.measure_max_attn_logit) or _qk_clip_active(cfg)
    block = getattr(cfg.model, "attention_block_size", 0)
    blockwise = attention == "local" and (cp > 1 or seq > block)
    return _Dims(b=b, s=s, t=t, tp=tp, etp=layout.etp, d=dtype_bytes, probe=probe,
                 attention=attention, cp=cp, seq=seq, block=block if blockwise else 0)


def _qk_clip_active(cfg) -> bool:
    active = getattr(cfg, "qk_clip_active", False)  # build_model turns the probe on for it
    return bool(active() if callable(active) else active)


def chunk_layers(cfg, layout, pp_rank: int, vp: int, *, attention: str = "local",
                 dtype_bytes: int = 2, recompute: Optional[str] = None,
                 routed_tokens: Optional[int] = None) -> tuple[list[_Layer], int, int]:
    """(decoder layers, bytes saved outside them and freed last in backward — the embedding's
    ids —, bytes saved after them and freed first — final norm, output layer, loss) of one
    chunk, for one micro-batch."""
    m = cfg.model
    mode = recompute or cfg.train.recompute
    mods = _modules(cfg)
    k = _dims(cfg, layout, attention, dtype_bytes)
    layers = []
    for i in layout.layer_ids(pp_rank, vp):
        a_kept, a_extra = _attention(m, k, mode, mods)
        f_kept, f_extra = _mlp(m, k, i >= m.first_k_dense, mode, routed_tokens, mods)
        extra = a_extra + f_extra if mode == "full" else max(a_extra, f_extra)
        layers.append(_Layer(kept=a_kept + f_kept, extra=extra))
    text = layout.stages[pp_rank][vp]
    pre = post = 0
    if "E" in text:
        pre = k.b * k.s * 8 + (k.b * k.s if k.tp > 1 else 0)  # ids (masked ids, mask at TP)
    if "L" in text:
        vocab = m.vocab_size // k.tp
        post = sum(_norm(k.t, m.hidden_size, k.d, k.t * m.hidden_size * k.d))  # final norm
        post += k.t * m.hidden_size * k.d  # output layer input
        # vocab-parallel cross entropy: exp_logits fp32 [s, b, V/tp], target mask, target ids;
        # then k2mcore's token loss * mask
        post += k.b * k.s * vocab * 4 + k.b * k.s + k.b * k.s * 8 + k.b * k.s * 4
    return layers, pre, post


def _chunk_bytes(layers: list[_Layer], pre: int, post: int) -> tuple[int, int]:
    """(one micro-batch's saved bytes, backward transient over them) of one chunk."""
    kept = sum(l.kept for l in layers)
    transient, after = 0, post  # bytes of this micro-batch already freed when layer j runs
    for layer in reversed(layers):
        transient = max(transient, layer.extra - after)
        after += layer.kept
    return pre + kept + post, max(0, transient)


def schedule_in_flight(pp: int, vpp: Optional[int], num_microbatches: int, pp_rank: int,
                       weights: Optional[list[int]] = None,
                       transients: Optional[list[int]] = None) -> tuple[list[int], int]:
    """(micro-batches alive per chunk at this rank's peak, the transient at that point) under
    megatron-core 0.19.2's schedule: no pipelining (one micro-batch at a time), 1F1B (warmup
    min(pp - rank - 1, M) forwards, then one forward / one backward), interleaved
    (get_pp_rank_microbatches' warmup (pp - rank - 1) * 2 + (vpp - 1) * pp and
    get_schedule_table's order, microbatch_group_size_per_vp_stage = pp). The peak is where
    sum(weights[c] * alive[c]) (+ the transient of the chunk whose backward starts) is largest."""
    chunks = vpp or 1
    weights = weights or [1] * chunks
    transients = transients or [0] * chunks
    m = num_microbatches
    if pp == 1:
        return [1] * chunks, max(transients)
    if vpp is None:
        order = [0] * m
        warmup = min(pp - pp_rank - 1, m)
        back = [0] * m
    else:
        table = []
        for lo in range(0, m, pp):
            hi = m if lo + pp >= m else lo + pp
            table += [(mb, c) for c in range(chunks) for mb in range(lo, hi)]
        order = [c for _, c in table]
        back = [chunks - 1 - c for c in order]
        warmup = min((pp - pp_rank - 1) * 2 + (chunks - 1) * pp, m * chunks)
    alive = [0] * chunks
    best = (-1, [0] * chunks, 0)

    def consider(extra: int) -> None:
        nonlocal best
        value = sum(w * a for w, a in zip(weights, alive)) + extra
        if value > best[0]:
            best = (value, list(alive), extra)

    total = len(order)
    f = bk = 0
    for _ in range(warmup):
        alive[order[f]] += 1
        f += 1
        consider(0)
    while bk < total:
        if f < total:
            alive[order[f]] += 1
            f += 1
            consider(0)
        consider(transients[back[bk]])
        alive[back[bk]] -= 1
        bk += 1
    return best[1], best[2]


def activation_bytes(cfg, layout, *, attention: str = "fused", dtype_bytes: int = 2,
                     recompute: Optional[str] = None,
                     routed_tokens: Optional[int] = None) -> list[StageActivations]:
    """One entry per pp rank. attention: "fused" = Transformer-Engine fused attention (GPU plans:
    no s x s tensors; saves q, k, v, out and softmax stats), "local" = k2mcore's own MLA core
    attention (k2mcore/model/attention.py), which the CPU runs use (with
    model.measure_max_attn_logit, or QK-Clip on, it materializes fp32 [b, heads, s, s]
    probabilities; without, F.scaled_dot_product_attention's CPU math path saves q, k, v copies
    and the [b, heads, s, s] probabilities). recompute: None -> cfg.train.recompute
    (none | selective | full). dtype_bytes: activation dtype size (bf16 GPU = 2, fp32 CPU = 4).
    routed_tokens: tokens the rank's local experts process per micro-batch and MoE layer
    (default b * s * topk: uniform routing, see the module docstring)."""
    if attention not in ("fused", "local"):
        raise ValueError(f"attention={attention!r}: 'fused' or 'local'")
    mode = recompute or cfg.train.recompute
    if mode not in ("none", "selective", "full"):
        raise ValueError(f"recompute={mode!r}: none, selective or full")
    out = []
    chunks = layout.vpp or 1
    for r in range(layout.pp):
        per_chunk, transients = [], []
        for v in range(chunks):
            layers, pre, post = chunk_layers(cfg, layout, r, v, attention=attention,
                                             dtype_bytes=dtype_bytes, recompute=mode,
                                             routed_tokens=routed_tokens)
            saved, transient = _chunk_bytes(layers, pre, post)
            per_chunk.append(saved)
            transients.append(transient)
        in_flight, transient = schedule_in_flight(layout.pp, layout.vpp,
                                                  layout.num_microbatches, r, per_chunk,
                                                  transients)
        total = sum(c * n for c, n in zip(per_chunk, in_flight)) + transient
        out.append(StageActivations(pp_rank=r, per_chunk=per_chunk, in_flight=in_flight,
                                    transient=transient, total=total))
    return out
