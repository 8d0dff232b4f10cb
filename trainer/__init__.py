"""The trainer process (`trace-train`), in four parts; arrows point only downwards (`tests/test_layout.py`):

- the loop and its services (the modules of this folder): `cli`, `config` (composes every part's section),
  `loop`, `services` (child processes), `evaluate`, `sft` (the warm start), `checkpoint`, `tracking`, `plots`.
  It may import every part below.
- `trainer.algo`: the allocation algorithm — rollout trees, tree rollouts, the allocators, the success
  predictor, advantages, staleness and one TRACE step. It may import the learner and the engines.
- `trainer.learner`: the policy, its loss, its ranks (accelerate DDP/FSDP2) and its torch threads; what it
  trains on (`samples.TrainSample`) is defined here. It imports no other part.
- `trainer.engines`: the engine client (SGLang's native API), the launcher and weight sync. It imports no other
  part.

Each part's config section lives beside it (`algo.allocation.AllocationConfig`, `learner.config.OptimConfig`,
`engines.config.EngineConfig`, ...); `trainer.config.TrainConfig` composes them, so no part imports the loop's
config (the step names the shape it reads as a Protocol, `algo.step.StepConfig`).
"""

from shared.cpu_threads import passive_openmp_waits

passive_openmp_waits()  # before any module of this package imports torch: OpenMP reads the policy once, at load
