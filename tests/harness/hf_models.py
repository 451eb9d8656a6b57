"""Tiny random transformers DeepseekV3 models (K2-like, Moonlight-like, DeepSeek-V3-like) for
the parity and conversion tests."""
from __future__ import annotations

import torch
import transformers

K2_YARN = {
    "rope_type": "yarn", "factor": 32.0, "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0,
    "mscale_all_dim": 1.0, "original_max_position_embeddings": 32,
}
DSV3_YARN = dict(K2_YARN, factor=40.0, beta_fast=32.0)

VARIANTS = {
    # K2-like: q_lora, one dense layer, one group, K2's YaRN
    "k2": dict(rope_scaling=K2_YARN),
    # Moonlight-like: plain q_proj, no rope scaling, two shared experts
    "moonlight": dict(q_lora_rank=None, n_shared_experts=2, rms_norm_eps=1e-5,
                      routed_scaling_factor=2.446),
    # DeepSeek-V3-like: grouped top-k (4 groups, 2 chosen), two dense layers, its YaRN
    "dsv3": dict(n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=2,
                 num_hidden_layers=4, rope_scaling=DSV3_YARN, routed_scaling_factor=2.5),
    # checkpoints stored with rope_interleave=False need their rope rows permuted
    "no-interleave": dict(rope_interleave=False, rope_scaling=K2_YARN),
}


def hf_config(**overrides):
    kw = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=1,
        topk_group=1, routed_scaling_factor=2.827, rms_norm_eps=1e-6,
        max_position_embeddings=1024, rope_theta=50000.0, tie_word_embeddings=False,
    )
    kw.update(overrides)
    return transformers.DeepseekV3Config(**kw)


def random_hf_model(config, seed: int):
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # make norms and the expert bias matter, as in a trained model
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
        for mod in model.modules():
            if getattr(mod, "e_score_correction_bias", None) is not None:
                mod.e_score_correction_bias.normal_(0.0, 0.2)
    return model


def hf_model_from_full(weights: dict, model_cfg, directory: str):
    """transformers' DeepseekV3ForCausalLM (fp32, eval) holding k2mcore's 1-rank weights
    (`gather_full`'s names: experts stacked under `experts.experts.`; the expert bias, a
    buffer it leaves out, zero as built), exported with k2mcore.hf.mapping.mcore_to_hf."""
    import json
    import os
    import re

    from safetensors.torch import save_file

    from k2mcore.hf.config import fresh_hf_config
    from k2mcore.hf.mapping import mcore_to_hf

    def get(key: str) -> torch.Tensor:
        if key in weights:
            return weights[key]
        m = re.match(r"(.*\.experts\.)local_experts\.(\d+)\.(.*)", key)
        if m:
            return weights[f"{m[1]}experts.{m[3]}"][int(m[2])]
        if key.endswith("router.expert_bias"):
            return torch.zeros(model_cfg.num_experts)
        raise KeyError(key)

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(fresh_hf_config(model_cfg, "float32"), f)
    save_file({k: v.contiguous() for k, v in mcore_to_hf(get, model_cfg)},
              os.path.join(directory, "model.safetensors"))
    return transformers.DeepseekV3ForCausalLM.from_pretrained(
        directory, dtype=torch.float32).eval()


def hf_logprobs(model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[j+1] | ids[:j+1]) [len(ids) - 1] of softmax(logits / temperature)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits.float()[0, :-1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]
