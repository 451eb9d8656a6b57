"""Our megatron-core K2 equals transformers' DeepseekV3ForCausalLM: the proof that the model is K2."""
from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

import k2mcore
from k2mcore.model.hf import HFFormatError

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


def _hf_config(**overrides):
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


def _random_hf_model(config, seed: int):
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


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, tmp_path):
    hf = _random_hf_model(_hf_config(**VARIANTS[variant]), seed=len(variant))
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = hf(ids).logits.float()

    ours = k2mcore.load_model(str(tmp_path))
    out = ours(ids)

    assert out.dtype == torch.float32 and out.shape == (2, 40, 256)
    diff = (out - ref).abs().max().item()
    print(f"{variant}: max |logit diff| = {diff:.2e} (logits up to {ref.abs().max():.2f})")
    assert diff <= 1e-4


def test_expert_bias_is_mapped(tmp_path):
    """A forgotten e_score_correction_bias mapping silently changes routing."""
    hf = _random_hf_model(_hf_config(), seed=3)
    hf.save_pretrained(tmp_path)
    ours = k2mcore.load_model(str(tmp_path))
    got = ours.gpt.decoder.layers[1].mlp.router.expert_bias
    want = hf.model.layers[1].mlp.gate.e_score_correction_bias
    assert torch.equal(got, want) and want.abs().sum() > 0


def test_bad_directories_name_the_file(tmp_path):
    with pytest.raises(HFFormatError, match="no config.json"):
        k2mcore.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(HFFormatError, match="model_type 'llama'"):
        k2mcore.load_model(str(tmp_path))


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = _random_hf_model(_hf_config(), seed=5)
    hf.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    save_file(tensors, path)
    with pytest.raises(HFFormatError, match="e_score_correction_bias is missing"):
        k2mcore.load_model(str(tmp_path))
