"""Training: the loop, optimisation, checkpoints and metrics."""
