"""How the training commands (k2m-train, k2m-rl) end: exit status and one line."""
from __future__ import annotations

import sys
from typing import Callable


def run_to_exit(prog: str, run: Callable[[], object]) -> int:
    """`run()` on this rank: 0 when it finishes (its process groups torn down), 1 when the run
    itself went wrong (too many skipped steps), 2 for bad input found once ranks exist (a
    checkpoint, a data file, a prompt): one line, no traceback."""
    from k2mcore.errors import K2Error, TooManySkippedSteps

    try:
        run()
        # a clean exit: process groups torn down before the interpreter's own teardown, which
        # otherwise races gloo's threads (an occasional "terminate called" abort at exit)
        from k2mcore.parallel.groups import destroy_distributed

        destroy_distributed()
    except TooManySkippedSteps as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except K2Error as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0
