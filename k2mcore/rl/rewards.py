"""Rewards: verifiable ones (exact match, a math-answer checker) and a judge hook.

A reward function takes a prompt (`k2mcore.rl.engine.Prompt`: its text and reference answer) and
a response's text (up to the end of turn) and returns a finite number. `rl.reward` names one:
`exact_match`, `math`, or `module:function` for anything else (a judge: K2's self-critique
rubric reward, a model behind an API, ...), imported once per process. A function that raises,
or returns something other than a finite number, stops the iteration with one line naming the
prompt (`RLError`), before any update uses the batch.
"""
from __future__ import annotations

import importlib
import math
import re
from fractions import Fraction
from typing import Callable, Optional, Sequence

from k2mcore.errors import ConfigError, RLError

from .engine import Prompt

RewardFn = Callable[[Prompt, str], float]


def exact_match(prompt: Prompt, response: str) -> float:
    """1 when the response, stripped, is the reference answer, stripped; else 0."""
    return float(response.strip() == (prompt.answer or "").strip())


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def parse_number(text: str) -> Optional[Fraction]:
    """The final answer of a math response: the last \\boxed{...} if any, else the last number
    (integer, decimal or a/b); commas in numbers ignored. None when there is none."""
    boxed = _BOXED.findall(text)
    found = _NUMBER.findall((boxed[-1] if boxed else text).replace(",", ""))
    if not found:
        return None
    try:
        return Fraction(found[-1])
    except (ValueError, ZeroDivisionError):
        return None


def math_answer(prompt: Prompt, response: str) -> float:
    """1 when the response's final number equals the reference answer's as a rational number
    (so 0.5, 1/2 and \\boxed{0.50} all match "1/2"); else 0."""
    want = parse_number(prompt.answer or "")
    if want is None:
        raise ValueError(f"the reference answer {prompt.answer!r} holds no number")
    got = parse_number(response)
    return float(got is not None and got == want)


BUILTIN: dict[str, RewardFn] = {"exact_match": exact_match, "math": math_answer}


def load_reward(spec: str) -> RewardFn:
    """`rl.reward`: a built-in name or `module:function` (a judge or any custom reward)."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"rl.reward={spec!r}: not one of {', '.join(BUILTIN)} nor "
                          f"'module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"rl.reward={spec!r}: cannot import it ({type(exc).__name__}: {exc})") \
            from None
    if not callable(fn):
        raise ConfigError(f"rl.reward={spec!r} is not callable")
    return fn


def judge_reward(judge: Callable[[str, str, str], float], rubric: str) -> RewardFn:
    """A judge as a reward: `judge(prompt text, response, rubric)` -> a score (K2's
    self-critique rubric reward: the policy, or another model, scores a response against the
    rubric). k2mcore ships no judge model; the hook makes any callable one."""
    def reward(prompt: Prompt, response: str) -> float:
        return judge(prompt.text, response, rubric)
    return reward


def score(fn: RewardFn, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
    """`fn` on each (prompt, response); one RLError line naming the prompt on failure."""
    out = []
    for prompt, text in zip(prompts, responses):
        try:
            value = fn(prompt, text)
        except Exception as exc:
            raise RLError(f"reward {getattr(fn, '__name__', fn)!s} failed on prompt "
                          f"{prompt.key!r} ({prompt.text[:60]!r}): {type(exc).__name__}: "
                          f"{exc}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise RLError(f"reward {getattr(fn, '__name__', fn)!s} returned {value!r} for "
                          f"prompt {prompt.key!r}: a finite number is needed")
        out.append(float(value))
    return out
