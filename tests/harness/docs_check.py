"""What keeps README.md and docs/ true to the code: every repository path they name exists, every
config key they name is a field of the schema, and every flag they give a `k2m-*` command is one
its parser has. tests/test_docs.py runs it on the docs and on planted stale text.

What is read: inline code spans and fenced code blocks. Paths count when they start with a
folder of the repository; keys when their first part is a config section (`--set` keys always);
flags when they follow a `k2m-*` command on its command line (also after `launch/local.sh N` and
`slurm/train.sbatch`, which hand their arguments to k2m-train). What is not the repository's (a
run's outputs, example paths, Hugging Face tensor names) sits in ALLOWED.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib
import os
import re
from typing import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOLDERS = ("k2mcore/", "tests/", "tools/", "benchmarks/", "launch/", "slurm/", "docs/")
COMMANDS = ("k2m-train", "k2m-convert", "k2m-plan", "k2m-preprocess", "k2m-plot", "k2m-rl")
#: what the docs may name that is not in the repository or the schema, on purpose
ALLOWED = (
    re.compile(r"^model\.layers\."),  # Hugging Face tensor names (model.layers.N ...)
    re.compile(r"^model\.(safetensors|embed_tokens|norm)\b"),  # HF file and tensor names
)

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
_INLINE = re.compile(r"`((?:[^`\n]|\n(?!\n))+)`")  # may wrap onto the next line


def doc_files(root: str = ROOT) -> list[str]:
    return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))


def code_spans(text: str) -> Iterator[str]:
    """The fenced blocks, then the inline spans outside them."""
    for block in _FENCE.finditer(text):
        yield block.group(1)
    for span in _INLINE.finditer(_FENCE.sub("", text)):
        yield span.group(1)


def _allowed(token: str) -> bool:
    return any(p.search(token) for p in ALLOWED)


# ------------------------------------------------------------------------------------- paths
def _paths(span: str) -> Iterator[str]:
    for token in re.split(r"[\s=(),;\"']+", span):
        token = token.split("::")[0].rstrip(".:")
        token = re.sub(r":\d+(-\d+)?$", "", token)  # file:line
        if token.startswith(FOLDERS):
            yield token


def _exists(path: str, root: str) -> bool:
    braces = re.match(r"^(.*)\{([^}]*)\}(.*)$", path)
    if braces:
        return all(_exists(braces.group(1) + alt + braces.group(3), root)
                   for alt in braces.group(2).split(","))
    full = os.path.join(root, path)
    return bool(glob.glob(full)) if any(c in path for c in "*?[") else os.path.exists(full)


# -------------------------------------------------------------------------------- config keys
def config_fields() -> dict:
    """{section: {field: nested dict or None}} of k2mcore.config.schema.K2Config."""
    import typing

    from k2mcore.config.schema import K2Config

    def nested(cls: type, name: str, default: object) -> object:
        """The dataclass a field holds: its default's, or an Optional[...] one's (null by
        default, like model.rope_scaling)."""
        if dataclasses.is_dataclass(default):
            return type(default)
        hint = typing.get_type_hints(cls).get(name)
        return next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)

    def walk(cls: type) -> dict:
        out = {}
        hints = {f.name: f for f in dataclasses.fields(cls)}
        for name, f in hints.items():
            default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                       else f.default)
            inner = nested(cls, name, default)
            out[name] = walk(inner) if inner is not None else None
        return out

    return walk(K2Config)


def _key_ok(key: str, fields: dict) -> bool:
    node: object = fields
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _keys(span: str, sections: set) -> Iterator[str]:
    for m in re.finditer(r"--set[\s=]+(\w+\.[\w.]+)", span):
        yield m.group(1)
    for word in span.split():
        braces = re.match(r"^\(?([\w.]+)\.\{([\w,]+)\}", word)
        if braces and braces.group(1).split(".")[0] in sections:
            for alt in braces.group(2).split(","):
                yield f"{braces.group(1)}.{alt}"
            continue
        for token in re.split(r"[,()\"']+", word):
            token = re.split(r"[=:]", token)[0].rstrip(".")
            if (re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+", token)
                    and token.split(".")[0] in sections
                    and not re.search(r"\.(py|json|yaml|md|jsonl|sh|bin|idx|png|pt)$", token)):
                yield token


# -------------------------------------------------------------------------------------- flags
def parsers() -> dict:
    """{command: parser}, and {"k2m-convert SUB": subparser} for k2m-convert's subcommands."""
    out = {}
    for command in COMMANDS:
        module = importlib.import_module("k2mcore.cli." + command.removeprefix("k2m-"))
        parser = module._parser()
        out[command] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out[f"{command} {name}"] = sub
    return out


def _command_lines(span: str) -> Iterator[str]:
    for line in span.replace("\\\n", " ").split("\n"):
        yield line.split(" #")[0]


def _flags(span: str) -> Iterator[tuple[str, str]]:
    """(command, flag) for every flag given to a k2m command in `span`."""
    for line in _command_lines(span):
        for piece in re.split(r"&&|;|\|", line):
            words = piece.split()
            for i, word in enumerate(words):
                command = None
                if word in COMMANDS:
                    command, rest = word, words[i + 1:]
                elif word.endswith("launch/local.sh") and i + 1 < len(words):
                    command, rest = "k2m-train", words[i + 2:]
                elif word.endswith("slurm/train.sbatch"):
                    command, rest = "k2m-train", words[i + 1:]
                if command is None:
                    continue
                if command == "k2m-convert" and rest and not rest[0].startswith("-"):
                    command, rest = f"{command} {rest[0]}", rest[1:]
                for arg in rest:
                    if arg.startswith("--") and len(arg) > 2:
                        yield command, arg.split("=")[0]
                break


# -------------------------------------------------------------------------------------- check
def problems(texts: dict[str, str], root: str = ROOT) -> list[str]:
    """One line per stale path, key or flag in `texts` ({file name: markdown})."""
    fields = config_fields()
    sections = set(fields)
    cli = parsers()
    out = []
    for name, text in texts.items():
        for span in code_spans(text):
            for path in _paths(span):
                if not _allowed(path) and not _exists(path, root):
                    out.append(f"{name}: no such path {path}")
            for key in _keys(span, sections):
                if not _allowed(key) and not _key_ok(key, fields):
                    out.append(f"{name}: no config key {key}")
            for command, flag in _flags(span):
                parser = cli.get(command)
                if parser is None:
                    out.append(f"{name}: no command {command}")
                elif flag not in parser._option_string_actions:
                    out.append(f"{name}: {command} has no flag {flag}")
    return sorted(set(out))
