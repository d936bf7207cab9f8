"""Ablation grids: expand a grid file into cells, run them resumably, aggregate the results."""
