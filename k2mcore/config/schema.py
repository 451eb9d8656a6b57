"""The one configuration tree of k2mcore.

Every section is a plain dataclass; presets are YAML files holding the same keys. Field names of
`ModelConfig` follow the Hugging Face DeepseekV3 config where one exists, so presets can be checked
against the published `config.json` files line by line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RopeScalingConfig:
    """YaRN parameters (HF `rope_scaling`). All explicit: megatron's defaults do not match K2."""

    type: str = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass
class ModelConfig:
    name: str = "k2-tiny"
    vocab_size: int = 1024
    hidden_size: int = 64
    num_layers: int = 4
    num_attention_heads: int = 4
    q_lora_rank: Optional[int] = 32  # None: plain q_proj (Moonlight)
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    ffn_hidden_size: int = 128  # dense FFN (HF intermediate_size)
    moe_ffn_hidden_size: int = 32  # per expert (HF moe_intermediate_size)
    num_experts: int = 8  # routed experts (HF n_routed_experts)
    num_shared_experts: int = 1
    moe_topk: int = 2  # HF num_experts_per_tok
    first_k_dense: int = 1  # HF first_k_dense_replace
    routed_scaling_factor: float = 2.827
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 50000.0
    rope_scaling: Optional[RopeScalingConfig] = None
    rope_interleave: bool = True  # HF checkpoint layout of the rope rows
    tie_word_embeddings: bool = False
    init_std: float = 0.006  # HF initializer_range
    moe_router_bias_update_rate: float = 1e-3  # aux-loss-free expert-bias step
    moe_aux_loss_coeff: float = 0.0  # K2 uses the bias update, not an aux loss
    measure_max_attn_logit: bool = False  # per-head running max of the logits, for QK-Clip
    # local spec: sequences longer than this (tokens), and every context-parallel one, attend
    # block by block from MLA's latent, one block's K/V up-projected at a time (and queries
    # tiled alike: one logits tile is heads x block x block fp32, 268 MB at K2's 64 heads)
    attention_block_size: int = 1024


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # virtual stages per pipeline rank (interleaved 1F1B)
    ep: int = 1
    etp: Optional[int] = None  # expert tensor parallelism; null: follows tp (megatron's default)
    cp: int = 1
    sp: bool = False  # sequence parallelism (needs tp > 1)
    # Uneven pipeline splits: either counts for the first/last stage or megatron's layout string
    # ("Et|(tt|)*30L": E embedding, t decoder layer, L loss, | stage separator).
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    pipeline_layout: Optional[str] = None
    distributed_optimizer: bool = True  # ZeRO-1 over data parallelism

    def resolve(self) -> "ParallelConfig":
        """Fill the defaults that follow other fields. Idempotent."""
        if self.etp is None:
            # With ep=1 and etp<tp, megatron would replicate experts over TP ranks that see
            # different tokens without summing their gradients; etp=tp is its default too.
            self.etp = self.tp
        return self


def resolve_overlap(overlap_grad_reduce: Optional[bool], overlap_param_gather: Optional[bool], *,
                    distributed_optimizer: bool, cuda: bool) -> tuple[bool, bool]:
    """(overlap_grad_reduce, overlap_param_gather) with null resolved: the gather on with CUDA
    and the distributed optimizer; the reduction on with CUDA or with the gather."""
    param = (cuda and distributed_optimizer) if overlap_param_gather is None \
        else overlap_param_gather
    grad = (cuda or param) if overlap_grad_reduce is None else overlap_grad_reduce
    return grad, param


@dataclass
class TrainConfig:
    iters: int = 20
    global_batch_size: int = 8
    micro_batch_size: int = 1
    seq_length: int = 64
    seed: int = 1234
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU (bf16 matmul is ~40x slower there)
    clip_grad: float = 1.0
    recompute: str = "none"  # none | selective | full
    # selective only: megatron's recompute_modules, comma-separated (core_attn, layernorm,
    # mla_up_proj, mlp, moe, moe_act, shared_experts); null: K2's set, layernorm,mla_up_proj,
    # mlp,moe (moe_act instead of moe with Transformer-Engine's grouped GEMM)
    recompute_modules: Optional[str] = None
    max_consecutive_skips: int = 5  # non-finite steps in a row before the run stops
    # layout_invariant: every layout starts from the 1-rank weights (k2mcore/model/init.py);
    # megatron: each rank draws its own shard (cheaper for huge models, differs per layout)
    init: str = "layout_invariant"
    # validation: every eval_interval steps and after the last one (0: never), the masked mean
    # loss over the first eval_iters global batches of the valid split (the same samples each
    # time, so the curve compares like with like); eval_iters x global_batch_size samples built
    eval_interval: int = 0
    eval_iters: int = 1
    # data-parallel communication overlapped with compute, as Megatron-LM runs it
    # (docs/training.md, 'Overlapped data-parallel communication'): gradients reduce-scattered
    # bucket by bucket while the backward runs; parameters all-gathered in the next forward's
    # pre-hooks (needs parallel.distributed_optimizer). null: on with CUDA (the gather with the
    # distributed optimizer), off on CPU, where gloo's threads and the ranks' compute share the
    # same cores and overlap measured slower (benchmarks/bench_overlap.py)
    overlap_grad_reduce: Optional[bool] = None
    overlap_param_gather: Optional[bool] = None
    # DDP bucket size in elements; null: megatron's max(40M, 1M x DP), one bucket on a toy
    # model. Only the first pipeline stage's first chunk is cut into buckets (megatron's rule)
    ddp_bucket_size: Optional[int] = None


@dataclass
class MuonConfig:
    """Muon's half of MuonClip (optimizer.name: muonclip). lr and the schedule are the optimizer
    section's, times lr_scale (Muon's update RMS is matched to AdamW's, so K2 shares them)."""

    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    coefficients: str = "k2"  # a named Newton-Schulz coefficient set (k2mcore.optim.NS_COEFFICIENTS)
    ns_dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU | fp32 | bf16
    router_in_muon: bool = True  # the MoE router weight: Muon (true) or AdamW
    split_gated: bool = True  # orthogonalize SwiGLU gate and up projections separately (as HF's)
    lr_scale: float = 1.0  # Muon's lr = optimizer.lr's schedule x lr_scale
    weight_decay: Optional[float] = None  # null: optimizer.weight_decay
    # ZeRO-1 shards cut so each matrix lies whole on one rank (its Newton-Schulz owner), so
    # MuonClip moves ZeRO-1's bytes; false: megatron's equal shards plus two all_to_alls
    owner_aligned_shards: bool = True
    # with owner_aligned_shards: bytes per step, as a fraction of the pipeline stage's ZeRO-1
    # bytes, that may carry Newton-Schulz jobs from overloaded ranks to others of the stage
    # (k2mcore/optim/muonclip/ns_offload.py; TP = ETP = CP = 1 only); 0: every job stays on its
    # owner
    ns_offload_budget: float = 0.015


@dataclass
class QKClipConfig:
    """K2's QK-Clip, applied after each MuonClip step (needs optimizer.name: muonclip)."""

    threshold: float = 100.0  # tau: heads whose max pre-softmax logit exceeds it are rescaled
    alpha: float = 0.5  # query share of the no-RoPE scaling (K2: 0.5)
    enabled: bool = True


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | muonclip
    lr: float = 2e-4
    min_lr: float = 2e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    warmup_iters: int = 0
    # constant | linear | cosine | wsd (warmup, stable, decay: K2's schedule with wsd_decay_style
    # cosine over the last wsd_decay_iters steps)
    decay_style: str = "cosine"
    # the schedule's length (Megatron-LM's --lr-decay-iters); null: train.iters. Set it to keep
    # the schedule fixed when a run is stopped and extended (3 steps, then resume to 6)
    decay_iters: Optional[int] = None
    wsd_decay_iters: Optional[int] = None  # null: the last 10% of the schedule
    wsd_decay_style: str = "cosine"  # linear | cosine | exponential | minus_sqrt
    muon: MuonConfig = field(default_factory=MuonConfig)


@dataclass
class DataConfig:
    loader: str = "auto"  # auto (DALI when nvidia.dali imports, else torch) | dali | torch
    # text: documents (k2m-preprocess), loss on every token | chat: conversations
    # (k2m-preprocess --chat: tokens + assistant loss masks), one per sample, padded |
    # rollouts: RL samples (k2m-preprocess --rollouts), in file order, trained by the rl section
    format: str = "text"
    # megatron's --data-path: "w1 prefix1 w2 prefix2 ..." (weighted blend) or "prefix1 ..."
    # (weighted by size); a prefix names <prefix>.bin/.idx, "assets:..." the bundled sample data.
    # null: megatron's synthetic (mock) data.
    blend: Optional[str] = None
    split: str = "98,2,0"  # train,valid,test weights over each dataset's documents
    tokenizer: Optional[str] = None  # tokenizer.json or tiktoken file the data was made with
    cache_dir: Optional[str] = None  # megatron's index cache; null: <run.dir>/data_cache
    num_workers: int = 2  # loader worker processes (DALI external_source / torch DataLoader)
    prefetch: int = 2  # micro-batches queued ahead, per worker
    eod_mask_loss: bool = False  # megatron's option: no loss on end-of-document tokens
    # chat only: several conversations per train.seq_length row (first fit over the shuffled
    # conversations), each attending only to itself, RoPE positions from 0 in each
    packing: bool = False
    # chat only: a conversation longer than train.seq_length + 1 tokens is cut to that (true)
    # or refused in one line naming it (false)
    truncate: bool = True


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <run.dir>/checkpoints
    # every N steps (make train.iters a multiple to keep the final weights) and when a stop
    # signal ends the run early; 0: only then
    interval: int = 0
    # where a run without checkpoints of its own starts (a converted release, another run's
    # step); once the run has saved, it resumes from its own newest checkpoint
    load: Optional[str] = None
    keep: int = 2
    # interval saves written by a background thread while training goes on (committed, by
    # rename, once every rank has written); the end of the run waits for a write in progress,
    # and a stop signal waits for it, then saves synchronously
    async_save: bool = False
    # write the checkpoint files with O_DIRECT, around the page cache (3-4x less time per byte
    # here; k2mcore.checkpoint.writer); a filesystem that refuses it gets buffered writes
    # anyway. false: always buffered
    direct_io: bool = True


@dataclass
class LoggingConfig:
    interval: int = 1
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    peak_tflops: float = 989.0  # per device, for the MFU estimate (H100/H200 dense bf16)


@dataclass
class RLConfig:
    """The policy update on rollouts (data.format: rollouts; docs/rl.md has the formulas)."""

    advantage: str = "grpo"  # grpo: (r - group mean) / (group std + 1e-6) | grpo_no_std
    loss: str = "grpo"  # grpo (per token) | gspo (sequence ratio, per sample) | k2 (K1.5/K2)
    clip_low: Optional[float] = None  # null: 0.2 for grpo, 3e-4 for gspo (not for k2)
    clip_high: Optional[float] = None  # null: 0.28 for grpo (DAPO's clip-higher), 4e-4 for gspo
    tau: Optional[float] = None  # k2's tau (required with loss: k2)
    tis_cap: float = 2.0  # truncated importance sampling cap, when rollouts carry logprobs
    truncation_reward: Optional[float] = None  # replaces a truncated rollout's reward when set
    drop_uniform_groups: bool = True  # dynamic sampling: no loss on groups of equal rewards
    minibatches: int = 1  # optimizer steps per rollout batch (each a distinct global batch)
    temperature: float = 1.0  # the engine's sampling temperature: logits are divided by it
    # MoE routing replay: none | rollout (R3: the engine's experts, the rollouts' routes) | old
    # (R2: the experts the old-logprob pass chose), forced in the policy's forwards
    routing_replay: str = "none"
    kl_coef: float = 0.0  # x the k3 KL to the reference policy, meaned over masked-in tokens
    # the frozen reference policy's checkpoint (loaded beside the policy, same layout); null:
    # the rollouts' ref_logprobs (needed when kl_coef > 0)
    reference: Optional[str] = None
    entropy_coef: float = 0.0  # x the entropy bonus, meaned over masked-in tokens
    # k2m-rl, the loop (generate -> reward -> update -> sync; docs/rl.md "The loop"): a rollout
    # batch (train.global_batch_size x rl.minibatches) is rl.samples answers to each of its
    # prompts; the run is train.iters / rl.minibatches iterations
    prompts: Optional[str] = None  # JSON lines: {"prompt" or "messages", "answer", "id"?, "budget"?}
    heldout_prompts: Optional[str] = None  # scored greedily every heldout_interval iterations
    heldout_interval: int = 1  # iterations; 0: never
    samples: int = 8  # answers per prompt (one group)
    max_new_tokens: int = 64  # the per-task token budget (a prompt's "budget" overrides it)
    temperature_final: Optional[float] = None  # null: rl.temperature throughout; else linear to it
    reward: str = "exact_match"  # exact_match | math | module:function (a judge, any callable)
    sync_bucket_mb: float = 512.0  # weight sync: HF tensors per message, at most


@dataclass
class RunConfig:
    dir: str = "runs/k2-tiny"
    name: Optional[str] = None


@dataclass
class K2Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    qk_clip: QKClipConfig = field(default_factory=QKClipConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def qk_clip_active(self) -> bool:
        """QK-Clip runs after each step (and needs the per-head max-logit probes)."""
        return self.optimizer.name == "muonclip" and self.qk_clip.enabled
