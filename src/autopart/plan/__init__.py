"""Planning: coarsen the graph into blocks, cost candidate stages, search for the best plan."""
