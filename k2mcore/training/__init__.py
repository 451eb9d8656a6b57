"""Training: forward/backward over megatron's pipeline schedules (the loop comes with the trainer)."""
