"""Accuracy by greedy decoding (not by restricted argmax over option letters), so the number
reflects what the model actually writes: the extracted choice for multiple-choice samples, a
normalised exact match of the text for open-ended ones (no options)."""

from __future__ import annotations

import json
import re
import string
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from crystalkit.config.schema import EvalConfig
from crystalkit.crystal.layout import Layout
from crystalkit.crystal.method import Method
from crystalkit.data.sample import LETTERS, Sample
from crystalkit.errors import UsageError
from crystalkit.evaluation.buckets import area_bucket, bucket_accuracy, evidence_area
from crystalkit.evaluation.generation import (
    View,
    WrittenBlock,
    generate_answers,
    split_written,
)
from crystalkit.evaluation.replacement import LatentReplacement, written_replacement
from crystalkit.io import atomic_write_json, atomic_write_text
from crystalkit.models.backbone import Backbone
from crystalkit.runs.files import eval_file, predictions_file
from crystalkit.seeding import derived_seed

_PUNCTUATION = str.maketrans(string.punctuation, " " * len(string.punctuation))


def normalise_answer(text: str) -> str:
    """Lower case, punctuation as spaces, single spaces: ``"Two cats."`` and ``"two cats"`` match."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def extract_choice(text: str, options: Sequence[str]) -> str | None:
    """The option the model chose: the first standalone option letter in ``text``, else the option
    whose text the output is (or starts with); ``None`` if it wrote neither."""
    valid = LETTERS[: len(options)]
    match = re.search(rf"(?<![A-Za-z])([{valid}])(?![A-Za-z])", text)
    if match:
        return match.group(1)
    said = " ".join(text.lower().split())
    by_length = sorted(range(len(options)), key=lambda i: -len(options[i]))
    for i in by_length:
        option = " ".join(options[i].lower().split())
        if said == option or said.startswith(option + " "):
            return LETTERS[i]
    return None


@dataclass
class EvalResult:
    """``per_bucket``: accuracy per area bucket of the evidence
    (:mod:`~crystalkit.evaluation.buckets`), ``per_bucket_samples`` how many samples each holds;
    ``wrote_block``: with generated latents, the share of samples whose generation began with
    exactly the forced prompt's template, latent block and cue (``None`` with forced latents)."""

    accuracy: float
    chance: float
    num_samples: int
    per_category: dict[str, float]
    per_bucket: dict[str, float]
    per_bucket_samples: dict[str, int]
    predictions: list[dict[str, Any]] = field(repr=False)
    wrote_block: float | None = None

    def save(self, run_dir: Path, split: str, step: int) -> None:
        """Write ``eval_SPLIT.json`` (summary) and ``predictions_SPLIT.jsonl`` (per sample)."""
        atomic_write_json(
            run_dir / eval_file(split), {"step": step, "split": split, **self.summary()}
        )
        atomic_write_text(
            run_dir / predictions_file(split),
            "".join(json.dumps(p) + "\n" for p in self.predictions),
        )

    @classmethod
    def from_predictions(cls, predictions: list[dict[str, Any]], generated: bool) -> EvalResult:
        """The summary of prediction records (``wrote_block`` with ``generated`` latents)."""
        by_category: dict[str, list[bool]] = defaultdict(list)
        for p in predictions:
            by_category[p["category"]].append(p["correct"])
        count = max(len(predictions), 1)
        per_bucket, per_bucket_samples = bucket_accuracy(predictions)
        return cls(
            accuracy=sum(p["correct"] for p in predictions) / count,
            chance=sum(1 / p["num_options"] for p in predictions if p["num_options"]) / count,
            num_samples=len(predictions),
            per_category={k: sum(v) / len(v) for k, v in sorted(by_category.items())},
            per_bucket=per_bucket,
            per_bucket_samples=per_bucket_samples,
            predictions=predictions,
            wrote_block=sum(p["wrote_block"] for p in predictions) / count if generated else None,
        )

    def summary(self) -> dict[str, Any]:
        summary = {
            "accuracy": self.accuracy,
            "chance": self.chance,
            "num_samples": self.num_samples,
            "per_category": self.per_category,
            "per_bucket": self.per_bucket,
            "per_bucket_samples": self.per_bucket_samples,
        }
        if self.wrote_block is not None:
            summary |= {"latent_block": "generated", "wrote_block": self.wrote_block}
        return summary


def evaluate(
    backbone: Backbone,
    dataset: Dataset,
    method: Method,
    cfg: EvalConfig,
    corrupted: bool = False,
    replacement: LatentReplacement | None = None,
    view: View = "intact",
) -> EvalResult:
    """Greedy-decode an answer for every sample, after ``method``'s final latent block, and score
    the extracted choice. ``corrupted``: show the model the recipe's corrupted images instead
    (seeded per batch), to measure how much evidence the corruption leaves. ``replacement``:
    replace the latent block's content first (:mod:`crystalkit.evaluation.replacement`). ``view``
    ``copied`` / ``no_copy``: answer on the corrupted images (the same ones ``corrupted`` shows)
    from the intact images' latent block, or from one that saw no image.

    ``cfg.latent_block: generated``: the prompt ends at the question and the model writes the
    latent template and block itself (within ``max_new_tokens`` more tokens than they take); the
    answer is read after the block (:func:`~crystalkit.evaluation.generation.split_written`) and
    each prediction also records the whole generation (``written``, special tokens shown) and
    whether it began with exactly the forced template and block (``wrote_block``)."""
    decoding = _Decoding(backbone, method, cfg, corrupted, replacement, view)
    was_training = backbone.training
    backbone.eval()
    predictions = [
        prediction
        for start, samples in eval_batches(dataset, cfg)
        for prediction in decoding.batch(samples, start)
    ]
    backbone.train(was_training)
    return EvalResult.from_predictions(predictions, generated=decoding.generated)


def eval_batches(dataset: Dataset, cfg: EvalConfig) -> Iterator[tuple[int, list[Sample]]]:
    """``(index of the first sample, samples)`` of each evaluation batch: the first
    ``cfg.max_samples`` samples (all without it), ``cfg.batch_size`` at a time."""
    total = len(dataset) if cfg.max_samples is None else min(cfg.max_samples, len(dataset))
    for start in range(0, total, cfg.batch_size):
        yield start, [dataset[i] for i in range(start, min(start + cfg.batch_size, total))]


class _Decoding:
    """What one evaluation decodes, and the steps every batch goes through: its prompt layout,
    greedy decoding, and a prediction record per row."""

    def __init__(
        self,
        backbone: Backbone,
        method: Method,
        cfg: EvalConfig,
        corrupted: bool,
        replacement: LatentReplacement | None,
        view: View,
    ):
        self.generated = cfg.latent_block == "generated"
        if self.generated and view != "intact":
            raise UsageError(
                "generated latents: the copied/no_copy views put the intact images' latent block "
                "on the corrupted path at known columns; run them with forced latents"
            )
        self.backbone, self.method, self.tokenizer = backbone, method, backbone.tokenizer
        self.corrupted, self.replacement, self.view = corrupted, replacement, view
        self.device = next(backbone.parameters()).device
        #: what the model should write before the answer (generated latents; none when forced)
        self.written = method.written_ids() if self.generated else []
        block = method.block.ids(method.final_k)
        self.block_end = block[-1] if block else None
        self.budget = cfg.max_new_tokens + len(self.written)
        self.area_buckets = cfg.area_buckets

    def batch(self, samples: list[Sample], start: int) -> list[dict[str, Any]]:
        """The prediction records of the batch of ``samples`` that begins at index ``start``."""
        layout, written_block = self.prompt(
            samples, derived_seed(self.method.recipe.seed, -1 - start)
        )
        answers = generate_answers(
            self.backbone,
            layout.to(self.device),
            self.budget,
            [self.tokenizer.eos_token_id],
            None if self.generated else self.replacement,
            self.view,
            written_block,
        )
        rows = answers.tokens.tolist()
        replaced = [None] * len(rows) if answers.replaced is None else answers.replaced.tolist()
        return [
            self.record(sample, row, was_replaced)
            for sample, row, was_replaced in zip(samples, rows, replaced, strict=True)
        ]

    def prompt(self, samples: list[Sample], seed: int) -> tuple[Layout, WrittenBlock | None]:
        """The batch's prompt layout (its images corrupted with ``seed`` when they are shown
        corrupted) and, with generated latents, the replacement of the block the model writes."""
        method = self.method
        corrupt_seed = seed if self.corrupted else None
        if not self.generated:
            if self.view == "intact":
                return method.prompt_layout(samples, corrupt_seed=corrupt_seed), None
            return method.control_layout(samples, seed, blank=self.view == "no_copy"), None
        layout = method.generated_prompt_layout(samples, corrupt_seed=corrupt_seed)
        if self.replacement is None:
            return layout, None
        written_block = written_replacement(
            self.backbone, method, samples, self.replacement, corrupt_seed, self.device
        )
        return layout, written_block

    def record(self, sample: Sample, row: list[int], replaced: bool | None) -> dict[str, Any]:
        """The prediction record of a generated ``row``; ``replaced``: whether a replacement
        acted on the block the model wrote (``None``: no replacement on a written block)."""
        extra: dict[str, Any] = {}
        if self.generated:
            row, extra = self.read_written(row)
            if replaced is not None:
                extra["replaced"] = replaced
        raw = self.tokenizer.decode(row, skip_special_tokens=True)
        choice, correct = _score(raw, sample)
        area = evidence_area(sample)
        return {
            "index": sample.index,
            "category": sample.category,
            "bucket": area_bucket(area, self.area_buckets),
            "evidence_area": area,
            "question": sample.question,
            "raw": raw,
            "prediction": choice,
            "answer": sample.answer,
            "num_options": len(sample.options),
            "correct": correct,
            **extra,
        }

    def read_written(self, row: list[int]) -> tuple[list[int], dict[str, Any]]:
        """With generated latents: the answer part of ``row``, and what the model wrote (the
        whole generation up to eos, special tokens shown; whether it began with exactly the
        forced prompt's template, block and cue)."""
        eos = self.tokenizer.eos_token_id
        stop = row.index(eos) if eos in row else None
        text = self.tokenizer.decode(row[:stop], skip_special_tokens=False)
        answer, exact = split_written(row, self.written, self.method.packer.cue_ids, self.block_end)
        return answer, {"written": text, "wrote_block": exact}


def _score(raw: str, sample: Sample) -> tuple[str | None, bool]:
    """The prediction in ``raw`` and whether it is right: the extracted choice for a
    multiple-choice sample, the normalised text against the normalised answer otherwise."""
    if sample.options:
        choice = extract_choice(raw, sample.options)
        return choice, choice == sample.answer
    choice = normalise_answer(raw)
    return choice, choice == normalise_answer(sample.answer)
