"""OpenMP's wait policy for TRACE's torch processes on shared CPU cores.

torch's CPU kernels run on an OpenMP team per thread, whose threads by default spin between parallel regions
(GNU libgomp: up to GOMP_SPINCOUNT iterations before sleeping). When another busy process holds a core (the
engine beside the trainer, a second run, the test suite), a spinning thread burns the time slice that the thread it
waits for needs, and every small op pays. With `OMP_WAIT_POLICY=PASSIVE` the threads sleep: on 2 cores an update-shaped
step of the tiny model (forward, backward of a stand-in loss, AdamW) beside a busy 2-thread process took 7.8 s against
21.3 s with the default policy, and 4.30 s against 4.14 s alone (`bench/bench_cpu_threads.py`; docs/results.md has the
figures).

The policy is read once, when the OpenMP runtime loads with torch, so it must be in the environment before the
first `import torch`: `trainer`, `engine` and `tools` call `passive_openmp_waits()` in their package `__init__`,
which runs before any of their modules imports torch. Child processes inherit it. A value the user set is kept.
"""

from __future__ import annotations

import os

POLICY_VAR = "OMP_WAIT_POLICY"


def passive_openmp_waits() -> None:
    """Set OMP_WAIT_POLICY=PASSIVE unless it is set already (then the user's value stays)."""
    os.environ.setdefault(POLICY_VAR, "PASSIVE")
