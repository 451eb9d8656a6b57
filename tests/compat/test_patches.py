"""Every patch of megatron-core or torch internals is declared in k2mcore.compat, its target still
exists with the parameters the patch was written against, and a changed target fails in one line
naming the patch."""
from __future__ import annotations

import os
import re
import sys
import types

import pytest

from k2mcore import compat
from k2mcore.compat.patching import Patch, apply
from k2mcore.errors import CompatError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_declared_target_exists_with_its_signature():
    modules = compat.declared_modules()
    assert modules == ["cpu", "dist_checkpoint", "mla", "param_sync", "uneven_shards"]
    names = sorted(compat.PATCHES)
    assert len(names) >= 15, names
    assert compat.check_all() == []
    for patch in compat.PATCHES.values():
        assert patch.why and patch.remove_when and patch.for_version == compat.MEGATRON_CORE


def _fake_module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def test_a_changed_signature_is_one_line_naming_the_patch():
    def target(a, b, c=None):
        return a

    _fake_module("k2m_fake_megatron", target=target)
    ok = Patch("fake-ok", "k2m_fake_megatron.target", params=("a", "b", "c"), why="w",
               remove_when="r")
    ok.check()
    changed = Patch("fake-changed", "k2m_fake_megatron.target", params=("a", "b"),
                    why="gloo needs it", remove_when="r")
    with pytest.raises(CompatError) as err:
        changed.check()
    msg = str(err.value)
    assert "\n" not in msg and "'fake-changed'" in msg and "k2m_fake_megatron.target" in msg
    assert "now takes (a, b, c)" in msg and compat.MEGATRON_CORE in msg
    gone = Patch("fake-gone", "k2m_fake_megatron.renamed", why="w", remove_when="r")
    with pytest.raises(CompatError, match="'fake-gone': k2m_fake_megatron.renamed renamed is gone"):
        gone.check()
    # apply refuses before touching anything
    with pytest.raises(CompatError):
        apply(changed, lambda orig: None)
    assert sys.modules["k2m_fake_megatron"].target is target


def test_apply_checks_then_replaces_once():
    def target(x):
        return x

    mod = _fake_module("k2m_fake_megatron2", target=target)
    patch = Patch("fake-apply", "k2m_fake_megatron2.target", params=("x",), why="w",
                  remove_when="r")
    apply(patch, lambda orig: lambda x: orig(x) + 1)
    apply(patch, lambda orig: lambda x: orig(x) + 100)  # idempotent: applied once
    assert mod.target(1) == 2
    patch.check()  # judged against megatron's original, not the replacement
    assert "fake-apply" in compat.applied()


# `module.attr = ...` or setattr(module, ...) on torch or megatron objects
_ASSIGN = re.compile(r"^\s*(torch|dist|megatron|mtorch|mrandom|p2p|serialization)(\.\w+)+\s*=[^=]")
_SETATTR = re.compile(r"setattr\(\s*(torch|dist|megatron|mtorch|mrandom)\b")


def test_no_patch_lives_outside_the_compat_package():
    offenders = []
    for base, _, files in os.walk(os.path.join(ROOT, "k2mcore")):
        if os.path.relpath(base, ROOT).startswith(os.path.join("k2mcore", "compat")):
            continue
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(base, name)
            with open(path) as f:
                for no, line in enumerate(f, 1):
                    if _ASSIGN.search(line) or _SETATTR.search(line):
                        offenders.append(f"{os.path.relpath(path, ROOT)}:{no}: {line.strip()}")
    assert offenders == []


def test_only_compat_knows_the_cpu_backend():
    users = []
    for base, _, files in os.walk(ROOT):
        if any(part in base for part in (".venv", ".git", os.path.join("k2mcore", "compat"),
                                         os.path.join("tests", "compat"))):
            continue
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(base, name)) as f:
                    if re.search(r"compat\.cpu\b|compat import cpu\b|cpu_backend", f.read()):
                        users.append(os.path.relpath(os.path.join(base, name), ROOT))
    # the layout benchmark measures the shim's own overhead, so it may name it
    assert users == [os.path.join("benchmarks", "bench_layouts.py")]


def test_te_spec_keeps_its_modules_but_builds_the_spec_norms():
    """On TE (not runnable here) megatron's own MLA layer spec is used with only its attention
    class swapped, so 0.19's resolver cannot add a norm before a Moonlight-style linear_q_proj."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from k2mcore.compat.mla import SpecNormMLASelfAttention, with_spec_norms

    spec = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True)
    assert spec.submodules.self_attention.module is MLASelfAttention
    swapped = with_spec_norms(spec)
    attn = swapped.submodules.self_attention
    assert attn.module is SpecNormMLASelfAttention
    assert attn.submodules == spec.submodules.self_attention.submodules
    assert swapped.submodules.mlp == spec.submodules.mlp
    assert spec.submodules.self_attention.module is MLASelfAttention  # the original untouched


def test_only_the_platform_helper_asks_for_cuda_or_te():
    askers = []
    for base, _, files in os.walk(os.path.join(ROOT, "k2mcore")):
        for name in files:
            path = os.path.join(base, name)
            if name.endswith(".py") and os.path.relpath(path, ROOT) != os.path.join(
                    "k2mcore", "platform.py"):
                with open(path) as f:
                    text = f.read()
                if re.search(r"cuda\.is_available\(|import transformer_engine", text):
                    askers.append(os.path.relpath(path, ROOT))
    assert askers == []
