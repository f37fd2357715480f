"""Run a plan: stage modules, row routing between replicas, the GPipe schedule."""
