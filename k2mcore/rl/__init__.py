"""Reinforcement learning on MoE models (docs/rl.md): the rollout format and its datasets
(`rollouts.py`, `preprocess.py`), the objectives (`objectives.py`) and their megatron loss
functions on vocab-parallel logits (`loss.py`), log-probabilities in any layout (`logprobs.py`),
routing replay (`replay.py`), the frozen reference policy (`reference.py`), and the policy update
the training loop calls (`update.py`)."""
