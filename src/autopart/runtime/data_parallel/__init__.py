"""Replicas of a stage: which ranks hold each parameter and the gradient sums over them
(`holders`, with DDP-style buckets in `overlap`), ZeRO's shards (`zero`), and the user's
optimizer cut down to what this rank steps (`local_optimizer`)."""

from autopart.runtime.data_parallel.holders import Holders
from autopart.runtime.data_parallel.local_optimizer import LocalOptimizer
from autopart.runtime.data_parallel.zero import ShardedStep, assign_shards

__all__ = ["Holders", "LocalOptimizer", "ShardedStep", "assign_shards"]
