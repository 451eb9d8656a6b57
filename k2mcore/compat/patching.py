"""How k2mcore patches megatron-core or torch: every patch is declared, checked, then applied.

A `Patch` names its target by dotted path, the parameters the target must have, the megatron-core
release it was written for, why it exists and what would make it go away. `apply` checks the
target first, so a megatron bump that renames or re-signs something fails with one line naming
the patch (`CompatError`) instead of deep inside a run; `check_all` runs the same checks without
patching anything (tests/compat).
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

from k2mcore.errors import CompatError

MEGATRON_CORE = "0.19.2"  # the release every patch below was written and tested for


@dataclass(frozen=True)
class Patch:
    name: str
    target: str  # dotted path: package.module[.Class].attribute
    why: str
    remove_when: str
    params: Optional[tuple[str, ...]] = None  # the target's parameter names, in order
    for_version: str = MEGATRON_CORE

    def resolve(self) -> tuple[Any, str, Any]:
        """(owner object, attribute name, current value); CompatError when absent."""
        parts = self.target.split(".")
        owner: Any = None
        for i in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
            try:
                owner = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            rest = parts[i:]
            break
        else:
            raise self.error("its module does not import")
        for attr in rest[:-1]:
            if not hasattr(owner, attr):
                raise self.error(f"{attr} is gone")
            owner = getattr(owner, attr)
        if not hasattr(owner, rest[-1]):
            raise self.error(f"{rest[-1]} is gone")
        return owner, rest[-1], inspect.getattr_static(owner, rest[-1])

    def check(self) -> None:
        """CompatError unless the target (megatron's original, once patched) still exists and
        has the expected parameters."""
        owner, attr, value = self.resolve()
        if self.name in _applied:  # judge megatron's original, not our replacement
            value = _applied[self.name][2]
        if self.params is not None:
            func = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            try:
                found = tuple(inspect.signature(func).parameters)
            except (TypeError, ValueError):
                raise self.error("is no longer a function") from None
            if found != self.params:
                raise self.error(f"now takes ({', '.join(found)}), the patch expects "
                                 f"({', '.join(self.params)})")

    def error(self, what: str) -> CompatError:
        return CompatError(
            f"k2mcore.compat patch {self.name!r}: {self.target} {what} (written for "
            f"megatron-core {self.for_version}; why it exists: {self.why})")


PATCHES: dict[str, Patch] = {}
_applied: dict[str, tuple[Any, str, Any]] = {}


def declare(patch: Patch) -> Patch:
    PATCHES[patch.name] = patch
    return patch


def companion(main: Patch, name: str, target: str, why: str,
              params: Optional[tuple[str, ...]] = None) -> Patch:
    """Declare another target that `main` relies on; it goes away with `main`."""
    return declare(Patch(name, target, why=why, remove_when=f"as {main.name}", params=params))


def apply(patch: Patch, make: Callable[[Any], Any]) -> None:
    """Check the target, then replace it with `make(original)`. Idempotent per patch."""
    if patch.name in _applied:
        return
    patch.check()
    owner, attr, static = patch.resolve()
    setattr(owner, attr, make(getattr(owner, attr)))
    _applied[patch.name] = (owner, attr, static)


def applied() -> list[str]:
    return sorted(_applied)


def check_all(names: Optional[list[str]] = None) -> list[str]:
    """One line per declared patch whose target is missing or changed (empty: all fine)."""
    problems = []
    for name in names or sorted(PATCHES):
        try:
            PATCHES[name].check()
        except CompatError as exc:
            problems.append(str(exc))
    return problems
