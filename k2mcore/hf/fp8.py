"""Block-FP8 weights as DeepSeek-V3 and Kimi-K2 release them, back to real numbers.

Each quantized `W` (float8_e4m3fn, [rows, cols]) has `W_scale_inv` (fp32,
[ceil(rows / 128), ceil(cols / 128)]): W_real[i, j] = W[i, j] * scale_inv[i // 128, j // 128].
The last block row and column are ragged when a dimension is not a multiple of 128.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from k2mcore.errors import FP8FormatError

SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


def block_size(hf_config: dict) -> tuple[int, int]:
    """`quantization_config.weight_block_size` of an HF config (DeepSeek-V3/K2: [128, 128])."""
    q = hf_config.get("quantization_config") or {}
    block = q.get("weight_block_size") or DEFAULT_BLOCK
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise FP8FormatError(f"config.json: quantization_config.weight_block_size {block!r} is not two positive ints")
    return int(block[0]), int(block[1])


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, *, block: Sequence[int] = DEFAULT_BLOCK,
               name: str = "weight") -> torch.Tensor:
    """fp32 weight * per-block scale (see the module docstring)."""
    if weight.ndim != 2:
        raise FP8FormatError(f"{name}: block-FP8 weights are matrices, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    br, bc = block
    expected = (math.ceil(rows / br), math.ceil(cols / bc))
    if tuple(scale_inv.shape) != expected:
        raise FP8FormatError(
            f"{name}{SCALE_SUFFIX}: shape {tuple(scale_inv.shape)} does not fit {name} "
            f"{rows}x{cols} in {br}x{bc} blocks (expected {expected[0]}x{expected[1]})")
    scale = scale_inv.float().repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return weight.float() * scale


def quantize(weight: torch.Tensor, *, block: Sequence[int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, fp32 scale_inv): the release format, for tests and benchmarks.
    Each block is scaled so its largest magnitude maps to e4m3's largest finite value (448)."""
    rows, cols = weight.shape
    br, bc = block
    nr, nc = math.ceil(rows / br), math.ceil(cols / bc)
    padded = torch.zeros(nr * br, nc * bc, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    amax = padded.view(nr, br, nc, bc).abs().amax(dim=(1, 3)).clamp_min(1e-12)
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    scaled = weight.float() / scale_inv.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return scaled.to(torch.float8_e4m3fn), scale_inv
