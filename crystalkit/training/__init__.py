"""Training: the loop as a recipe, data-parallel training, optimisation, warm starts, metric
loggers and CPU threads."""
