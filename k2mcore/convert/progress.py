"""A tqdm progress bar over bytes (throughput, ETA) that also counts tensors."""
from __future__ import annotations

import sys


class Progress:
    def __init__(self, *, total_tensors: int, total_bytes: int, enabled: bool, desc: str) -> None:
        self.tensors, self.total_tensors, self._bytes = 0, total_tensors, 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def update(self, bytes_done: int, tensors: int = 1) -> None:
        """`bytes_done`: the running total read so far."""
        self.tensors += tensors
        if self.bar is not None:
            self.bar.update(max(0, bytes_done - self._bytes))
            self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)
        self._bytes = bytes_done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.total = max(self.bar.n, self._bytes)  # file sizes include headers
            self.bar.refresh()
            self.bar.close()
