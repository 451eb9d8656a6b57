"""An ideal step time: matmul FLOPs at a stated peak plus bytes over stated link bandwidths.

It ranks layouts (`k2m-plan --search`) and says where a step's time goes; it is not a
prediction of measured MFU. Every assumption is in `ASSUMPTIONS`, which the report prints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from k2mcore.config.schema import K2Config, ModelConfig
from k2mcore.parallel.layout import Layout
from k2mcore.parallel.param_counts import count_parameters

ASSUMPTIONS = (
    "compute: matmul FLOPs only (6 per parameter-token for forward+backward, causal attention "
    "scores 2*s*heads*(qk_head+v_head) per token-layer forward), at the stated peak; "
    "recompute adds its forward FLOPs again",
    "MoE: uniform routing (each rank's experts get tokens*topk/ep of its tokens)",
    "pipeline: the busiest stage sets the beat; bubble (pp-1)/(vpp*microbatches) of it",
    "communication: bus bytes (NCCL-tests' convention: a reduce-scatter or all-gather moves "
    "(d-1)/d of the whole buffer over each rank's link, an all-reduce twice that) / link "
    "bandwidth, not overlapped with compute (an upper bound); NVLink inside a node of "
    "--gpus-per-node GPUs, InfiniBand (per GPU) for a group that spans nodes, except the EP "
    "all-to-all's in-node share",
    "Newton-Schulz: the busiest rank's MuonClip orthogonalization FLOPs at the same peak",
)


@dataclass(frozen=True)
class Links:
    peak_tflops: float = 989.0  # per GPU, dense bf16 (H100/H200 SXM)
    nvlink_gbps: float = 450.0  # GB/s per GPU, one direction (NVLink 4)
    ib_gbps: float = 50.0  # GB/s per GPU (one 400 Gb/s NIC)
    gpus_per_node: int = 8


def _layer_matmul_params(m: ModelConfig, moe: bool) -> int:
    """Parameters one token multiplies through in one decoder layer (top-k routed experts)."""
    c = count_parameters(m)
    attention = c["attention_per_layer"] - (m.hidden_size + m.kv_lora_rank
                                            + (m.q_lora_rank or 0))  # norms
    if not moe:
        return attention + c["dense_mlp_per_layer"]
    return (attention + c["moe_router_per_layer"] + c["moe_shared_experts_per_layer"]
            + m.moe_topk * c["routed_expert"])


def _recomputed_params(m: ModelConfig, moe: bool, recompute: str) -> int:
    """Parameters whose forward matmuls the recompute setting runs a second time."""
    if recompute == "full":
        return _layer_matmul_params(m, moe)
    if recompute != "selective":
        return 0
    # K2's selective set: norms, MLA up-projections, SwiGLU/MLP and the MoE layer
    heads, h = m.num_attention_heads, m.hidden_size
    up = m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
    up += (m.q_lora_rank or h) * heads * (m.qk_nope_head_dim + m.qk_rope_head_dim)
    return up + _mlp_params(m, moe)


def _mlp_params(m: ModelConfig, moe: bool) -> int:
    c = count_parameters(m)
    if not moe:
        return c["dense_mlp_per_layer"]
    return c["moe_router_per_layer"] + c["moe_shared_experts_per_layer"] + m.moe_topk * c["routed_expert"]


def stage_flops_per_token(cfg: K2Config, layout: Layout, pp_rank: int,
                          recompute: Optional[str] = None) -> float:
    """Training FLOPs per token of one pipeline rank's chunks (all its TP/EP/DP ranks together)."""
    m, s = cfg.model, cfg.train.seq_length
    recompute = recompute or cfg.train.recompute
    # causal attention: QK^T and PV over s/2 keys on average, per token and layer, forward
    scores = 2 * s * m.num_attention_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim
                                              + m.v_head_dim)
    flops = 0.0
    for v, text in enumerate(layout.stages[pp_rank]):
        for i in layout.layer_ids(pp_rank, v):
            moe = i >= m.first_k_dense
            flops += 6 * _layer_matmul_params(m, moe) + 3 * scores
            flops += 2 * _recomputed_params(m, moe, recompute)
            if recompute == "full":
                flops += scores
        if "L" in text:
            flops += 6 * m.vocab_size * m.hidden_size
    return flops


@dataclass(frozen=True)
class StepTime:
    compute_s: float  # busiest stage, all micro-batches, incl. the pipeline bubble
    bubble_s: float
    ns_s: float  # Newton-Schulz on the busiest rank
    comm_s: dict  # kind -> seconds
    links: dict  # kind -> "nvlink" | "ib" | "-"

    @property
    def total_s(self) -> float:
        return self.compute_s + self.ns_s + sum(self.comm_s.values())


def link_of(kind: str, layout: Layout, gpus_per_node: int) -> str:
    """Whether a kind of traffic stays inside a node. megatron's rank order tp-cp-ep-dp-pp
    (tp fastest): a group's span is its stride times its size."""
    span = {"tp": layout.tp, "cp": layout.tp * layout.cp, "ep": layout.tp * layout.cp * layout.dp,
            "dp": layout.tp * layout.cp * layout.dp, "pp": layout.world_size,
            "optimizer": layout.tp * layout.cp * layout.dp}[kind]
    if kind == "ep":  # expert ranks: etp-ep-edp-pp; an EP group spans etp*ep ranks
        span = layout.etp * layout.ep
    if kind == "pp" and layout.pp == 1:
        return "-"
    return "nvlink" if span <= gpus_per_node else "ib"


def _a2a_inside(layout: Layout, gpus_per_node: int) -> float:
    """Share of an EP all-to-all's bytes that stay inside a node: an EP group's ranks sit
    etp apart, so a node holds gpus_per_node // etp of them."""
    if layout.etp > gpus_per_node:
        return 0.0
    return min(layout.ep, gpus_per_node // layout.etp) / layout.ep


def step_time(cfg: K2Config, layout: Layout, comm: dict, links: Links, *,
              ns_flops: int = 0, recompute: Optional[str] = None) -> StepTime:
    peak = links.peak_tflops * 1e12
    tokens = cfg.train.global_batch_size * cfg.train.seq_length
    per_stage = layout.world_size // layout.pp
    busiest = max(stage_flops_per_token(cfg, layout, r, recompute) for r in range(layout.pp))
    work = busiest * tokens / per_stage / peak
    vpp = layout.vpp or 1
    bubble = work * (layout.pp - 1) / (vpp * layout.num_microbatches)
    comm_s, kinds = {}, {}
    for kind, nbytes in comm.items():
        where = link_of(kind, layout, links.gpus_per_node)
        kinds[kind] = where
        if where == "nvlink":
            comm_s[kind] = nbytes / (links.nvlink_gbps * 1e9)
            continue
        # an all-to-all sends each peer its share: the peers inside the node take NVLink
        inside = _a2a_inside(layout, links.gpus_per_node) if kind == "ep" else 0.0
        comm_s[kind] = nbytes * (inside / links.nvlink_gbps + (1 - inside) / links.ib_gbps) / 1e9
    return StepTime(compute_s=work + bubble, bubble_s=bubble, ns_s=ns_flops / peak,
                    comm_s=comm_s, links=kinds)
