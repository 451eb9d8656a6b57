"""Parallel layout resolution and analytic parameter counts.

The pipeline split and the layout-string parser are checked against megatron-core's own code; the
per-rank parameter numbers below were measured on megatron-core GPTModel instances (0.16.1, and
still what tests/parity finds every rank holding on 0.19.2) built on
CPU (local spec, qk_layernorm=True, gloo process groups).
"""
from __future__ import annotations

import itertools
import logging
import math
import warnings

import pytest

from k2mcore.config.loader import INTENDED_WORLD_SIZE, load_config
from k2mcore.config.schema import ModelConfig, ParallelConfig
from k2mcore.errors import ConfigError
from k2mcore.parallel.layout import resolve_layout
from k2mcore.parallel.param_counts import count_parameters, megatron_param_shapes, params_per_rank
from k2mcore.parallel.pipeline import parse_pipeline_layout, pipeline_stages


# ------------------------------------------------------------------ layouts of the presets
def test_kimi_k2_layout():
    lay = resolve_layout(load_config("kimi-k2"), 256)
    assert (lay.tp, lay.pp, lay.vpp, lay.ep, lay.etp, lay.cp, lay.dp, lay.expert_dp) == (
        1, 16, 2, 16, 1, 1, 16, 1)
    assert lay.num_microbatches == 1024
    assert lay.layers[0] == [1, 2] and lay.layers[15] == [2, 0]
    assert all(row == [2, 2] for row in lay.layers[1:15])
    assert sum(map(sum, lay.layers)) == 61
    assert lay.embedding_stage == (0, 0) and lay.loss_stage == (15, 1)
    assert lay.layer_ids(0, 0) == [0] and lay.layer_ids(1, 0) == [1, 2]
    assert lay.layer_ids(15, 0) == [29, 30] and lay.layer_ids(0, 1) == [31, 32]
    assert lay.layer_ids(14, 1) == [59, 60] and lay.layer_ids(15, 1) == []
    assert lay.describe_stages() == "pp0: [E+1, 2]  pp1-14: [2, 2]  pp15: [2, L]"


def test_moonlight_and_dsv3_layouts():
    lay = resolve_layout(load_config("moonlight-16b-a3b"), 64)
    assert (lay.pp, lay.vpp, lay.ep, lay.dp, lay.expert_dp) == (2, None, 8, 32, 4)
    assert lay.layers == [[13], [14]] and lay.describe_stages() == "pp0: [E+13]  pp1: [14+L]"
    lay = resolve_layout(load_config("deepseek-v3"), 1024)
    assert (lay.pp, lay.vpp, lay.ep, lay.dp, lay.expert_dp) == (16, 2, 64, 64, 1)
    assert lay.num_microbatches == 240


def test_k2_tiny_layout():
    lay = resolve_layout(load_config("k2-tiny"), 1)
    assert lay.layers == [[4]] and lay.stages == [["Etttt" + "L"]]
    assert lay.embedding_stage == lay.loss_stage == (0, 0)
    assert lay.describe_stages() == "pp0: [E+4+L]"


def test_resolve_layout_validates():
    with pytest.raises(ConfigError, match="world size 255"):
        resolve_layout(load_config("kimi-k2"), 255)


def test_uneven_split_with_virtual_stages():
    cfg = load_config("k2-tiny", ["model.num_layers=12", "parallel.pp=4", "parallel.vpp=2",
                                  "parallel.first_stage_layers=2", "parallel.last_stage_layers=2"])
    lay = resolve_layout(cfg, 4)
    assert lay.layers == [[1, 1], [2, 2], [2, 2], [1, 1]]
    assert [lay.layer_ids(r, 1) for r in range(4)] == [[6], [7, 8], [9, 10], [11]]


# ------------------------------------------------------------------ parameter counts
def _close(value: float, target: float, rel: float) -> bool:
    return math.isclose(value, target, rel_tol=rel)


def test_kimi_k2_parameter_totals():
    c = count_parameters(load_config("kimi-k2").model)
    assert _close(c["total"], 1.03e12, 0.03), c["total"]
    assert _close(c["active"], 3.2e10, 0.03), c["active"]
    assert c["total"] == 1_026_408_209_408 and c["active"] == 32_861_477_888
    assert c["num_dense_layers"] == 1 and c["num_moe_layers"] == 60


def test_moonlight_parameter_totals():
    c = count_parameters(load_config("moonlight-16b-a3b").model)
    assert _close(c["total"], 16e9, 0.02), c["total"]
    assert _close(c["active"], 3e9, 0.03), c["active"]
    # the Moonlight report counts without embedding and output layer: 15.29B total, 2.24B active
    assert _close(c["total"] - c["embedding"] - c["output_layer"], 15.29e9, 0.005)
    assert _close(c["active_non_embedding"], 2.24e9, 0.005)


def test_deepseek_v3_parameter_totals():
    c = count_parameters(load_config("deepseek-v3").model)
    assert _close(c["total"], 671e9, 0.02), c["total"]  # 671B main model, MTP excluded
    assert c["total"] == 671_026_404_352 and c["active"] == 37_552_282_624  # regression values
    assert _close(c["active"], 37e9, 0.03), c["active"]


@pytest.mark.parametrize("name", sorted(INTENDED_WORLD_SIZE))
def test_counts_match_megatron_param_shapes(name):
    m = load_config(name).model
    shapes = megatron_param_shapes(m)
    assert sum(math.prod(s) for s in shapes.values()) == count_parameters(m)["total"]
    layer = f"decoder.layers.{m.num_layers - 1}."
    if m.num_experts:
        assert shapes[layer + "mlp.router.weight"] == (m.num_experts, m.hidden_size)
        assert f"{layer}mlp.experts.local_experts.{m.num_experts - 1}.linear_fc2.weight" in shapes
    assert ("decoder.layers.0.self_attention.linear_q_proj.weight" in shapes) == (
        m.q_lora_rank is None)


def test_k2_tiny_exact_counts():
    m = load_config("k2-tiny").model
    c = count_parameters(m)
    assert c["total"] == 387_392  # measured on the built megatron GPTModel
    assert c["embedding"] == c["output_layer"] == 1024 * 64
    tied = count_parameters(ModelConfig(q_lora_rank=None, num_shared_experts=0,
                                        tie_word_embeddings=True))
    assert tied["total"] == 307_392 and tied["output_layer"] == 0


# Per-rank counts against real multi-rank builds: tests/parity/test_layout_parity.py.


def test_params_per_rank_presets():
    cfg = load_config("kimi-k2")
    lo, hi = params_per_rank(cfg, resolve_layout(cfg, 256))
    assert (round(lo / 1e9, 2), round(hi / 1e9, 2)) == (3.58, 4.82)
    # with one rank everything is on it
    cfg = load_config("k2-tiny")
    assert params_per_rank(cfg, resolve_layout(cfg, 1)) == (387_392, 387_392)


# ------------------------------------------------------------------ megatron cross-checks
@pytest.fixture(scope="module")
def megatron():
    pytest.importorskip("megatron.core")
    warnings.filterwarnings("ignore")
    logging.disable(logging.CRITICAL)
    import torch
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.pipeline_parallel_layer_layout import (
        PipelineParallelLayerLayout,
    )
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    yield dict(torch=torch, ps=parallel_state, LayerType=LayerType,
               Layout=PipelineParallelLayerLayout, build=get_num_layers_to_build,
               offset=get_transformer_layer_offset, TransformerConfig=TransformerConfig)
    logging.disable(logging.NOTSET)


LAYOUT_STRINGS = ["Et|(tt|)*30L", "Ettt|(tt|)*29,m|L", "E|t*3|(t|)*2L", "Et*3|t|L", "|Etttt|L|",
                  "(Et|tL)*2", "E(t|)*3tL", "Ett,tt|tt,L"]


@pytest.mark.parametrize("text", LAYOUT_STRINGS + ["Ex|L", "Et|t L"])
def test_layout_parser_matches_megatron(megatron, text):
    try:
        expected = [[t.name for t in stage] for stage in megatron["Layout"].parse_str_to_list(text)]
    except AssertionError:
        with pytest.raises(ConfigError, match=r"^parallel\.pipeline_layout: invalid layer char"):
            parse_pipeline_layout(text)
        return
    names = {"E": "embedding", "L": "loss", "t": "decoder", "m": "mtp"}
    assert [[names[c] for c in stage] for stage in parse_pipeline_layout(text)] == expected


def _megatron_split(mg, num_layers, pp, vpp, first, last, layout):
    """[pp][vp] -> (offset, count) as megatron computes it, or None where megatron fails."""
    try:
        tc = mg["TransformerConfig"](
            num_layers=num_layers, hidden_size=8, num_attention_heads=1,
            pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
            num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
            pipeline_model_parallel_layout=layout, pipeline_dtype=mg["torch"].float32)
        v = tc.virtual_pipeline_model_parallel_size
        mg["ps"]._VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = v
        lay, out = tc.pipeline_model_parallel_layout, []
        for r in range(pp):
            row = []
            for c in range(v or 1):
                vs = c if v else None
                if lay is not None:  # megatron's block helper would ask parallel_state for pp_rank
                    n = lay.get_num_layers_to_build(mg["LayerType"].decoder, vs, r)
                    off = lay.get_layer_offset(mg["LayerType"].decoder, vs, r)
                else:
                    n = mg["build"](tc, vp_stage=vs, pp_rank=r)
                    off = mg["offset"](tc, vp_stage=vs, pp_rank=r)
                row.append((off, n))
            out.append(row)
        # megatron accepts some uneven splits that leave negative layer counts
        return None if any(n < 0 for row in out for _, n in row) else (out, v)
    except (ValueError, AssertionError, ZeroDivisionError):
        return None
    finally:
        mg["ps"]._VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = None


def _our_split(num_layers, pp, vpp, first, last, layout):
    try:
        stages, v = pipeline_stages(
            ModelConfig(num_layers=num_layers),
            ParallelConfig(pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last,
                           pipeline_layout=layout))
    except ConfigError:
        return None
    counts = [[s.count("t") for s in row] for row in stages]
    out = []
    for r in range(pp):
        row = []
        for c in range(len(counts[r])):
            off = sum(counts[q][d] for d in range(c) for q in range(pp))
            row.append((off + sum(counts[q][c] for q in range(r)), counts[r][c]))
        out.append(row)
    return out, v


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pipeline_split_matches_megatron(megatron):
    cases = list(itertools.product((1, 4, 5, 8, 12, 27, 61), (2, 3, 4, 16), (None, 1, 2, 3),
                                   (None, 1, 2, 4, 13), (None, 1, 2, 6, 14), (None,)))
    cases += list(itertools.product((4, 61), (2, 4, 16), (None, 1, 2), (None,), (None,),
                                    LAYOUT_STRINGS + ["Lt|ttttE", "Et|tt|L"]))
    valid = 0
    for case in cases:
        expected = _megatron_split(megatron, *case)
        assert _our_split(*case) == expected, case
        valid += expected is not None
    assert valid > 100  # the grid exercises real splits, not only errors

