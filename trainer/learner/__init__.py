"""The learner: the policy and its update (accelerate, DDP/FSDP2), the loss, the ranks, the torch threads and the
sample type it trains on. Imports no other part of the trainer."""
