"""k2m-plan: memory, communication and an ideal step time for any K2 layout, without a process
group or a torch device (pure python; runs in seconds for the 1T preset).

`state` rebuilds the DDP buffers and optimizer shards the trainer allocates, `activations` the
bytes saved for backward under the pipeline schedule, `comm` the bytes each rank hands to the
collectives per step, `timing` an ideal step time, `planner` puts them together with warnings,
`search` ranks the layouts of N GPUs that fit, `report` prints them."""
from __future__ import annotations

import importlib
from typing import Any

# (k2mcore.plan.search is a module; its function is k2mcore.plan.search.search)
_WHERE = {"Plan": "planner", "PlanOptions": "planner", "StageReport": "planner",
          "make_plan": "planner", "report": None}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _WHERE[name] is None:
        return importlib.import_module(f".{name}", __name__)
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
