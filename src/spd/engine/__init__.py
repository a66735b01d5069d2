"""Training and evaluation engine: distributed helpers, checkpoints, the loop, evaluation."""
