"""megatron's optimizer state as k2mcore's checkpoints save and load it.

The optimizer state is saved in megatron's 'fully_reshardable' form (model-space tensors keyed by
parameter name), the only form of megatron-core 0.19.2 that reshards over TP/PP/EP *and* DP: its
default 'fully_sharded_model_space' (deprecated) still relies on `flattened_range`, which its
ShardedTensor rejects, and 'dp_reshardable' only reshards DP. The non-tensor optimizer state
(param groups) is not saved: hyperparameters come from the config and the scheduler, and the one
counter that matters, Adam's step, is returned to the caller to keep (k2mcore.checkpoint keeps it
in metadata.json). This also makes a checkpoint independent of how megatron splits the optimizer
(1 optimizer at EP=1, dense + expert ones at EP>1).
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

from k2mcore.checkpoint.format import CheckpointError
from k2mcore.compat.dist_checkpoint import torch_adam_load_fixes

from .chain import child_optimizers

OPTIMIZER_SHARDING = "fully_reshardable"
#: what each child's sharded_state_dict is asked for (megatron's metadata argument)
SHARDING_METADATA = {"distrib_optim_sharding_type": OPTIMIZER_SHARDING,
                     "chained_optim_avoid_prefix": True}
_STEP_KEYS = ("step", "common_step")  # DistributedOptimizer param groups / megatron's others


def optimizer_name(optimizer: Any) -> str:
    """'muonclip' when megatron's optimizer drives k2mcore's MuonClip, else 'adamw'."""
    from .distributed import ShardedMuonClip

    inner = [getattr(c, "optimizer", None) for c in child_optimizers(optimizer)]
    return "muonclip" if any(isinstance(o, ShardedMuonClip) for o in inner) else "adamw"


def state_to_save(optimizer: Any, model_state: dict) -> tuple[dict, float]:
    """The sharded optimizer state to save next to `model_state` ({child index: state}, tensors
    only), and the Adam step (0 before the first step)."""
    tree = _sharded_state(optimizer, model_state, is_loading=False)
    step = _find_step(tree) or 0.0  # before _drop_common hides the counters
    return _drop_common(tree), step


def state_to_load(optimizer: Any, model_state: dict) -> dict:
    """The sharded optimizer state for dist_checkpointing.load to fill."""
    return _drop_common(_sharded_state(optimizer, model_state, is_loading=True))


def apply_loaded_state(optimizer: Any, loaded: dict, adam_step: Optional[float]) -> None:
    """Load what dist_checkpointing.load returned for `state_to_load` into each child, with the
    saved Adam step put back where each child reads it."""
    from .distributed import is_state_placeholder

    _set_step(loaded, adam_step)
    for i, child in enumerate(child_optimizers(optimizer)):
        # a Muon shard's exp_avg_sq is a memory-free placeholder (optim/distributed.py)
        with torch_adam_load_fixes(child, keep=lambda t: not is_state_placeholder(t)):
            child.load_state_dict(loaded[i])


def agreed_step(steps: list) -> Optional[float]:
    """The one Adam step all ranks report (None where no rank has an optimizer)."""
    values = {s for s in steps if s is not None}
    if len(values) > 1:
        raise CheckpointError(f"optimizer step counters disagree across ranks: {sorted(values)}")
    return values.pop() if values else None


def _sharded_state(optimizer: Any, model_state: dict, is_loading: bool) -> dict:
    """Each of megatron's (chained) optimizers' sharded state, {index: state}."""
    out = {}
    for i, child in enumerate(child_optimizers(optimizer)):
        _prime_state(child)
        out[i] = child.sharded_state_dict(model_state, is_loading=is_loading,
                                          metadata=SHARDING_METADATA)
    return out


def _prime_state(child: Any) -> None:
    """Allocate the state of an optimizer that has not stepped yet, so it has tensors to save
    or load into. Zero moments (and step 0) are exactly what its first step would start from.

    torch's Adam also needs a per-parameter 'step' once its state is non-empty, and megatron's
    DistributedOptimizer.state_dict() asserts on it when it drives torch's Adam (no TE/Apex).
    """
    inner = getattr(child, "optimizer", None)
    init = getattr(child, "init_state_fn", None)
    if inner is None or init is None or len(inner.state) > 0:
        return
    init(inner, child.config)
    if isinstance(inner, torch.optim.Adam):  # AdamW too; TE's FusedAdam keeps step per group
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p].setdefault("step", torch.tensor(0.0))


def _drop_common(tree: dict) -> dict:
    """Wrap every non-tensor leaf as non-persistent: not saved, and handed back as it is on load
    (from the freshly built optimizer) — see the module docstring."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import (
        LocalNonpersistentObject,
        ShardedBase,
    )

    def wrap(v: Any) -> Any:
        return v if isinstance(v, (ShardedBase, LocalNonpersistentObject)) \
            else LocalNonpersistentObject(v)

    return dict_list_map_inplace(wrap, tree)


def _walk_steps(tree: Any) -> Iterator[tuple[Any, Any]]:
    """(container, key) of every Adam step counter in an optimizer state tree."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k in _STEP_KEYS and not isinstance(v, (dict, list)):
                yield tree, k
            else:
                yield from _walk_steps(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _walk_steps(v)


def _find_step(tree: Any) -> Optional[float]:
    values = {float(c[k]) for c, k in _walk_steps(tree) if c[k] is not None}
    if len(values) > 1:
        raise CheckpointError(f"optimizer step counters disagree: {sorted(values)}")
    return values.pop() if values else None


def _set_step(tree: dict, value: float) -> None:
    """Put the saved Adam step where each optimizer's load_state_dict reads it."""
    for child in tree.values():
        if "param_state_sharding_type" in child:  # DistributedOptimizer: in its param groups
            for group in child["optimizer"]["param_groups"]:
                group["step"] = int(value)
        else:  # megatron's other optimizers: one shared state['common_step']
            child.get("optimizer", child)["state"]["common_step"] = torch.tensor(float(value))
