"""Command-line utilities that are neither the env server nor the trainer.

- `tools.eval` (`trace-eval`): evaluate any agent against an env server.
- `tools.synthetic` (`trace-world`): the seeded synthetic multi-hop world, written as jsonl that the env server reads.
- `tools.tiny_model` (`trace-tiny-model`): the tiny Qwen3-architecture model and its tokenizer, built offline.

Arrows: `tools` uses the env server only by URL and the trainer only through its public API (the policy
agent); neither the env server nor the trainer imports `tools` (the trainer runs its builders as child
processes).
"""

from shared.cpu_threads import passive_openmp_waits

passive_openmp_waits()  # before any module of this package imports torch: OpenMP reads the policy once, at load
