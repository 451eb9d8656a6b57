"""The pipeline split of a K2Config: which layers each (pipeline rank, virtual stage) holds.

It mirrors megatron-core 0.19.2 (`TransformerConfig.__post_init__`, `get_num_layers_to_build`,
`get_transformer_layer_offset`, `PipelineParallelLayerLayout`). Importing megatron's layout class
costs ~5 s (it pulls torch and parallel_state), which `--check` cannot afford, so the
layout-string parser is reimplemented here and tested against megatron's.
"""
from __future__ import annotations

import re
from typing import Optional

from k2mcore.config.schema import ModelConfig, ParallelConfig
from k2mcore.errors import ConfigError

# Megatron's layout characters: E embedding, L loss (final norm + output layer), t decoder layer,
# m MTP layer.
LAYOUT_CHARS = {"E": "embedding", "L": "loss", "t": "decoder", "m": "mtp"}


def parse_pipeline_layout(layout: str, key: str = "parallel.pipeline_layout") -> list[str]:
    """Layout string -> one string of layer characters per stage, in megatron's stage order
    (stage index = vp_stage * pp + pp_rank). Same syntax as PipelineParallelLayerLayout."""
    text = layout.replace(",", "")  # commas are cosmetic
    for pattern in (r"\(([^)]+)\)\*(\d+)", r"(.)\*(\d+)"):  # (..)*n first, then x*n
        text = re.sub(pattern, lambda m: m.group(1) * int(m.group(2)), text)
    stages = text.split("|")
    for stage in stages:
        for char in stage:
            if char not in LAYOUT_CHARS:
                raise ConfigError(
                    f"{key}: invalid layer character {char!r} in {layout!r} "
                    f"(known: {', '.join(LAYOUT_CHARS)})"
                )
    return stages


Stages = list[list[str]]  # [pp_rank][vp_stage] -> layout chars of that chunk, e.g. "Ett"


def pipeline_stages(model: ModelConfig, par: ParallelConfig) -> tuple[Stages, Optional[int]]:
    """Return ([pp_rank][vp_stage] -> stage contents like "Ett", vpp as megatron resolves it).

    vpp is None when the schedule is not interleaved. Raises ConfigError with megatron's rules.
    """
    pp, num_layers = par.pp, model.num_layers
    if par.pipeline_layout is not None:
        return _stages_from_layout(model, par)
    vpp = par.vpp
    chunks = vpp or 1
    first, last = par.first_stage_layers, par.last_stage_layers
    if first is not None or last is not None:
        counts = _uneven_counts(num_layers, pp, vpp, first, last)
    else:
        if num_layers % pp:
            raise ConfigError(
                f"model.num_layers={num_layers} is not divisible by parallel.pp={pp} "
                f"(set parallel.first_stage_layers/last_stage_layers or parallel.pipeline_layout)"
            )
        if (num_layers // pp) % chunks:
            raise ConfigError(
                f"parallel.vpp={vpp}: {num_layers // pp} layers per pipeline rank "
                f"(model.num_layers={num_layers} / parallel.pp={pp}) are not divisible by it"
            )
        counts = [num_layers // pp] * pp
    stages = [["t" * (counts[r] // chunks) for _ in range(chunks)] for r in range(pp)]
    stages[0][0] = "E" + stages[0][0]
    stages[-1][-1] += "L"
    return stages, vpp


def _uneven_counts(
    num_layers: int, pp: int, vpp: Optional[int], first: Optional[int], last: Optional[int]
) -> list[int]:
    """Layers per pipeline rank with first/last-stage counts (megatron's uneven-PP rules)."""
    middle_layers, middle_stages = num_layers, pp
    for name, value in (("first_stage_layers", first), ("last_stage_layers", last)):
        if value is None:
            continue
        if vpp is not None and value % vpp:
            raise ConfigError(f"parallel.{name}={value} is not divisible by parallel.vpp={vpp}")
        middle_layers -= value
        middle_stages -= 1
    if middle_stages < 0:
        raise ConfigError(
            f"parallel.first_stage_layers={first} and last_stage_layers={last} need "
            f"parallel.pp >= 2 (got pp={pp})"
        )
    if vpp is not None and middle_stages == 0:
        # megatron-core 0.19.2 get_transformer_layer_offset divides by the middle-stage count
        raise ConfigError(
            f"parallel.vpp={vpp} with parallel.first_stage_layers={first} and last_stage_layers="
            f"{last} at parallel.pp={pp} leaves no middle stage, which megatron cannot offset "
            f"(use parallel.pipeline_layout)"
        )
    if bool(middle_layers) != bool(middle_stages) or middle_layers < 0:
        raise ConfigError(
            f"parallel.first_stage_layers={first}, last_stage_layers={last}: leave "
            f"{middle_layers} of model.num_layers={num_layers} for {middle_stages} middle stages "
            f"(parallel.pp={pp})"
        )
    per_middle = middle_layers // middle_stages if middle_stages else 0
    if middle_stages and middle_layers % middle_stages:
        raise ConfigError(
            f"parallel.first_stage_layers={first}, last_stage_layers={last}: the remaining "
            f"{middle_layers} layers are not divisible by the {middle_stages} middle stages"
        )
    if middle_stages and vpp is not None and per_middle % vpp:
        raise ConfigError(
            f"parallel.vpp={vpp}: {per_middle} layers per middle pipeline rank are not divisible "
            f"by it"
        )
    counts = [per_middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def _stages_from_layout(model: ModelConfig, par: ParallelConfig) -> tuple[Stages, Optional[int]]:
    key, layout, pp = "parallel.pipeline_layout", par.pipeline_layout, par.pp
    if par.first_stage_layers is not None or par.last_stage_layers is not None:
        raise ConfigError(
            f"{key}={layout!r} cannot be combined with parallel.first_stage_layers="
            f"{par.first_stage_layers}/last_stage_layers={par.last_stage_layers}"
        )
    flat = parse_pipeline_layout(layout, key)
    if len(flat) % pp:
        raise ConfigError(
            f"{key}={layout!r}: {len(flat)} stages are not divisible by parallel.pp={pp}")
    detected = len(flat) // pp
    if par.vpp is not None and par.vpp != detected:
        raise ConfigError(
            f"parallel.vpp={par.vpp} conflicts with {key}={layout!r}, which gives "
            f"{len(flat)} stages / pp {pp} = {detected} virtual stages per rank"
        )
    vpp = par.vpp if par.vpp is not None else (detected if detected > 1 else None)
    order = "".join(flat)  # megatron's flatten order: vp-major, then pp rank
    problems = []
    if not order.startswith("E"):
        problems.append("must start with E (embedding)")
    if not order.endswith("L"):
        problems.append("must end with L (loss)")
    if order.count("E") != 1 or order.count("L") != 1:
        problems.append("must hold exactly one E and one L")
    if order.count("m"):
        problems.append("holds MTP layers (m), which this trainer does not build")
    if order.count("t") != model.num_layers:
        problems.append(
            f"has {order.count('t')} decoder layers (t), model.num_layers={model.num_layers}")
    if problems:
        raise ConfigError(f"{key}={layout!r}: " + "; ".join(problems))
    stages = [[flat[v * pp + r] for v in range(detected)] for r in range(pp)]
    return stages, vpp
