"""Weight sync to a rollout engine in each layout (run by layout_worker.py inside the shared
launches; see test_weight_sync.py).

From the shared initial weights (routers' expert bias set to random values, which a sync must
carry): a checkpoint of the layout, `WeightSync.push` (small buckets, so there are several) to the
transformers engine on rank 0, then on rank 0 `k2m-convert mcore-to-hf --dtype fp32` of the
checkpoint, compared with the engine's tensors bit for bit. Then the engine samples (T = 0.9,
routes captured) and the trainer's `k2mcore.rl.logprobs` of the same rollouts, without routing
replay and with R3 on the engine's routes, are compared with the engine's log-probabilities.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

RUNS = ("1rank", "tp2-ep2", "pp2")
BUCKET_MB = 0.05  # ~52 KB: the toy's 0.6 MB of weights in about a dozen buckets
TEMPERATURE = 0.9


def set_expert_bias(model) -> None:
    """Each router's expert bias: random, seeded by its layer, so equal in every layout."""
    for chunk in model:
        for name, m in chunk.named_modules():
            if hasattr(m, "expert_bias") and m.expert_bias is not None:
                layer = m.layer_number
                g = torch.Generator().manual_seed(500 + layer)
                m.expert_bias.copy_(0.3 * torch.randn(m.expert_bias.shape, generator=g))


def prompts(vocab: int) -> list:
    from k2mcore.rl.engine import Prompt

    g = torch.Generator().manual_seed(13)
    return [Prompt(tuple(torch.randint(1, vocab, (4 + i,), generator=g).tolist()), f"p{i}")
            for i in range(3)]


def measure(name: str, out: str, init_path: str, seq: int) -> None:
    from rl_probe import build

    from k2mcore.checkpoint import CheckpointManager
    from k2mcore.convert.mcore_to_hf import convert_mcore_to_hf
    from k2mcore.hf.config import fresh_hf_config
    from k2mcore.hf.safetensors_io import SafetensorsFile
    from k2mcore.optim.build import build_optimizer
    from k2mcore.rl.engine import Sampling
    from k2mcore.rl.hf_engine import TransformersEngine
    from k2mcore.rl.logprobs import logprobs
    from k2mcore.rl.replay import RouteReplay
    from k2mcore.rl.rollouts import RolloutList
    from k2mcore.rl.weight_sync import WeightSync

    cfg, groups, model, _ = build(name, "grpo", init_path, seq)
    set_expert_bias(model)
    optimizer, scheduler = build_optimizer(cfg, model, groups)
    root = os.path.join(out, f"sync-{name}")
    CheckpointManager(root, cfg, groups).save(1, model, optimizer, scheduler, consumed_samples=0)
    engine = TransformersEngine(fresh_hf_config(cfg.model, "float32"), stop_ids=[3]) \
        if dist.get_rank() == 0 else None
    sync = WeightSync(model, groups, cfg.model, bucket_mb=BUCKET_MB, is_engine=engine is not None)
    report = sync.push(engine, version=1)
    result = {"buckets": report.buckets, "bucket_bytes": sync.bucket_bytes,
              "limit": int(BUCKET_MB * 2**20), "bytes_moved": report.bytes_moved,
              "tensors": report.tensors}
    rollouts = None
    if engine is not None:
        hf = convert_mcore_to_hf(root, os.path.join(out, f"sync-{name}-hf"), dtype="fp32",
                                 progress=False, tokenizer="assets:tokenizer/k2-tiny.tiktoken")
        exported = {}
        for f in sorted(os.listdir(hf)):
            if f.endswith(".safetensors"):
                st = SafetensorsFile(os.path.join(hf, f))
                exported.update({k: st.read(k) for k in st.keys()})
        state = engine.named_weights()
        result["names_equal"] = sorted(exported) == sorted(state)
        result["bit_mismatches"] = sum(
            not torch.equal(exported[k].view(torch.int32), state[k].view(torch.int32))
            for k in exported if k in state)
        result["bias_nonzero"] = bool(any(state[k].abs().sum() > 0 for k in state
                                          if k.endswith("e_score_correction_bias")))
        rollouts = engine.generate(prompts(cfg.model.vocab_size), 4, Sampling(
            temperature=TEMPERATURE, max_new_tokens=seq // 2, seed=5, routes=True))
    box = [rollouts]
    dist.broadcast_object_list(box, src=0)
    rollouts = box[0]
    data = RolloutList(rollouts, seq, pad_id=0)
    micro = [{k: torch.from_numpy(v)[None] for k, v in data.sample(i).items()}
             for i in range(len(data))]
    replay = RouteReplay(model, groups, cfg.model.first_k_dense)
    diffs = {}
    for mode in ("plain", "r3"):
        replay.mode = "replay" if mode == "r3" else None
        got = logprobs(model, groups, micro, seq_length=seq, micro_batch_size=1,
                       temperature=TEMPERATURE, replay=replay if mode == "r3" else None)
        replay.mode = None
        worst = 0.0
        for r, mb, lp in zip(rollouts, micro, got):
            p, m = len(r.prompt), len(r.response)
            worst = max(worst, (lp[0, p - 1:p - 1 + m] - torch.tensor(r.logprobs)).abs().max()
                        .item())
        diffs[mode] = worst
    result.update(logprob_diff=diffs, responses=[len(r.response) for r in rollouts])
    if dist.get_rank() == 0:
        torch.save(result, os.path.join(out, f"{name}.sync.pt"))
