"""`tools.procmem`: the resident set the benches and tools/gpu_check.py report (one reader instead of four)."""

from __future__ import annotations

import mmap
import time

import pytest

from tools.procmem import PeakRSS, rss_bytes, status_bytes


def test_peak_rss_sees_a_transient_allocation() -> None:
    with PeakRSS(interval_s=0.001) as p:
        # a fresh anonymous mapping, resident page by page as it is touched (a bytearray may reuse memory malloc
        # already holds resident: in a long test process it once raised the resident set by one page)
        block = mmap.mmap(-1, 64 << 20)
        for off in range(0, len(block), mmap.PAGESIZE):
            block[off] = 1
        held = rss_bytes()
        time.sleep(0.02)  # several sampling intervals while the block is resident
        block.close()
    # the sampler reads what the kernel says at its own instants: within a page or two of `held`, 64 MB above base
    assert p.base > 0 and p.peak >= held - (1 << 20) and p.above >= 60 << 20, (p.base, p.peak, held)
    assert status_bytes("VmHWM") > p.base // 2  # (the kernel updates VmHWM lazily: not compared to the samples)
    with pytest.raises(RuntimeError, match="no VmNothing"):
        status_bytes("VmNothing")


def test_the_benches_and_the_gpu_check_use_it() -> None:
    from tools.gpu_check import host_peak

    secs, extra = host_peak(lambda: bytearray(32 << 20)[::4096])
    assert secs >= 0 and extra >= 0
