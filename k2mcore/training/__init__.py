"""Training: the loop, one forward/backward step over megatron's schedules."""
from .loop import train

__all__ = ["train"]
