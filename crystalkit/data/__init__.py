"""Datasets, samples and batching."""
