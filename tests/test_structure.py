"""The package's shape, held by tests: the layout is asked of megatron's globals in one place, the
loop reads top to bottom in short helpers, and long modules say why they are long."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "k2mcore")
MAX_LINES = 500
LONG_REASON = "Why this module is long:"


def _sources() -> dict[str, str]:
    out = {}
    for base, _, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(base, name)
                with open(path) as f:
                    out[os.path.relpath(path, ROOT)] = f.read()
    return out


def _reads_parallel_state(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("megatron.core.parallel_state"):
                return True
            if node.module == "megatron.core" and any(a.name == "parallel_state" for a in node.names):
                return True
        if isinstance(node, ast.Import) and any(
                a.name.startswith("megatron.core.parallel_state") for a in node.names):
            return True
    return False


def test_only_the_groups_module_reads_megatrons_parallel_state():
    """k2mcore's code takes the carried Layout and ProcessGroups; only parallel/groups.py (which
    builds them) and the compatibility package (which patches megatron) touch the globals."""
    allowed = {os.path.join("k2mcore", "parallel", "groups.py")}
    readers = [path for path, text in _sources().items()
               if path not in allowed and not path.startswith(os.path.join("k2mcore", "compat"))
               and _reads_parallel_state(ast.parse(text))]
    assert readers == []


def test_no_module_over_500_lines_without_a_reason_at_its_top():
    long = [f"{path}: {text.count(chr(10))} lines" for path, text in _sources().items()
            if text.count("\n") > MAX_LINES and LONG_REASON not in (ast.get_docstring(
                ast.parse(text)) or "")]
    assert long == []


def test_the_loop_reads_top_to_bottom_in_short_helpers():
    path = os.path.join(PKG, "training", "loop.py")
    tree = ast.parse(open(path).read())
    functions = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
                 if isinstance(n, ast.FunctionDef)}
    assert {"train", "set_up", "resume", "_steps", "_step", "_finish"} <= set(functions)
    assert max(functions.values()) <= 50, functions


#: What `k2m-train --check`, `k2m-plan` and config loading import: a 1T preset is validated and
#: planned in a fraction of a second because none of it pulls torch or megatron.
TORCH_FREE = ("k2mcore.errors", "k2mcore.parallel.layout", "k2mcore.parallel.pipeline",
              "k2mcore.parallel.param_counts", "k2mcore.optim.muonclip.shard_plan",
              "k2mcore.optim.muonclip.ns_offload", "k2mcore.checkpoint.format")
TORCH_FREE_PACKAGES = ("config", "plan")


def test_the_torch_free_modules_import_neither_torch_nor_megatron():
    """Each module in a fresh interpreter of its own, so that one module's imports cannot hide
    another's."""
    import subprocess
    import sys

    modules = list(TORCH_FREE)
    for package in TORCH_FREE_PACKAGES:
        for name in sorted(os.listdir(os.path.join(PKG, package))):
            if name.endswith(".py"):
                stem = name[:-3]
                modules.append(f"k2mcore.{package}" + ("" if stem == "__init__" else f".{stem}"))
    check = ("import importlib, sys; importlib.import_module(sys.argv[1]); "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron'}))")
    heavy = {}
    for module in modules:
        out = subprocess.run([sys.executable, "-c", check, module], capture_output=True,
                             text=True, check=True, cwd=ROOT).stdout.strip()
        if out != "[]":
            heavy[module] = out
    assert len(modules) >= 19 and heavy == {}


def test_every_error_class_lives_in_errors_and_derives_from_k2error():
    """One home and one base: a CLI catches K2Error and prints one line; callers keep catching
    the built-in base (ValueError for bad input, RuntimeError for a broken run)."""
    from k2mcore import errors

    elsewhere = []
    for path, text in _sources().items():
        if path == os.path.join("k2mcore", "errors.py"):
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception"))
                    for b in node.bases):
                elsewhere.append(f"{path}: {node.name}")
    assert elsewhere == []
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, Exception) and c is not errors.K2Error]
    assert len(classes) == 11
    for cls in classes:
        assert issubclass(cls, errors.K2Error) and issubclass(cls, (ValueError, RuntimeError))
        assert str(cls("a  line\n  and its   tail")) == "a line and its tail"
