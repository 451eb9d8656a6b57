"""Our megatron-core K2 equals transformers' DeepseekV3ForCausalLM: the proof that the model is K2."""
from __future__ import annotations

import json
import os

import pytest
import torch

import k2mcore
from harness.hf_models import VARIANTS, hf_config, random_hf_model
from k2mcore.errors import HFFormatError


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, tmp_path):
    hf = random_hf_model(hf_config(**VARIANTS[variant]), seed=len(variant))
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
    hf = random_hf_model(hf_config(), seed=3)
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

    hf = random_hf_model(hf_config(), seed=5)
    hf.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    save_file(tensors, path)
    with pytest.raises(HFFormatError, match="e_score_correction_bias is missing"):
        k2mcore.load_model(str(tmp_path))
