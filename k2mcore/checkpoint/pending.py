"""One save's writing, inline or in a background thread (checkpoint.async_save).

The thread only runs torch DCP's writing of host copies (k2mcore.compat.dist_checkpoint), whose
collectives use a gloo group of their own; everything else that talks to other ranks (agreeing
that all have finished, the commit) stays on the training thread (CheckpointManager.poll/wait).
`GcPause` holds Python's garbage collector off while a save or load is under way.
"""
from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional


@dataclass
class PendingSave:
    step: int
    final: str
    tmp: str
    request: Any  # megatron AsyncRequest: async_fn writes, finalize_fns run at the commit
    strategy: Any  # whose base strategy's last_writer has the checksums
    start: float
    meta: dict
    adam_step: Optional[float]
    error: Optional[str] = None  # this rank's failure, as one line
    describe: Callable[[BaseException], str] = str
    _thread: Optional[threading.Thread] = field(default=None, repr=False)

    def write(self) -> None:
        """Write this rank's shards. Also after an earlier failure on this rank (its RNG file):
        DCP's writing is collective, and the other ranks are in it."""
        try:
            self.request.async_fn(*self.request.async_fn_args, **self.request.async_fn_kwargs)
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            self.error = self.error or f"{self.final}: save failed: {self.describe(exc)}"

    def start_writing(self) -> None:
        self._thread = threading.Thread(target=self.write, name=f"k2m-save-{self.step}",
                                        daemon=True)
        self._thread.start()

    def is_writing(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def checksums(self) -> dict:
        """{path under dist/: {size, crc32}} of the files this rank's writer wrote."""
        writer = getattr(self.strategy.base_strategy, "last_writer", None)
        return dict(writer.checksums) if writer is not None and self.error is None else {}


class GcPause:
    """Python's cyclic garbage collector held off from a save's start to its commit.

    A full collection walks the whole heap (megatron's and torch's objects); one set off by a
    save's many small objects (plans, metadata) took 0.25 s here, a third of the save, and in
    an async save it would stall training from the writing thread. The objects are collected
    as usual afterwards. (Megatron-LM's --manual-gc and torchtitan's gc schedule hold it off
    for the whole of training; this holds it off only while a save is under way.)
    """

    def __init__(self) -> None:
        self._was_enabled: Optional[bool] = None

    def pause(self) -> None:
        if self._was_enabled is None:
            self._was_enabled = gc.isenabled()
            gc.disable()

    def resume(self) -> None:
        if self._was_enabled:
            gc.enable()
        self._was_enabled = None


@contextmanager
def gc_paused() -> Iterator[None]:
    """The collector held off for a block (a load: its objects, as a save's)."""
    pause = GcPause()
    pause.pause()
    try:
        yield
    finally:
        pause.resume()
