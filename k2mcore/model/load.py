"""`k2mcore.load_model`: a Hugging Face K2/DeepseekV3 directory as a 1-rank megatron model."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from k2mcore.config.schema import K2Config, ModelConfig
from k2mcore.errors import HFFormatError
from k2mcore.hf.mapping import TensorSource, hf_to_mcore, model_config_from_hf, read_hf_config

# Router buffers megatron keeps in the state dict that are statistics, not weights.
_NON_WEIGHTS = ("local_tokens_per_expert",)


class K2CausalLM(torch.nn.Module):
    """Eval-mode wrapper: input_ids [b, s] -> fp32 logits [b, s, vocab].

    `cu_seqlens` (document boundaries, [docs + 1]: 0, end of the first, ..., total) makes
    input_ids [1, total] a packed batch: each document gets the logits it would alone (attention
    within the document, RoPE positions from 0)."""

    def __init__(self, gpt: torch.nn.Module, model_config: ModelConfig) -> None:
        super().__init__()
        self.gpt = gpt
        self.config = model_config

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor,
                cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        device = next(self.gpt.parameters()).device
        input_ids = input_ids.to(device)
        if cu_seqlens is None:
            positions = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)
            return self.gpt(input_ids, positions, None).float()
        from .packing import packed_seq_params, positions_from_cu_seqlens

        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids: a packed batch is [1, total], got "
                             f"{list(input_ids.shape)}")
        total = input_ids.shape[1]
        cu_seqlens = torch.as_tensor(cu_seqlens)  # a list of boundaries does too
        params = packed_seq_params(cu_seqlens.to(device), total)
        positions = positions_from_cu_seqlens(cu_seqlens, total).to(device)[None]
        return self.gpt(input_ids, positions, None, packed_seq_params=params).float()


def load_model(path: str, device: str = "cpu") -> K2CausalLM:
    """Read a model in one process: an HF DeepseekV3/Kimi-K2 directory (config.json +
    safetensors, block-FP8 dequantized) or a k2mcore checkpoint (a step directory or a root
    holding them, saved in any layout or written by `k2m-convert hf-to-mcore`).

    Creates a 1-rank process group when none exists. Weights load in fp32 on CPU, bf16 on GPU.
    """
    from k2mcore.checkpoint.format import is_checkpoint, resolve_checkpoint

    if is_checkpoint(path):
        return _load_checkpoint(resolve_checkpoint(path), device)
    from k2mcore.hf.fp8 import block_size

    hf = read_hf_config(path)
    model_cfg = model_config_from_hf(hf, source=f"{path}/config.json")
    source = TensorSource(path, block=block_size(hf))
    gpt = _build(model_cfg, device)
    _load_weights(gpt, hf_to_mcore(source, model_cfg), where=path)
    return K2CausalLM(gpt.to(device).eval(), model_cfg).eval()


def _build(model_cfg: ModelConfig, device: str) -> torch.nn.Module:
    from k2mcore.parallel.groups import init_distributed
    from k2mcore.parallel.layout import resolve_layout

    from .build import build_model

    cfg = K2Config(model=model_cfg)
    cfg.train.dtype = "fp32" if device == "cpu" else "bf16"
    cfg.train.seq_length = model_cfg.max_position_embeddings
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("load_model runs in a single process; found a multi-rank process group")
    groups = init_distributed(resolve_layout(cfg, 1), seed=0)  # (re)builds megatron's groups
    (gpt,) = build_model(cfg, groups, use_te=False, initialize=False)
    return gpt


def _load_checkpoint(path: str, device: str) -> K2CausalLM:
    import os

    from k2mcore.checkpoint.format import CONFIG
    from k2mcore.checkpoint.manager import load_weights
    from k2mcore.config.loader import load_config

    model_cfg = load_config(os.path.join(path, CONFIG)).model
    gpt = _build(model_cfg, device)
    load_weights(path, [gpt])
    return K2CausalLM(gpt.to(device).eval(), model_cfg).eval()


def _load_weights(gpt: torch.nn.Module, named: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    state = gpt.state_dict(keep_vars=True)
    seen = set()
    for name, tensor in named:
        if name not in state:
            raise HFFormatError(f"{where}: no model tensor {name} for this config")
        dst = state[name]
        if tuple(dst.shape) != tuple(tensor.shape):
            raise HFFormatError(
                f"{where}: {name} has shape {tuple(tensor.shape)}, the config implies "
                f"{tuple(dst.shape)}"
            )
        with torch.no_grad():
            dst.copy_(tensor.to(dst.dtype))
        seen.add(name)
    missing = [
        k for k in state
        if k not in seen and not k.endswith(_NON_WEIGHTS) and not k.endswith("_extra_state")
    ]
    if missing:
        raise HFFormatError(f"{where}: no weights for {len(missing)} tensors, e.g. {missing[0]}")

