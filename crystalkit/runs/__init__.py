"""A run directory: its files, checkpoints, warm-start snapshot and component record, and building
a run's model from its recipe and loading it back (below training, evaluation and export)."""
