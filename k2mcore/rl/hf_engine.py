"""The shipped rollout engine: transformers' DeepseekV3ForCausalLM, sampling with its KV cache.

vLLM and SGLang ship CUDA builds only, and megatron-core's inference engine calls CUDA
throughout, so the engine that runs everywhere (CPU CI included) is transformers' own model of
the architecture, the one `k2m-convert mcore-to-hf` exports for. The sampling loop is k2mcore's
rather than `model.generate`'s because each prompt needs its own torch.Generator (samples must
not depend on which prompts share a batch or a replica), the log-probabilities at the sampling
temperature, and the experts each MoE layer chose, read from transformers' router
(`DeepseekV3TopkRouter` returns its top-k indices) by forward hooks.

The `n` samples of one prompt run as one batch: same length, so no padding and no attention
mask; a finished sample keeps being fed its end token until the batch is done, and what comes
after its end is dropped.
"""
from __future__ import annotations

import inspect
from typing import Iterable, Optional, Sequence

import torch

from k2mcore.errors import RLError

from .engine import NO_WEIGHTS, Prompt, Sampling, prompt_seed
from .rollouts import Rollout


class TransformersEngine:
    """A `RolloutEngine` on transformers' DeepseekV3ForCausalLM built from `hf_config` (the
    dict `k2m-convert mcore-to-hf` writes as config.json); its weights come only through
    `update_weights`. `stop_ids`: the tokens that end an answer (the chat's end of turn)."""

    def __init__(self, hf_config: dict, stop_ids: Sequence[int], *,
                 dtype: torch.dtype = torch.float32) -> None:
        import transformers

        config = transformers.DeepseekV3Config(**{k: v for k, v in hf_config.items()
                                                  if k not in ("architectures", "dtype")})
        with torch.device("meta"):
            model = transformers.DeepseekV3ForCausalLM(config)
        # real storage, no random init (every tensor is overwritten by the first sync); the
        # rotary tables are computed, not synced, so that module is built again for real
        model = model.to_empty(device="cpu").to(dtype).eval()
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
        self.model = model
        self.dtype = dtype
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.version = NO_WEIGHTS
        self._targets = _checkpoint_views(model)  # what a sync must set, by HF name
        self._routers = [layer.mlp.gate for layer in model.model.layers
                         if hasattr(layer.mlp, "gate")]
        self._captured: Optional[list[list[torch.Tensor]]] = None
        # transformers 5 names the KV cache argument `cache` (`past_key_values` is deprecated);
        # earlier releases know only `past_key_values`
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        for i, router in enumerate(self._routers):
            router.register_forward_hook(self._capture_hook(i))

    # -- weights ------------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       version: int) -> None:
        if version <= self.version:
            raise RLError(f"rollout engine at weight version {self.version} was sent version "
                          f"{version}: versions must increase")
        seen: set[str] = set()
        self.version = NO_WEIGHTS  # a sync that fails half-way leaves an engine that refuses
        with torch.no_grad():
            for name, tensor in named_tensors:
                target = self._targets.get(name)
                if target is None:
                    raise RLError(f"weight sync: the engine has no tensor {name}")
                if tuple(tensor.shape) != tuple(target.shape):
                    raise RLError(f"weight sync: {name} has shape {tuple(tensor.shape)}, the "
                                  f"engine's is {tuple(target.shape)}")
                target.copy_(tensor)
                seen.add(name)
        missing = sorted(set(self._targets) - seen)
        if missing:
            raise RLError(f"weight sync left {len(missing)} engine tensors unset, e.g. "
                          f"{missing[0]}")
        self.version = version

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The engine's weights under the names of an HF checkpoint (views, experts included)."""
        return dict(self._targets)

    # -- sampling -----------------------------------------------------------------------------
    def _capture_hook(self, layer: int):
        def hook(module, args, output):
            if self._captured is not None:
                self._captured[layer].append(output[2])  # top-k indices [tokens, k]
        return hook

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: Sampling) -> list[Rollout]:
        from .engine import check_version

        if self.version == NO_WEIGHTS:
            check_version(self, 0, "rollouts")  # raises: no weights
        out: list[Rollout] = []
        for prompt in prompts:
            out.extend(self._sample(prompt, n, sampling))
        return out

    @torch.no_grad()
    def _sample(self, prompt: Prompt, n: int, sampling: Sampling) -> list[Rollout]:
        from transformers import DynamicCache

        gen = torch.Generator().manual_seed(prompt_seed(sampling.seed, prompt.key))
        p = len(prompt.ids)
        x = torch.tensor([list(prompt.ids)] * n, dtype=torch.long)
        cache = DynamicCache(config=self.model.config)
        self._captured = [[] for _ in self._routers] if sampling.routes else None
        tokens: list[list[int]] = [[] for _ in range(n)]
        logps: list[list[float]] = [[] for _ in range(n)]
        done = [False] * n
        try:
            for _ in range(prompt.budget or sampling.max_new_tokens):
                logits = self.model(input_ids=x, logits_to_keep=1, use_cache=True,
                                    **{self._cache_arg: cache}).logits[:, -1].float()
                if sampling.temperature > 0:
                    logp = torch.log_softmax(logits / sampling.temperature, dim=-1)
                    nxt = torch.multinomial(logp.exp(), 1, generator=gen)[:, 0]
                else:
                    logp = torch.log_softmax(logits, dim=-1)
                    nxt = logp.argmax(-1)
                chosen = logp.gather(-1, nxt[:, None])[:, 0]
                for i in range(n):
                    if not done[i]:
                        tokens[i].append(int(nxt[i]))
                        logps[i].append(float(chosen[i]))
                        done[i] = int(nxt[i]) in self.stop_ids
                if all(done):
                    break
                x = nxt[:, None]
            captured, self._captured = self._captured, None
        finally:
            self._captured = None
        rollouts = []
        for i in range(n):
            routes = None
            if sampling.routes:
                # input positions of prompt + response[:-1]: the prefill's p, then one per
                # decode step that fed this sample's next token
                m = len(tokens[i])
                per_layer = [torch.cat([c.view(n, -1, c.shape[-1])[i] for c in calls])
                             [:p + m - 1] for calls in captured]
                routes = torch.stack(per_layer, 1).tolist()  # [positions, layers, k]
            rollouts.append(Rollout(list(prompt.ids), tokens[i], 0.0, prompt.key,
                                    logprobs=logps[i], truncated=not done[i], routes=routes))
        return rollouts


def _checkpoint_views(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF checkpoint name -> the tensor (or view) it loads into. transformers 5 keeps a MoE
    layer's routed experts fused (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj`
    [E, H, I]) and splits checkpoints' per-expert tensors on load; a sync sends the checkpoint's
    names (what `k2m-convert mcore-to-hf` writes), so each expert's tensors are views here."""
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name.endswith(".experts.gate_up_proj"):
            prefix, half = name[:-len(".gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = t.data[e, :half]
                out[f"{prefix}.{e}.up_proj.weight"] = t.data[e, half:]
        elif name.endswith(".experts.down_proj"):
            prefix = name[:-len(".down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = t.data[e]
        else:
            out[name] = t.data
    return out
