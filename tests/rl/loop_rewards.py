"""A reward for test_rl_loop.py's k2m-rl runs (`rl.reward=loop_rewards:...`, this directory on
PYTHONPATH): the judge hook's path, a callable that fails on one prompt."""
from __future__ import annotations


def fails_on_a_three(prompt, response: str) -> float:
    """Exact match, but a prompt whose answer is 3 makes it raise (a judge that broke)."""
    if prompt.answer == "3":
        raise ValueError("the judge timed out")
    return float(response.strip() == prompt.answer)
