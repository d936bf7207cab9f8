"""Evaluation: held-out accuracy with per-sample predictions."""

from crystalkit.evaluation.accuracy import EvalResult, evaluate, extract_choice

__all__ = ["EvalResult", "evaluate", "extract_choice"]
