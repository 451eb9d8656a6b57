"""The rollout-engine interface: what `k2m-rl` asks of whatever generates the rollouts.

An engine holds a copy of the policy's weights, in Hugging Face names, and samples answers:

- `generate(prompts, n, sampling)` returns `n` `Rollout`s per prompt (consecutive, `group` the
  prompt's key), each with `logprobs` (log p of every response token at `sampling.temperature`,
  the distribution it sampled from), `truncated` (no end-of-turn token within
  `sampling.max_new_tokens`), and with `sampling.routes` the top-k experts of every MoE layer at
  each input position (part 2's `routes`, for R3); `reward` is left 0 (k2mcore.rl.rewards scores).
- `update_weights(named_tensors, version)` takes the policy's weights as (HF name, tensor) pairs,
  streamed bucket by bucket (k2mcore.rl.weight_sync), and the version they are; versions only
  increase, and `version` says which one the engine holds.

The shipped engine is k2mcore.rl.hf_engine.TransformersEngine. What a vLLM or SGLang adapter must
do is in docs/rl.md ("Rollout engines"); neither is shipped or tested here.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Optional, Protocol, Sequence, Union, runtime_checkable

import torch

from .rollouts import Rollout

#: an engine that has been sent no weights yet
NO_WEIGHTS = -1


@dataclass(frozen=True)
class Prompt:
    """One prompt: its chat-rendered token ids (ending with the assistant's header), a key that
    names it (the group of its samples, the seed of its sampling), what a reward needs, and its
    task's budget of new tokens."""

    ids: tuple[int, ...]
    key: str
    text: str = ""
    answer: Optional[str] = None
    budget: Optional[int] = None  # its task's token budget (None: the sampling's)


@dataclass(frozen=True)
class Sampling:
    """How to sample: temperature 0 is greedy (logprobs then at temperature 1);
    `max_new_tokens` is the per-task token budget; `seed` with each prompt's key seeds that
    prompt's generator, so samples depend on neither the batch nor the layout."""

    temperature: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    routes: bool = False


def prompt_seed(seed: int, key: str) -> int:
    """A 63-bit seed of (sampling seed, prompt key): stable across processes and runs."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@runtime_checkable
class RolloutEngine(Protocol):
    """See the module docstring."""

    version: int

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: Sampling) -> list[Rollout]:
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       version: int) -> None:
        ...


def check_version(engine: Union[RolloutEngine, int], version: int, what: str) -> None:
    """An engine must hold the policy's weights of `version` before it generates `what`."""
    from k2mcore.errors import RLError

    have = engine if isinstance(engine, int) else engine.version
    if have != version:
        held = "no weights" if have == NO_WEIGHTS else f"weight version {have}"
        raise RLError(f"rollout engine holds {held} but the policy is at version {version}: "
                      f"sync the weights before generating {what}")
