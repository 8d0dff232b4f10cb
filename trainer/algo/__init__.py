"""The allocation algorithm (DESIGN §1): trees, tree rollouts, allocators, the success predictor, advantages and
one TRACE step. Imports the learner (the step featurises and updates through the policy) and the engines (the
rollout runner drives the engine client); never the loop above it."""
