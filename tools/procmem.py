"""This process's memory as Linux reports it (`/proc/self/status`), for the benches and `tools/gpu_check.py`: the
resident set now (`rss_bytes`), the high-water mark (`status_bytes("VmHWM")`), and the highest resident set seen while
a block runs (`PeakRSS`, a sampling thread: VmHWM cannot be reset, so a peak above a later baseline needs sampling)."""

from __future__ import annotations

import threading


def status_bytes(field: str) -> int:
    """`field` of /proc/self/status (VmRSS, VmHWM, ...) in bytes; RuntimeError when the kernel does not report it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_bytes() -> int:
    """The resident set size now."""
    return status_bytes("VmRSS")


class PeakRSS:
    """`with PeakRSS() as p: ...`: p.base is the resident set on entry, p.peak the highest seen until exit (sampled
    every `interval_s` on a daemon thread, and once more on exit); p.above = peak - base."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.base = self.peak = 0

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-rss")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def above(self) -> int:
        return self.peak - self.base
