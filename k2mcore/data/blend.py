"""Parsing of `data.blend` and `data.split` — pure Python, so `k2m-train --check` stays light."""
from __future__ import annotations

import math
import re
from typing import Optional

BlendSpec = tuple[list[str], Optional[list[float]]]  # megatron's (prefixes, weights or None)


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def parse_blend(text: str, key: str = "data.blend") -> BlendSpec:
    """Megatron's `--data-path` syntax: "w1 prefix1 w2 prefix2 ..." or "prefix1 prefix2 ...".

    Stricter than megatron's `get_blend_from_list`, which silently reads a blend with one bad
    weight as a list of prefixes ("0.3 a O.7 b" -> four datasets). A single prefix gets no weight
    (megatron would wrap it in a one-dataset BlendedDataset). Raises ValueError naming `key`.
    """
    items = str(text).split()
    if not items:
        raise ValueError(f"{key}: empty (expected 'w1 prefix1 w2 prefix2 ...' or prefixes)")
    if _number(items[0]) is None:  # prefixes only: weights follow the dataset sizes
        for i, item in enumerate(items):
            if _number(item) is not None:
                raise ValueError(
                    f"{key}: item {i + 1} {item!r} looks like a weight, but the blend does not "
                    f"start with one (expected 'w1 prefix1 w2 prefix2 ...' or only prefixes)"
                )
        return items, None
    if len(items) % 2:
        raise ValueError(
            f"{key}: {len(items)} items; a weighted blend needs 'weight prefix' pairs "
            f"(got {text.strip()!r})"
        )
    prefixes, weights = [], []
    for i in range(0, len(items), 2):
        weight, prefix = _number(items[i]), items[i + 1]
        if weight is None:
            raise ValueError(f"{key}: weight {items[i]!r} (item {i + 1}) is not a number")
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"{key}: weight {items[i]!r} (item {i + 1}) must be > 0")
        if _number(prefix) is not None:
            raise ValueError(
                f"{key}: item {i + 2} {prefix!r} is a number where a dataset prefix belongs"
            )
        prefixes.append(prefix)
        weights.append(weight)
    if len(prefixes) == 1:
        return prefixes, None
    return prefixes, weights


def parse_split(text: str, key: str = "data.split") -> list[float]:
    """"98,2,0" -> [0.98, 0.02, 0.0] (train, valid, test); missing entries are 0."""
    parts = [p.strip() for p in re.split(r"[,/]", str(text))]
    if not 1 <= len(parts) <= 3 or any(not p for p in parts):
        raise ValueError(f"{key}: {text!r} is not 'train,valid,test' weights, e.g. '98,2,0'")
    values = []
    for p in parts:
        v = _number(p)
        if v is None or not math.isfinite(v) or v < 0:
            raise ValueError(f"{key}: {p!r} in {text!r} is not a non-negative number")
        values.append(v)
    values += [0.0] * (3 - len(values))
    if values[0] <= 0:
        raise ValueError(
            f"{key}: {text!r} gives the train split no data (first weight must be > 0)"
        )
    total = sum(values)
    return [v / total for v in values]
