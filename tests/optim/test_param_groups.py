"""Muon/AdamW split of a real 1-rank k2-tiny model."""
from __future__ import annotations

import pytest

from k2mcore.config.loader import load_config
from k2mcore.model.build import build_model
from k2mcore.optim import MuonClip, split_params
from k2mcore.parallel.groups import init_distributed
from k2mcore.parallel.layout import resolve_layout


@pytest.fixture(scope="module")
def chunks():
    cfg = load_config("k2-tiny")
    return build_model(cfg, init_distributed(resolve_layout(cfg, 1), seed=1))


def test_split(chunks):
    s = split_params(chunks)
    names = dict(chunks[0].named_parameters())
    assert sorted(s.muon_names + s.adamw_names) == sorted(names)  # every parameter, once
    assert not set(s.muon_names) & set(s.adamw_names)
    assert all(names[n] is p for n, p in zip(s.muon_names + s.adamw_names, s.muon_params + s.adamw_params))
    assert set(s.adamw_names) == {
        "embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight",
        *(f"decoder.layers.{i}.{n}.weight" for i in range(4)
          for n in ("input_layernorm", "pre_mlp_layernorm", "self_attention.q_layernorm",
                    "self_attention.kv_layernorm")),
    }
    attn = ("linear_proj", "linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj")
    want_muon = {f"decoder.layers.{i}.self_attention.{n}.weight" for i in range(4) for n in attn}
    want_muon |= {"decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc2.weight"}
    for i in (1, 2, 3):  # MoE layers: router, 8 experts, shared expert
        want_muon.add(f"decoder.layers.{i}.mlp.router.weight")
        for fc in ("linear_fc1", "linear_fc2"):
            want_muon.add(f"decoder.layers.{i}.mlp.shared_experts.{fc}.weight")
            want_muon |= {f"decoder.layers.{i}.mlp.experts.local_experts.{e}.{fc}.weight" for e in range(8)}
    assert set(s.muon_names) == want_muon
    assert set(s.gated_names) == {n for n in want_muon if n.endswith("linear_fc1.weight")}
    # expert_bias is a buffer (aux-loss-free balancing): no optimizer sees it
    assert "decoder.layers.1.mlp.router.expert_bias" in dict(chunks[0].named_buffers())


def test_router_flag_and_groups(chunks):
    s = split_params(chunks, router_in_muon=False)
    routers = {f"decoder.layers.{i}.mlp.router.weight" for i in (1, 2, 3)}
    assert routers <= set(s.adamw_names) and not routers & set(s.muon_names)
    groups = s.muon_param_groups()
    assert [g.get("split_rows", 1) for g in groups] == [1, 2]
    assert sum(len(g["params"]) for g in groups) == len(s.muon_params)
    MuonClip(groups, lr=0.01)  # accepted: every fc1 has an even row count
