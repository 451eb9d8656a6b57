"""Checkpoint conversion: Hugging Face <-> k2mcore (megatron torch_dist) checkpoints, streaming.

Submodules stay import-light (torch, safetensors, tqdm): no megatron, no process group.
"""
