"""Training loops, sharding, checkpoints and metrics."""
