"""Presets, the loader (overrides, type coercion, unknown keys), validation and the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from k2mcore.config.loader import (
    INTENDED_WORLD_SIZE,
    config_to_dict,
    dump_yaml,
    list_presets,
    load_config,
)
from k2mcore.config.schema import K2Config, RopeScalingConfig
from k2mcore.errors import ConfigError
from k2mcore.parallel.layout import resolve_layout

REPO = Path(__file__).resolve().parents[2]

# kimi-k2.md's architecture table.
TABLE = {
    "kimi-k2": dict(
        hidden_size=7168, num_layers=61, num_attention_heads=64, q_lora_rank=1536, kv_lora_rank=512,
        ffn_hidden_size=18432, moe_ffn_hidden_size=2048, num_experts=384, num_shared_experts=1,
        moe_topk=8, first_k_dense=1, routed_scaling_factor=2.827, n_group=1, topk_group=1,
        vocab_size=163840, max_position_embeddings=131072, rope_theta=50000.0, rms_norm_eps=1e-6,
        rope_scaling=RopeScalingConfig("yarn", 32.0, 4096, 1.0, 1.0, 1.0, 1.0)),
    "moonlight-16b-a3b": dict(
        hidden_size=2048, num_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
        ffn_hidden_size=11264, moe_ffn_hidden_size=1408, num_experts=64, num_shared_experts=2,
        moe_topk=6, first_k_dense=1, routed_scaling_factor=2.446, n_group=1, topk_group=1,
        vocab_size=163840, max_position_embeddings=8192, rope_theta=50000.0, rms_norm_eps=1e-5,
        rope_scaling=None),
    "deepseek-v3": dict(
        hidden_size=7168, num_layers=61, num_attention_heads=128, q_lora_rank=1536,
        kv_lora_rank=512,
        ffn_hidden_size=18432, moe_ffn_hidden_size=2048, num_experts=256, num_shared_experts=1,
        moe_topk=8, first_k_dense=3, routed_scaling_factor=2.5, n_group=8, topk_group=4,
        vocab_size=129280, max_position_embeddings=163840, rope_theta=10000.0, rms_norm_eps=1e-6,
        rope_scaling=RopeScalingConfig("yarn", 40.0, 4096, 32.0, 1.0, 1.0, 1.0)),
    "k2-tiny": dict(
        vocab_size=1024, hidden_size=64, num_layers=4, num_attention_heads=4, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        ffn_hidden_size=128,
        moe_ffn_hidden_size=32, num_experts=8, num_shared_experts=1, moe_topk=2, first_k_dense=1,
        routed_scaling_factor=2.827, n_group=1, topk_group=1, rms_norm_eps=1e-6,
        max_position_embeddings=4096, rope_theta=50000.0,
        rope_scaling=RopeScalingConfig("yarn", 32.0, 4096, 1.0, 1.0, 1.0, 1.0)),
}
MLA_HEADS = dict(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)


# ------------------------------------------------------------------ presets
def test_preset_list_matches_intended_world_sizes():
    assert sorted(INTENDED_WORLD_SIZE) == list_presets()


@pytest.mark.parametrize("name", sorted(INTENDED_WORLD_SIZE))
def test_preset_loads_and_validates(name):
    cfg = load_config(name)
    resolve_layout(cfg, INTENDED_WORLD_SIZE[name])
    assert cfg.model.name == name
    assert cfg.run.dir == f"runs/{name}"


@pytest.mark.parametrize("name", sorted(TABLE))
def test_preset_model_matches_table(name):
    m = load_config(name).model
    expected = dict(TABLE[name])
    if name != "k2-tiny":
        expected.update(MLA_HEADS)
    for key, value in expected.items():
        assert getattr(m, key) == value, key
        assert type(getattr(m, key)) is type(value), key
    assert m.init_std == (0.02 if name == "k2-tiny" else 0.006) and m.tie_word_embeddings is False and m.norm_topk_prob is True


def test_k2_tiny_parallel_and_train():
    cfg = load_config("k2-tiny")
    p, t = cfg.parallel, cfg.train
    assert (p.tp, p.pp, p.vpp, p.ep, p.etp, p.cp, p.sp) == (1, 1, None, 1, 1, 1, False)
    assert (t.iters, t.global_batch_size, t.micro_batch_size, t.seq_length, t.seed) == (
        80, 8, 1, 64, 1234)
    assert cfg.run.dir == "runs/k2-tiny"


def test_kimi_k2_training_defaults():
    cfg = load_config("kimi-k2")
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp, cfg.parallel.ep) == (1, 16, 2, 16)
    assert cfg.parallel.pipeline_layout == "Et|(tt|)*30L"
    assert cfg.parallel.distributed_optimizer is True
    assert cfg.train.seq_length == 4096 and cfg.train.micro_batch_size == 1
    assert cfg.train.global_batch_size * cfg.train.seq_length == 16384 * 4096
    o = cfg.optimizer
    assert (o.name, o.lr, o.min_lr, o.warmup_iters) == ("muonclip", 2e-4, 2e-5, 500)


# ------------------------------------------------------------------ loader
def test_overrides_coerce_types():
    cfg = load_config("k2-tiny", [
        "parallel.tp=2", "parallel.sp=true", "train.seed=7", "optimizer.lr=1",
        "run.name=123", "parallel.vpp=null", "model.rms_norm_eps=1e-5",
        "model.rope_scaling.factor=40", "data.split=99,1,0", "checkpoint.dir=/tmp/x",
    ])
    assert cfg.parallel.tp == 2 and cfg.parallel.sp is True and cfg.train.seed == 7
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.run.name == "123"  # str fields keep the text
    assert cfg.parallel.vpp is None
    assert cfg.model.rms_norm_eps == 1e-5
    factor = cfg.model.rope_scaling.factor
    assert factor == 40.0 and isinstance(factor, float)
    assert cfg.data.split == "99,1,0" and cfg.checkpoint.dir == "/tmp/x"


def test_override_optional_dataclass():
    cfg = load_config("k2-tiny", ["model.rope_scaling=null"])
    assert cfg.model.rope_scaling is None
    full = ("model.rope_scaling={type: yarn, factor: 40, original_max_position_embeddings: 4096, "
            "beta_fast: 32, beta_slow: 1, mscale: 1, mscale_all_dim: 1}")
    cfg = load_config("moonlight-16b-a3b", [full])
    assert cfg.model.rope_scaling == RopeScalingConfig("yarn", 40.0, 4096, 32.0, 1.0, 1.0, 1.0)


@pytest.mark.parametrize("override, message", [
    ("train.micro_batch_size=abc", "train.micro_batch_size: expected int, got 'abc'"),
    ("train.micro_batch_size=1.5", "train.micro_batch_size: expected int, got 1.5"),
    ("parallel.sp=1", "parallel.sp: expected bool (true/false), got 1"),
    ("parallel.tp=null", "parallel.tp: expected int, got null"),
    ("optimizer.lr=fast", "optimizer.lr: expected float, got 'fast'"),
    ("parallel.nonsense=1", "parallel.nonsense: unknown key (section parallel has: tp, pp, vpp,"),
    ("nonsense.tp=1", "nonsense: unknown key (sections are: model, parallel,"),
    ("model.rope_scaling.bogus=1", "model.rope_scaling.bogus: unknown key (section "
                                   "model.rope_scaling has: type, factor,"),
    ("parallel.tp.x=1", "parallel.tp.x: parallel.tp is a int, it has no fields"),
    ("parallel.tp", "override 'parallel.tp': expected KEY=VALUE"),
    ("model.rope_scaling={type: yarn, factor: 40}", "model.rope_scaling: missing "
     "original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim"),
    ("model.rope_scaling=3", "model.rope_scaling: expected a mapping, got 3"),
    ("data.eval_samples=64", "data.eval_samples: no longer a key; use train.eval_iters "
                             "(validation samples = eval_iters x global_batch_size)"),
])
def test_override_errors(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config("k2-tiny", [override])
    assert str(exc.value).startswith(message), str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("overrides, message", [
    (["data.format=json"], "data.format: 'json' is not one of text, chat"),
    (["data.format=chat", "data.blend=null"], "data.format: 'chat' needs data.blend"),
    (["train.eval_interval=5", "data.split=100,0,0"],
     "train.eval_interval: 5 needs a valid split, but data.split '100,0,0' gives it no documents"),
    (["train.eval_iters=0"], "train.eval_iters: must be >= 1"),
    (["train.eval_interval=-1"], "train.eval_interval: must be >= 0"),
    (["data.packing=true"], "data.packing: true needs data.format=chat, got 'text'"),
    (["data.truncate=false"], "data.truncate: false applies to data.format=chat only"),
    (["parallel.distributed_optimizer=false", "train.overlap_param_gather=true"],
     "train.overlap_param_gather=true needs parallel.distributed_optimizer=true"),
    (["train.overlap_grad_reduce=false", "train.overlap_param_gather=true"],
     "train.overlap_param_gather=true needs train.overlap_grad_reduce=true"),
    (["train.ddp_bucket_size=0"], "train.ddp_bucket_size: must be >= 1"),
])
def test_fine_tuning_and_validation_settings_fail_in_one_line(overrides, message):
    cfg = load_config("k2-tiny", overrides)
    with pytest.raises(ConfigError) as exc:
        resolve_layout(cfg, 1)
    assert str(exc.value).startswith(message), str(exc.value)
    assert "\n" not in str(exc.value)


def test_overlap_switches_resolve_per_platform():
    """null: overlapped on GPUs (the gather only with the distributed optimizer), off on CPU;
    an explicit gather brings the reduction with it."""
    from k2mcore.config.schema import resolve_overlap

    def r(grad, param, zero1=True, cuda=True):
        return resolve_overlap(grad, param, distributed_optimizer=zero1, cuda=cuda)

    assert r(None, None) == (True, True)
    assert r(None, None, zero1=False) == (True, False)
    assert r(None, None, cuda=False) == (False, False)
    assert r(None, True, cuda=False) == (True, True)
    assert r(True, None, cuda=False) == (True, False)
    assert r(False, False) == (False, False)


def test_setting_field_of_null_section_is_an_error():
    with pytest.raises(ConfigError, match=r"^model.rope_scaling.factor: .*model.rope_scaling, "
                                          r"which is null"):
        load_config("moonlight-16b-a3b", ["model.rope_scaling.factor=40"])


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hiden_size: 8\n")
    with pytest.raises(ConfigError, match=r"^model.hiden_size: unknown key \(section model has: "):
        load_config(str(bad))
    bad.write_text("train:\n  seq_length: long\n")
    with pytest.raises(ConfigError, match=r"^train.seq_length: expected int, got 'long'$"):
        load_config(str(bad))
    bad.write_text("extras:\n  a: 1\n")
    with pytest.raises(ConfigError, match=r"^extras: unknown key \(sections are: model, "):
        load_config(str(bad))
    bad.write_text("parallel: 3\n")
    with pytest.raises(ConfigError, match=r"^parallel: expected a mapping, got 3$"):
        load_config(str(bad))


def test_yaml_file_defaults_and_unquoted_exponents(tmp_path):
    path = tmp_path / "mini.yaml"
    path.write_text("model:\n  rms_norm_eps: 1e-5\ntrain:\n  iters: 3\n")
    cfg = load_config(str(path))
    assert cfg.model.rms_norm_eps == 1e-5  # PyYAML reads 1e-5 as a string
    assert cfg.train.iters == 3 and cfg.parallel == K2Config().parallel.resolve()


def test_missing_config_lists_presets(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config("kimi-k3")
    msg = str(exc.value)
    assert "kimi-k3" in msg and "kimi-k3.yaml" in msg
    assert "presets: deepseek-v3, k2-tiny, kimi-k2, moonlight-16b-a3b" in msg
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml: not found \(presets: "):
        load_config(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("name", sorted(INTENDED_WORLD_SIZE))
def test_dump_yaml_round_trip(name, tmp_path):
    cfg = load_config(name, ["run.name=r1"])
    dump_yaml(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(str(tmp_path / "run" / "config.yaml")) == cfg
    assert config_to_dict(cfg)["parallel"]["pp"] == cfg.parallel.pp


# ------------------------------------------------------------------ validation
INVALID = [
    # (overrides on k2-tiny, world size, the start of the message)
    (["parallel.tp=2", "parallel.sp=true"], 3,
     "world size 3 is not divisible by parallel.tp*pp*cp"),
    (["parallel.tp=8", "parallel.sp=true"], 8, "parallel.tp=8 does not divide "
                                               "model.num_attention_heads=4"),
    (["parallel.ep=3"], 3, "parallel.ep=3 does not divide model.num_experts=8"),
    (["parallel.ep=4"], 2, "world size 2 is not divisible by parallel.etp*ep*pp = 1*4*1 = 4"),
    (["parallel.ep=2", "parallel.etp=2"], 2, "world size 2 is not divisible by parallel.etp*ep*pp"),
    (["parallel.pp=3"], 3, "model.num_layers=4 is not divisible by parallel.pp=3"),
    (["parallel.pp=2", "parallel.vpp=4"], 2, "parallel.vpp=4: 2 layers per pipeline rank"),
    (["parallel.pp=4", "parallel.first_stage_layers=2", "parallel.last_stage_layers=1"], 4,
     "parallel.first_stage_layers=2, last_stage_layers=1: the remaining 1 layers"),
    (["parallel.pp=2", "parallel.first_stage_layers=1", "parallel.last_stage_layers=2"], 2,
     "parallel.first_stage_layers=1, last_stage_layers=2: leave 1 of model.num_layers=4 for 0"),
    (["parallel.pp=2", "parallel.vpp=2", "parallel.first_stage_layers=1"], 2,
     "parallel.first_stage_layers=1 is not divisible by parallel.vpp=2"),
    (["parallel.first_stage_layers=0"], 1, "parallel.first_stage_layers: must be >= 1 or null"),
    (["parallel.pp=2", "parallel.pipeline_layout=Ex|ttttL"], 2,
     "parallel.pipeline_layout: invalid layer character 'x'"),
    (["parallel.pp=2", "parallel.pipeline_layout=Et|tL"], 2,
     "parallel.pipeline_layout='Et|tL': has 2 decoder layers (t), model.num_layers=4"),
    (["parallel.pp=2", "parallel.pipeline_layout=tEt|ttL"], 2,
     "parallel.pipeline_layout='tEt|ttL': must start with E"),
    (["parallel.pp=2", "parallel.pipeline_layout=Et|tt|tL"], 2,
     "parallel.pipeline_layout='Et|tt|tL': 3 stages are not divisible by parallel.pp=2"),
    (["parallel.pp=2", "parallel.vpp=1", "parallel.pipeline_layout=Et|t|t|tL"], 2,
     "parallel.vpp=1 conflicts with parallel.pipeline_layout='Et|t|t|tL'"),
    (["parallel.pp=2", "parallel.pipeline_layout=Ett|ttmL"], 2, "parallel.pipeline_layout='Ett|"
                                                                "ttmL': holds MTP layers"),
    (["parallel.pp=2", "parallel.first_stage_layers=1", "parallel.pipeline_layout=Ett|ttL"], 2,
     "parallel.pipeline_layout='Ett|ttL' cannot be combined with parallel.first_stage_layers=1"),
    (["parallel.pipeline_layout=Et|tttL"], 1, "parallel.pipeline_layout='Et|tttL' gives 2 virtual "
                                              "stages, which require parallel.pp > 1"),
    (["parallel.vpp=2"], 1, "parallel.vpp=2 requires parallel.pp > 1"),
    (["parallel.pp=2", "parallel.vpp=2", "train.global_batch_size=3"], 2,
     "train.global_batch_size=3: 3 microbatches per step"),
    (["parallel.sp=true"], 1, "parallel.sp=true requires parallel.tp > 1"),
    (["parallel.tp=2", "parallel.sp=true", "train.seq_length=63"], 2,
     "train.seq_length=63 is not divisible by parallel.tp*cp=2"),
    (["parallel.cp=2", "train.seq_length=66"], 2, "train.seq_length=66 is not divisible by "
                                                  "2*parallel.cp=4"),
    (["train.global_batch_size=7"], 2, "train.global_batch_size=7 is not divisible by "
                                       "train.micro_batch_size*dp = 1*2 = 2"),
    (["train.micro_batch_size=0"], 1, "train.micro_batch_size: must be >= 1, got 0"),
    (["model.moe_topk=9"], 1, "model.moe_topk=9 exceeds model.num_experts=8"),
    (["model.n_group=3"], 1, "model.n_group=3 does not divide model.num_experts=8"),
    (["model.topk_group=2"], 1, "model.topk_group=2 exceeds model.n_group=1"),
    (["model.first_k_dense=5"], 1, "model.first_k_dense=5 exceeds model.num_layers=4"),
    (["model.q_lora_rank=0"], 1, "model.q_lora_rank: must be >= 1 or null, got 0"),
    (["model.attention_block_size=0"], 1, "model.attention_block_size: must be >= 1, got 0"),
    (["parallel.cp=2", "model.attention_block_size=-512"], 2,
     "model.attention_block_size: must be >= 1, got -512"),
    (["optimizer.name=sgd"], 1, "optimizer.name: 'sgd' is not one of adamw, muonclip"),
    (["train.dtype=fp16"], 1, "train.dtype: 'fp16' is not one of auto, fp32, bf16"),
    (["train.recompute=all"], 1, "train.recompute: 'all' is not one of none, selective, full"),
    (["train.recompute_modules=mlp"], 1,
     "train.recompute_modules='mlp' needs train.recompute=selective (got none)"),
    (["train.recompute=selective", "train.recompute_modules=mlp,bogus"], 1,
     "train.recompute_modules: 'mlp,bogus' (known: core_attn, layernorm, mla_up_proj, mlp, "
     "moe, moe_act, shared_experts)"),
    (["data.loader=webdataset"], 1, "data.loader: 'webdataset' is not one of auto, dali, torch"),
    (["optimizer.decay_style=exponential"], 1, "optimizer.decay_style: 'exponential' is not one of"),
    (["model.rope_scaling.type=ntk"], 1, "model.rope_scaling.type: 'ntk' is not one of yarn"),
    (["parallel.tp=2"], 2, "parallel.sp=false: MoE layers with parallel.tp=2 need sequence "
                           "parallelism"),
    (["parallel.tp=2", "parallel.sp=true", "model.ffn_hidden_size=129"], 2,
     "model.ffn_hidden_size=129 is not divisible by parallel.tp=2"),
    (["parallel.etp=3"], 3, "model.moe_ffn_hidden_size=32 is not divisible by parallel.etp=3"),
    (["train.seq_length=8192"], 1, "train.seq_length=8192 exceeds model.max_position_embeddings"),
    (["optimizer.lr=2e-4", "optimizer.min_lr=1.0"], 1, "optimizer.min_lr=1.0 exceeds optimizer.lr=0.0002"),
]


@pytest.mark.parametrize("overrides, world_size, message", INVALID)
def test_invalid_configs(overrides, world_size, message):
    cfg = load_config("k2-tiny", overrides)
    with pytest.raises(ConfigError) as exc:
        resolve_layout(cfg, world_size)
    assert str(exc.value).startswith(message), str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("overrides, world_size", [
    (["parallel.tp=2", "parallel.sp=true", "parallel.ep=2"], 4),
    (["parallel.pp=2", "parallel.vpp=2"], 2),
    (["parallel.pp=2", "parallel.pipeline_layout=Et|t|t|tL"], 4),
    (["parallel.pp=3", "parallel.first_stage_layers=1", "parallel.last_stage_layers=2"], 3),
    (["parallel.cp=2", "parallel.ep=2", "parallel.etp=2"], 4),
    (["parallel.tp=2", "parallel.sp=true", "parallel.cp=2"], 8),
])
def test_valid_variants(overrides, world_size):
    resolve_layout(load_config("k2-tiny", overrides), world_size)


def test_world_size_must_be_positive():
    with pytest.raises(ConfigError, match="world size must be a positive integer, got 0"):
        resolve_layout(load_config("k2-tiny"), 0)


@pytest.mark.parametrize("override, key", [
    ("parallel.tp=3", "parallel.tp=3"), ("parallel.ep=5", "parallel.ep=5"),
    ("parallel.pp=7", "parallel.pp=7"), ("train.micro_batch_size=0", "train.micro_batch_size"),
])
def test_kimi_k2_invalid_overrides_name_the_field(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_layout(load_config("kimi-k2", [override]), 256)


# ------------------------------------------------------------------ CLI
def _cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "k2mcore.cli.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_check_kimi_k2():
    r = _cli("--config", "kimi-k2", "--check", "--world-size", "256")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "TP=1 PP=16 VPP=2 EP=16 ETP=1 CP=1 DP=16 expert-DP=1" in out
    assert "pp0: [E+1, 2]  pp1-14: [2, 2]  pp15: [2, L]" in out
    assert "total 1.03T" in out and "active 32.9B" in out
    assert "params per rank: min 3.58B, max 4.82B" in out


def test_cli_check_default_is_k2_tiny_and_reads_world_size_env():
    r = _cli("--check")
    assert r.returncode == 0, r.stderr
    assert "config: k2-tiny  world size 1" in r.stdout
    r = _cli("--check", "--set", "train.global_batch_size=8", env_extra={"WORLD_SIZE": "2"})
    assert r.returncode == 0, r.stderr
    assert "DP=2" in r.stdout


@pytest.mark.parametrize("args", [
    ["--set", "parallel.tp=3"], ["--set", "parallel.ep=5"], ["--set", "parallel.pp=7"],
    ["--set", "train.micro_batch_size=0"], ["--set", "parallel.nonsense=1"],
    ["--set", "parallel.tp"], ["--world-size", "255"],
    ["--set", "model.attention_block_size=0"],
])
def test_cli_config_errors_are_one_line(args):
    r = _cli("--config", "kimi-k2", "--check", "--world-size", "256", *args)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("k2m-train: error: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_cli_missing_preset_and_usage_errors():
    r = _cli("--config", "no-such-model", "--check")
    assert r.returncode == 2 and "presets: deepseek-v3, k2-tiny" in r.stderr
    assert len(r.stderr.splitlines()) == 1
    r = _cli("--world-size", "abc", "--check")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = _cli("--check", env_extra={"WORLD_SIZE": "two"})
    assert r.returncode == 2 and "WORLD_SIZE" in r.stderr and "Traceback" not in r.stderr


def test_cli_check_imports_neither_torch_nor_megatron():
    code = ("import sys; from k2mcore.cli.train import main; assert main(['--config', 'kimi-k2', "
            "'--check', '--world-size', '256']) == 0; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')]; "
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_cli_train_calls_training_module(monkeypatch):
    import k2mcore.training
    from k2mcore.cli.train import main

    seen, layouts = [], []
    monkeypatch.setattr(k2mcore.training, "train",
                        lambda cfg, layout, **kw: (seen.append(cfg), layouts.append(layout)))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--set", "train.iters=2"]) == 0
    assert len(seen) == 1 and seen[0].train.iters == 2
    assert layouts[0].world_size == 1 and layouts[0].num_microbatches == 8  # the layout, carried


def test_etp_follows_tp_and_refuses_unsummed_expert_copies():
    cfg = load_config("k2-tiny", ["parallel.tp=2", "parallel.sp=true"])
    assert cfg.parallel.etp == 2  # megatron's default: experts split like the dense layers
    resolve_layout(cfg, 2)
    cfg = load_config("k2-tiny", ["parallel.tp=2", "parallel.sp=true", "parallel.etp=1"])
    with pytest.raises(ConfigError, match=r"^parallel.etp=1 with parallel.ep=1 must equal"):
        resolve_layout(cfg, 2)
    # with ep > 1 each expert lives on one rank: etp=1 under tp=2 is fine
    resolve_layout(load_config("k2-tiny", ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2",
                                     "parallel.etp=1"]), 2)


def test_recompute_modules_reach_megatron():
    """train.recompute_modules replaces K2's selective set in megatron's config."""
    from k2mcore.config.validate import recompute_modules
    from k2mcore.model.config import mla_config

    cfg = load_config("k2-tiny", ["train.recompute=selective",
                                  "train.recompute_modules=mla_up_proj, mlp"])
    mods = recompute_modules(cfg)
    assert mods == ["mla_up_proj", "mlp"]
    assert mla_config(cfg.model, recompute="selective", recompute_modules=mods).recompute_modules \
        == ["mla_up_proj", "mlp"]
    k2 = mla_config(cfg.model, recompute="selective")
    assert k2.recompute_modules == ["layernorm", "mla_up_proj", "mlp", "moe"]
