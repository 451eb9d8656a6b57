"""k2m-convert against transformers: hf-to-mcore gives the HF logits through load_model, the
round trip is bit-exact, exports load in transformers, a trainer checkpoint exports the same at
TP2 x EP2 as at 1 rank, block-FP8 is dequantized by the formula, and bad input is one line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import k2mcore
from harness.hf_models import VARIANTS, hf_config, random_hf_model
from harness.launching import local_command, local_env

BIN = os.path.dirname(sys.executable)
IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(7))


def convert(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([os.path.join(BIN, "k2m-convert"), *args, "--no-progress"]
                          if args[0] != "inspect" else [os.path.join(BIN, "k2m-convert"), *args],
                          capture_output=True, text=True, timeout=300, env=local_env())
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def _hf_tensors(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


@pytest.fixture(scope="module", params=["k2", "moonlight", "dsv3", "no-interleave"])
def converted(request, tmp_path_factory):
    """An HF model of each family, converted to a k2mcore checkpoint and back (fp32)."""
    root = tmp_path_factory.mktemp(request.param)
    hf_dir, ckpt, back = str(root / "hf"), str(root / "ckpt"), str(root / "back")
    model = random_hf_model(hf_config(**VARIANTS[request.param]), seed=11)
    model.save_pretrained(hf_dir)
    convert("hf-to-mcore", "--hf-dir", hf_dir, "--out", ckpt)
    convert("mcore-to-hf", "--ckpt", ckpt, "--out", back, "--dtype", "fp32")
    with torch.no_grad():
        logits = model(IDS).logits.float()
    return {"hf": hf_dir, "ckpt": ckpt, "back": back, "logits": logits, "name": request.param}


def test_hf_to_mcore_then_load_model_gives_transformers_logits(converted):
    ours = k2mcore.load_model(converted["ckpt"])
    diff = (ours(IDS) - converted["logits"]).abs().max().item()
    print(f"{converted['name']}: converted checkpoint vs transformers, max |logit diff| {diff:.1e}")
    assert diff <= 1e-4


def test_hf_to_mcore_to_hf_is_bit_exact(converted):
    src, back = _hf_tensors(converted["hf"]), _hf_tensors(converted["back"])
    assert set(src) == set(back)
    for name, t in src.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    index = json.load(open(os.path.join(converted["back"], "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(src)


def test_exported_directory_loads_in_transformers(converted):
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(converted["back"]).eval()
    with torch.no_grad():
        logits = model(IDS).logits.float()
    assert torch.equal(logits, converted["logits"])


def _config(path: str) -> dict:
    return json.load(open(os.path.join(path, "config.json")))


def _weights(name: str) -> bool:
    return name.endswith(".safetensors") or name == "model.safetensors.index.json"


def test_export_keeps_the_source_config_and_files(converted):
    """config.json comes back equal field by field (fp32 in, fp32 out, the same architecture),
    and the release's other files (generation_config.json) byte for byte."""
    src, back = _config(converted["hf"]), _config(converted["back"])
    assert {k: v for k, v in back.items() if k != "transformers_version"} == \
        {k: v for k, v in src.items() if k != "transformers_version"}
    others = [f for f in os.listdir(converted["hf"]) if not _weights(f) and f != "config.json"]
    assert "generation_config.json" in others
    for f in others:
        assert open(os.path.join(converted["back"], f), "rb").read() == \
            open(os.path.join(converted["hf"], f), "rb").read(), f


def test_converted_experts_are_one_chunk_each(converted):
    """megatron's load reads a stored chunk whole for every expert it overlaps: one chunk per
    expert, as megatron's expert layers save them, keeps k2m-train's start-up fast."""
    from k2mcore.convert.dcp import DCPReader

    r = DCPReader(os.path.join(converted["ckpt"], "dist"))
    stacked = [i for k, i in r.info.items() if ".mlp.experts.experts.linear_fc" in k]
    assert stacked and all(len(i.chunks) == i.shape[0] == 8 for i in stacked)
    assert all(c.sizes[0] == 1 for i in stacked for c in i.chunks)


def test_inspect_describes_both_formats(converted):
    ck = convert("inspect", converted["ckpt"]).stdout
    assert "k2mcore checkpoint (megatron torch_dist), step 0" in ck
    assert "converted from Hugging Face (deepseek_v3, FP8 source: False)" in ck
    assert "optimizer state: none (weights only)" in ck and "FP8: no" in ck
    hf = convert("inspect", converted["hf"]).stdout
    assert "Hugging Face safetensors" in hf and "model_type deepseek_v3" in hf
    assert "8 experts top-" in hf and "FP8: no" in hf


def test_trainer_checkpoints_at_tp2_ep2_and_one_rank_export_the_same(tmp_path):
    """k2m-train starts from a converted checkpoint at 1 rank and at TP2 x EP2 (lr 0, no bias
    update: weights unchanged), saves, and both checkpoints export to identical HF tensors."""
    hf_dir, ckpt = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    random_hf_model(hf_config(**VARIANTS["k2"]), seed=5).save_pretrained(hf_dir)
    convert("hf-to-mcore", "--hf-dir", hf_dir, "--out", ckpt)
    common = ["--config", os.path.join(ckpt, "config.yaml"), "--set", f"checkpoint.load={ckpt}",
              "--set", "train.iters=1", "--set", "checkpoint.interval=1", "--set", "optimizer.lr=0",
              "--set", "optimizer.min_lr=0", "--set", "model.moe_router_bias_update_rate=0",
              "--set", "train.global_batch_size=4", "--set", "train.seq_length=32",
              "--set", "logging.tensorboard=false"]
    layouts = {"one": (1, []), "tp2ep2": (2, ["parallel.tp=2", "parallel.sp=true",
                                             "parallel.ep=2", "parallel.etp=1"])}
    exported = {}
    for name, (nproc, sets) in layouts.items():
        run = str(tmp_path / name)
        args = common + ["--set", f"run.dir={run}"] + [x for s in sets for x in ("--set", s)]
        proc = subprocess.run(local_command(nproc, os.path.join(BIN, "k2m-train"), args),
                              env=local_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "initialized weights from" in proc.stdout
        out = str(tmp_path / f"{name}-hf")
        convert("mcore-to-hf", "--ckpt", os.path.join(run, "checkpoints"), "--out", out, "--dtype", "fp32")
        exported[name] = _hf_tensors(out)
    src = _hf_tensors(hf_dir)
    for name, t in exported["one"].items():
        assert torch.equal(exported["tp2ep2"][name], t), name
        assert torch.equal(t, src[name]), name  # lr 0: still the converted weights
    # the release's config came through training (its checkpoints carry it), unchanged
    for name in layouts:
        assert _config(str(tmp_path / f"{name}-hf")) == _config(hf_dir)


# ---------------------------------------------------------------------------------------- FP8
def _fp8_release(tmp_path, block: int = 32) -> tuple[str, dict]:
    """A K2-like model saved as DeepSeek/K2 release it: linear weights in float8_e4m3fn with a
    per-block weight_scale_inv. Dims give whole and ragged blocks (e.g. 40 x 64 at 32)."""
    from k2mcore.hf.fp8 import quantize

    path = str(tmp_path / "fp8")
    random_hf_model(hf_config(**VARIANTS["k2"]), seed=9).save_pretrained(path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    quantized = {}
    for name in list(tensors):
        if tensors[name].ndim == 2 and "proj" in name:  # attention and MLP linears (DeepSeek quantizes these)
            w8, scale_inv = quantize(tensors[name], block=(block, block))
            tensors[name], tensors[name + "_scale_inv"] = w8, scale_inv
            quantized[name] = (w8, scale_inv)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [block, block]}
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    return path, quantized


def _formula(w8: torch.Tensor, scale_inv: torch.Tensor, block: int) -> torch.Tensor:
    """W[i, j] * scale_inv[i // block, j // block], element by element index arithmetic."""
    rows = torch.arange(w8.shape[0])[:, None] // block
    cols = torch.arange(w8.shape[1])[None, :] // block
    return w8.float() * scale_inv[rows, cols]


def test_fp8_release_is_dequantized_by_the_formula(tmp_path):
    hf_dir, quantized = _fp8_release(tmp_path)
    assert any(w.shape[0] % 32 for w, _ in quantized.values())  # ragged edge blocks exist
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    convert("hf-to-mcore", "--hf-dir", hf_dir, "--out", ckpt, "--dtype", "fp32")
    assert "FP8 source: True" in convert("inspect", ckpt).stdout
    assert "FP8: yes, 32x32 blocks" in convert("inspect", hf_dir).stdout
    convert("mcore-to-hf", "--ckpt", ckpt, "--out", back, "--dtype", "fp32")
    out = _hf_tensors(back)
    assert not any(k.endswith("_scale_inv") for k in out)
    for name, (w8, scale_inv) in quantized.items():
        assert torch.equal(out[name], _formula(w8, scale_inv, 32)), name
    # the export is not quantized: quantization_config is the one field that changed
    src, got = _config(hf_dir), _config(back)
    assert "quantization_config" not in got
    assert got == {k: v for k, v in src.items() if k != "quantization_config"}
    # and the model runs on the dequantized weights: load_model reads the FP8 directory itself
    a, b = k2mcore.load_model(hf_dir)(IDS), k2mcore.load_model(ckpt)(IDS)
    assert torch.equal(a, b)


def test_fp8_default_block_is_128():
    from k2mcore.hf.fp8 import block_size, dequantize

    assert block_size({"quantization_config": {"quant_method": "fp8"}}) == (128, 128)
    w = torch.ones(200, 130, dtype=torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    d = dequantize(w, scale)
    assert d[127, 127] == 1 and d[127, 128] == 2 and d[128, 0] == 3 and d[199, 129] == 4


# ---------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("small") / "hf")
    random_hf_model(hf_config(**VARIANTS["k2"]), seed=2).save_pretrained(path)
    return path


def _one_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("k2m-convert: error: "), proc.stderr
    return lines[0]


def _copy(src: str, dst) -> str:
    shutil.copytree(src, str(dst))
    return str(dst)


def test_not_a_checkpoint(tmp_path):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    assert "no config.json" in _one_line(convert("hf-to-mcore", "--hf-dir", empty, "--out",
                                                  str(tmp_path / "o"), expect=2))
    assert "not a k2mcore checkpoint" in _one_line(convert("mcore-to-hf", "--ckpt", empty, "--out",
                                                           str(tmp_path / "o"), expect=2))
    assert "not a checkpoint" in _one_line(convert("inspect", empty, expect=2))


def test_unknown_model_type(small_hf, tmp_path):
    path = _copy(small_hf, tmp_path / "llama")
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    msg = _one_line(convert("hf-to-mcore", "--hf-dir", path, "--out", str(tmp_path / "o"), expect=2))
    assert "config.json: model_type 'llama' is not one of deepseek_v3, kimi_k2" in msg


def test_missing_shard_named_in_the_index(small_hf, tmp_path):
    path = _copy(small_hf, tmp_path / "sharded")
    names = list(load_file(os.path.join(path, "model.safetensors")))
    index = {"metadata": {}, "weight_map": {n: ("model-00001-of-00002.safetensors" if i % 2 else
                                                "model-00002-of-00002.safetensors")
                                            for i, n in enumerate(names)}}
    os.rename(os.path.join(path, "model.safetensors"), os.path.join(path, "model-00001-of-00002.safetensors"))
    json.dump(index, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    msg = _one_line(convert("hf-to-mcore", "--hf-dir", path, "--out", str(tmp_path / "o"), expect=2))
    assert "model-00002-of-00002.safetensors: shard named in the index is missing" in msg


def test_scale_that_does_not_fit_its_weight(tmp_path):
    hf_dir, quantized = _fp8_release(tmp_path)
    file = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(file)
    name = "model.layers.2.self_attn.kv_b_proj.weight"
    tensors[name + "_scale_inv"] = tensors[name + "_scale_inv"][:2].contiguous()
    save_file(tensors, file)
    out = str(tmp_path / "o")
    msg = _one_line(convert("hf-to-mcore", "--hf-dir", hf_dir, "--out", out, expect=2))
    assert f"{name}_scale_inv: shape (2, 1) does not fit {name} 128x32 in 32x32 blocks " \
           "(expected 4x1)" in msg
    # the failed conversion leaves nothing at --out, and no partial directory behind
    assert not os.path.exists(out) and os.listdir(tmp_path) == ["fp8"]


def test_config_that_disagrees_with_the_tensors(small_hf, tmp_path):
    path = _copy(small_hf, tmp_path / "lying")
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["moe_intermediate_size"] = 48
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    msg = _one_line(convert("hf-to-mcore", "--hf-dir", path, "--out", str(tmp_path / "o"), expect=2))
    assert "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight has shape (64, 64), " \
           "config.json implies (96, 64)" in msg


def test_existing_output_needs_force(small_hf, tmp_path):
    out = str(tmp_path / "ckpt")
    os.makedirs(out)
    (tmp_path / "ckpt" / "precious").write_text("keep me")
    msg = _one_line(convert("hf-to-mcore", "--hf-dir", small_hf, "--out", out, expect=2))
    assert f"{out}: already exists (pass --force to replace it)" in msg
    assert (tmp_path / "ckpt" / "precious").read_text() == "keep me"
    convert("hf-to-mcore", "--hf-dir", small_hf, "--out", out, "--force")
    assert not (tmp_path / "ckpt" / "precious").exists()
    assert "step 0" in convert("inspect", out).stdout
    back = str(tmp_path / "back")
    os.makedirs(back)
    msg = _one_line(convert("mcore-to-hf", "--ckpt", out, "--out", back, expect=2))
    assert "already exists" in msg


def test_fp8_weight_without_its_scale(tmp_path):
    hf_dir, _ = _fp8_release(tmp_path)
    file = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(file)
    name = "model.layers.0.self_attn.q_a_proj.weight"
    del tensors[name + "_scale_inv"]
    save_file(tensors, file)
    msg = _one_line(convert("hf-to-mcore", "--hf-dir", hf_dir, "--out", str(tmp_path / "o"), expect=2))
    assert f"{name} is FP8 but has no {name}_scale_inv" in msg


def test_bad_fp8_block_size(tmp_path):
    hf_dir, _ = _fp8_release(tmp_path)
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    cfg["quantization_config"]["weight_block_size"] = [128]
    json.dump(cfg, open(os.path.join(hf_dir, "config.json"), "w"))
    msg = _one_line(convert("hf-to-mcore", "--hf-dir", hf_dir, "--out", str(tmp_path / "o"), expect=2))
    assert "config.json: quantization_config.weight_block_size [128] is not two positive ints" in msg


def test_export_refuses_a_config_that_disagrees_with_the_checkpoint(small_hf, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    convert("hf-to-mcore", "--hf-dir", small_hf, "--out", ckpt)
    text = open(os.path.join(ckpt, "config.yaml")).read()
    open(os.path.join(ckpt, "config.yaml"), "w").write(text.replace("kv_lora_rank: 32", "kv_lora_rank: 48"))
    meta = json.load(open(os.path.join(ckpt, "metadata.json")))
    meta["files"]["config.yaml"]["size"] = os.path.getsize(os.path.join(ckpt, "config.yaml"))
    json.dump(meta, open(os.path.join(ckpt, "metadata.json"), "w"))
    msg = _one_line(convert("mcore-to-hf", "--ckpt", ckpt, "--out", str(tmp_path / "o"), expect=2))
    assert "tensor decoder.layers.0.self_attention.linear_kv_down_proj.weight has shape (40, 64), " \
           "config.yaml implies (56, 64)" in msg


def test_export_refuses_a_truncated_data_file(small_hf, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    convert("hf-to-mcore", "--hf-dir", small_hf, "--out", ckpt)
    data = os.path.join(ckpt, "dist", "__0_0.distcp")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    msg = _one_line(convert("mcore-to-hf", "--ckpt", ckpt, "--out", str(tmp_path / "o"), expect=2))
    assert f"{data}: corrupt (" in msg and "truncated or overwritten" in msg
    assert not os.path.exists(tmp_path / "o")


# ------------------------------------------------------------------ MTP layers and stray tensors
def _with_mtp(small_hf: str, dst) -> tuple[str, dict]:
    """small_hf plus a DeepSeek-V3-style multi-token-prediction layer, model.layers.3 (the
    config's num_hidden_layers is 3; transformers' default num_nextn_predict_layers is 1)."""
    path = _copy(small_hf, dst)
    assert _config(path)["num_hidden_layers"] == 3 and _config(path)["num_nextn_predict_layers"] == 1
    g = torch.Generator().manual_seed(3)
    shapes = {"enorm.weight": (64,), "hnorm.weight": (64,), "eh_proj.weight": (64, 128),
              "shared_head.norm.weight": (64,), "self_attn.o_proj.weight": (64, 64),
              "mlp.experts.0.down_proj.weight": (64, 32)}
    mtp = {f"model.layers.3.{n}": torch.randn(*shape, generator=g) for n, shape in shapes.items()}
    save_file(mtp, os.path.join(path, "model-mtp.safetensors"))
    return path, mtp


def test_mtp_layers_are_refused_in_one_line(small_hf, tmp_path):
    path, mtp = _with_mtp(small_hf, tmp_path / "mtp")
    out = str(tmp_path / "o")
    msg = _one_line(convert("hf-to-mcore", "--hf-dir", path, "--out", out, expect=2))
    assert "  MTP layers: model.layers.3 (hf-to-mcore refuses them; --drop-mtp converts the rest)" in \
        convert("inspect", path).stdout
    mib = sum(t.numel() * 4 for t in mtp.values()) / 2**20
    assert msg.endswith(f"{path}: holds 1 multi-token-prediction layer (model.layers.3: 6 tensors, "
                        f"{mib:.1f} MiB; config num_nextn_predict_layers=1), which k2mcore's model "
                        "does not build: pass --drop-mtp to convert without them")
    assert not os.path.exists(out) and sorted(os.listdir(tmp_path)) == ["mtp"]


def test_drop_mtp_converts_the_rest_and_records_the_drop(small_hf, tmp_path):
    path, mtp = _with_mtp(small_hf, tmp_path / "mtp")
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    proc = convert("hf-to-mcore", "--hf-dir", path, "--out", ckpt, "--drop-mtp")
    assert "--drop-mtp: leaving out 1 multi-token-prediction layer (model.layers.3: 6 tensors" in proc.stdout
    nbytes = sum(t.numel() * 4 for t in mtp.values())
    assert f"dropped: MTP layers [3] (6 tensors, {nbytes / 1024:.1f} KiB) by --drop-mtp" in \
        convert("inspect", ckpt).stdout
    convert("mcore-to-hf", "--ckpt", ckpt, "--out", back, "--dtype", "fp32")
    src, got = _config(path), _config(back)
    assert got["num_nextn_predict_layers"] == 0  # the export has no MTP weights to describe
    assert {k: v for k, v in got.items() if k != "num_nextn_predict_layers"} == \
        {k: v for k, v in src.items() if k != "num_nextn_predict_layers"}
    out, release = _hf_tensors(back), _hf_tensors(path)
    assert set(out) == set(release) - set(mtp)
    assert all(torch.equal(out[k], release[k]) for k in out)


def test_a_tensor_the_model_does_not_have_is_refused(small_hf, tmp_path):
    path = _copy(small_hf, tmp_path / "stray")
    save_file({"model.layers.0.mlp.extra.weight": torch.zeros(2)}, os.path.join(path, "more.safetensors"))
    msg = _one_line(convert("hf-to-mcore", "--hf-dir", path, "--out", str(tmp_path / "o"), expect=2))
    assert msg.endswith(f"{path}/more.safetensors: tensor model.layers.0.mlp.extra.weight is not part "
                        "of the model config.json describes (nothing written)")


# ------------------------------------------------------------------ configs: kept or transformers'
def test_a_changed_training_config_changes_only_its_fields_in_the_sources_schema():
    """What training changed (context length, YaRN factor) is rewritten where and how the source
    wrote it (transformers 5's rope_parameters, or a release's rope_scaling with "type"); the
    rest, including fields k2mcore does not know, stays as the source wrote it."""
    import dataclasses

    from k2mcore.hf.config import model_config_from_hf, updated_hf_config

    v5 = dict(json.loads(hf_config(**VARIANTS["k2"]).to_json_string(use_diff=True)), dtype="bfloat16")
    release = {k: v for k, v in v5.items() if k != "rope_parameters"}
    release.update(rope_theta=50000.0, torch_dtype="bfloat16", auto_map={"AutoConfig": "x.Config"},
                   rope_scaling={"type": "yarn", **{k: v for k, v in v5["rope_parameters"].items()
                                                    if k not in ("rope_type", "rope_theta")}})
    release.pop("dtype", None)
    for source, rope_key in ((v5, "rope_parameters"), (release, "rope_scaling")):
        model = model_config_from_hf(source)
        assert updated_hf_config(source, model, "bfloat16") == (source, [])
        longer = dataclasses.replace(model, max_position_embeddings=4096, rope_scaling=dataclasses.replace(
            model.rope_scaling, factor=64.0))
        got, changed = updated_hf_config(source, longer, "float32")
        dtype_key = "dtype" if "dtype" in source else "torch_dtype"
        assert sorted(changed) == sorted(["max_position_embeddings", rope_key, dtype_key])
        assert got[rope_key] == {**source[rope_key], "factor": 64.0}
        assert {k: v for k, v in got.items() if k not in changed} == \
            {k: v for k, v in source.items() if k not in changed}
        assert model_config_from_hf(got) == longer


def test_a_model_trained_from_scratch_gets_the_config_transformers_writes(tmp_path):
    """No source config: transformers' own schema (save_pretrained's, field by field), the
    model's fields, and bos/eos/pad from the tokenizer; an HF tokenizer's files come along."""
    from k2mcore.config.loader import load_config
    from k2mcore.convert.export_config import export_files
    from k2mcore.data.datasets import resolve_path
    from k2mcore.data.tokenizers import load_tokenizer
    from k2mcore.hf.config import model_config_from_hf

    cfg = load_config("k2-tiny")
    files = export_files(str(tmp_path), cfg, "bfloat16")  # tmp_path: a step dir without lineage
    ours = files.config
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**ours))
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "ref"))
    ref = _config(str(tmp_path / "ref"))
    assert {k: v for k, v in ref.items() if k != "transformers_version"} == ours
    tok = load_tokenizer(resolve_path(cfg.data.tokenizer))
    assert (ours["bos_token_id"], ours["eos_token_id"], ours["pad_token_id"]) == \
        (tok.special_tokens["[BOS]"], tok.special_tokens["[EOS]"], tok.special_tokens["[PAD]"])
    again = model_config_from_hf(ours)
    assert again == dataclasses_replace_name(cfg.model, again.name)
    assert files.others == {}  # a bare tiktoken file: nothing transformers would load
    hf_tok = export_files(str(tmp_path), cfg, "bfloat16", tokenizer="assets:tokenizer/k2-tiny")
    assert set(hf_tok.others) == {"tokenizer.json", "tokenizer_config.json"}
    assert hf_tok.config["eos_token_id"] == ours["eos_token_id"]


def dataclasses_replace_name(model, name):
    import dataclasses

    return dataclasses.replace(model, name=name)
