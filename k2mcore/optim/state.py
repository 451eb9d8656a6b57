"""The optimizer state as k2mcore's checkpoints save and load it.

Each DistributedOptimizer child saves the state its rank holds, as boxes of the model-space
tensors (k2mcore.optim.state_boxes): no rank gathers another's state, and DCP reshards on load.
megatron's non-distributed optimizers (distributed_optimizer: false) save their own model-space
form. The non-tensor optimizer state (param groups) is not saved: hyperparameters come from the
config and the scheduler, and the one counter that matters, Adam's step, is returned to the
caller to keep (k2mcore.checkpoint keeps it in metadata.json). This also makes a checkpoint
independent of how megatron splits the optimizer (1 optimizer at EP=1, dense + expert ones at
EP>1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from k2mcore.errors import CheckpointError

from . import state_boxes
from .chain import child_optimizers

OPTIMIZER_SHARDING = state_boxes.FORMAT
#: what a non-distributed child's sharded_state_dict is asked for (megatron's metadata argument)
SHARDING_METADATA = {"chained_optim_avoid_prefix": True}
_STEP_KEYS = ("step", "common_step")  # torch Adam's per-parameter state / megatron's others


@dataclass
class LoadPlan:
    """What `state_to_load` asked for: the tree for dist_checkpointing.load to fill, and the
    boxes to copy back per DistributedOptimizer child."""

    tree: dict
    boxes: dict = field(default_factory=dict)  # child index -> state_boxes.owned_state boxes


def optimizer_name(optimizer: Any) -> str:
    """'muonclip' when megatron's optimizer drives k2mcore's MuonClip, else 'adamw'."""
    from k2mcore.optim.muonclip.sharded import ShardedMuonClip

    inner = [getattr(c, "optimizer", None) for c in child_optimizers(optimizer)]
    return "muonclip" if any(isinstance(o, ShardedMuonClip) for o in inner) else "adamw"


def state_to_save(optimizer: Any, model_state: dict) -> tuple[dict, float]:
    """The sharded optimizer state to save next to `model_state` ({child index: state}, tensors
    only), and the Adam step (0 before the first step)."""
    tree, steps = {}, set()
    for i, child in enumerate(child_optimizers(optimizer)):
        _prime_state(child)
        if _is_distributed(child):
            tree[i], _ = state_boxes.owned_state(child, model_state, is_loading=False)
            steps |= _inner_steps(child.optimizer)
        else:
            sub = child.sharded_state_dict(model_state, is_loading=False,
                                           metadata=SHARDING_METADATA)
            steps |= {float(c[k]) for c, k in _walk_steps(sub) if c[k] is not None}
            tree[i] = _drop_common(sub)
    if len(steps) > 1:
        raise CheckpointError(f"optimizer step counters disagree: {sorted(steps)}")
    return tree, (steps.pop() if steps else 0.0)


def state_to_load(optimizer: Any, model_state: dict) -> LoadPlan:
    """The sharded optimizer state for dist_checkpointing.load to fill."""
    plan = LoadPlan(tree={})
    for i, child in enumerate(child_optimizers(optimizer)):
        _prime_state(child)
        if _is_distributed(child):
            plan.tree[i], plan.boxes[i] = state_boxes.owned_state(child, model_state,
                                                                   is_loading=True)
        else:
            plan.tree[i] = _drop_common(child.sharded_state_dict(
                model_state, is_loading=True, metadata=SHARDING_METADATA))
    return plan


def apply_loaded_state(optimizer: Any, plan: LoadPlan, loaded: dict,
                       adam_step: Optional[float]) -> None:
    """Put what dist_checkpointing.load returned for `plan` into each child, with the saved
    Adam step where each child reads it."""
    for i, child in enumerate(child_optimizers(optimizer)):
        if i in plan.boxes:
            state_boxes.put_loaded(loaded[i], plan.boxes[i])
            if adam_step is not None:
                state_boxes.set_step(child, adam_step)
        else:  # megatron's others: one shared state['common_step']
            if adam_step is not None:
                state = loaded[i].get("optimizer", loaded[i])["state"]
                state["common_step"] = torch.tensor(float(adam_step))
            child.load_state_dict(loaded[i])


def agreed_step(steps: list) -> Optional[float]:
    """The one Adam step all ranks report (None where no rank has an optimizer)."""
    values = {s for s in steps if s is not None}
    if len(values) > 1:
        raise CheckpointError(f"optimizer step counters disagree across ranks: {sorted(values)}")
    return values.pop() if values else None


def _is_distributed(child: Any) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(child, DistributedOptimizer)


def _inner_steps(inner: Any) -> set:
    """The step counters of a torch optimizer: per parameter (torch's Adam) or per group."""
    steps = {float(g["step"]) for g in inner.param_groups if "step" in g}
    steps |= {float(s["step"]) for s in inner.state.values() if "step" in s}
    return steps


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
