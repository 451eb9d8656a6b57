"""The frozen reference policy of the KL term: a second model beside the policy, in the same
layout (the same process groups), loaded from a k2mcore checkpoint and never trained.

Its routers are its own: the policy's routing replay (k2mcore.rl.replay) is installed on the
policy's routers only, so the reference routes every token itself."""
from __future__ import annotations

from typing import Any

import torch


def build_reference(cfg: Any, groups: Any, path: str) -> list[torch.nn.Module]:
    """The model chunks of this rank's place in the layout, holding the weights of the
    checkpoint `path` (a step directory or a run's checkpoint root: its newest), frozen."""
    from k2mcore import checkpoint as ckpt
    from k2mcore.model.build import build_model

    chunks = build_model(cfg, groups, initialize=False)
    ckpt.load_weights(path, chunks)
    for chunk in chunks:
        chunk.eval()
        for p in chunk.parameters():
            p.requires_grad_(False)
    return chunks
