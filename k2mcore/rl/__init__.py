"""Reinforcement learning on MoE models (docs in progress: issue 34). So far the objectives
(`objectives.py`): advantages, the GRPO / GSPO / K2 losses and TIS, as tensor functions; the
rollout data, the update loop and the per-layout logprobs are not built yet."""
