"""Peak resident memory of a block of code, for the benchmark scripts beside this file."""

from __future__ import annotations

import os
import threading
import time

import psutil


class PeakRss:
    """Peak resident-set size above the level at entry, sampled every 2 ms in a thread."""

    def __enter__(self) -> PeakRss:
        self.process = psutil.Process(os.getpid())
        self.base = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()

    @property
    def rise(self) -> int:
        """Bytes above the entry level at the peak."""
        return self.peak - self.base

    @property
    def rise_mib(self) -> float:
        """The same in MiB."""
        return self.rise / 2**20
