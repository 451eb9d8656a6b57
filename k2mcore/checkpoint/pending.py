"""One save's writing, inline or in a background thread (checkpoint.async_save).

The thread only runs torch DCP's writing of host copies (k2mcore.compat.dist_checkpoint), whose
collectives use a gloo group of their own; everything else that talks to other ranks (agreeing
that all have finished, the commit) stays on the training thread (CheckpointManager.poll/wait).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


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
