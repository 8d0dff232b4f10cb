"""`tools.procmem`: the resident set the benches and tools/gpu_check.py report (one reader instead of four)."""

from __future__ import annotations

import time

import pytest

from tools.procmem import PeakRSS, rss_bytes, status_bytes


def test_peak_rss_sees_a_transient_allocation() -> None:
    with PeakRSS(interval_s=0.001) as p:
        block = bytearray(64 << 20)  # zero-filled by the allocator: resident as soon as it is touched
        block[::4096] = b"x" * len(block[::4096])
        held = rss_bytes()
        time.sleep(0.02)  # several sampling intervals while the block is resident
        del block
    # the sampler reads what the kernel says at its own instants: within a page or two of `held`, 64 MB above base
    assert p.base > 0 and p.peak >= held - (1 << 20) and p.above >= 60 << 20, (p.base, p.peak, held)
    assert status_bytes("VmHWM") > p.base // 2  # (the kernel updates VmHWM lazily: not compared to the samples)
    with pytest.raises(RuntimeError, match="no VmNothing"):
        status_bytes("VmNothing")


def test_the_benches_and_the_gpu_check_use_it() -> None:
    from tools.gpu_check import host_peak

    secs, extra = host_peak(lambda: bytearray(32 << 20)[::4096])
    assert secs >= 0 and extra >= 0
