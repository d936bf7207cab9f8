"""Accuracy by greedy decoding (not by restricted argmax over option letters), so the number
reflects what the model actually writes: the extracted choice for multiple-choice samples, a
normalised exact match of the text for open-ended ones (no options)."""

from __future__ import annotations

import json
import re
import string
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from crystalkit.config.schema import EvalConfig
from crystalkit.crystal.method import Method
from crystalkit.data.sample import LETTERS
from crystalkit.errors import UsageError
from crystalkit.evaluation.generation import View, generate_answers, split_written
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
    """``wrote_block``: with generated latents, the share of samples whose generation began with
    exactly the forced prompt's template, latent block and cue (``None`` with forced latents)."""

    accuracy: float
    chance: float
    num_samples: int
    per_category: dict[str, float]
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

    def summary(self) -> dict[str, Any]:
        summary = {
            "accuracy": self.accuracy,
            "chance": self.chance,
            "num_samples": self.num_samples,
            "per_category": self.per_category,
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
    generated = cfg.latent_block == "generated"
    if generated and view != "intact":
        raise UsageError(
            "generated latents: the copied/no_copy views put the intact images' latent block on "
            "the corrupted path at known columns; run them with forced latents"
        )
    written = method.written_ids() if generated else []
    block = method.block.ids(method.final_k)
    block_end = block[-1] if block else None
    budget = cfg.max_new_tokens + len(written)
    was_training = backbone.training
    backbone.eval()
    tokenizer = backbone.tokenizer
    device = next(backbone.parameters()).device
    total = len(dataset) if cfg.max_samples is None else min(cfg.max_samples, len(dataset))
    predictions: list[dict[str, Any]] = []
    for start in range(0, total, cfg.batch_size):
        samples = [dataset[i] for i in range(start, min(start + cfg.batch_size, total))]
        seed = derived_seed(method.recipe.seed, -1 - start)
        corrupt_seed = seed if corrupted else None
        written_block = None
        if generated:
            layout = method.generated_prompt_layout(samples, corrupt_seed=corrupt_seed)
            if replacement is not None:
                written_block = written_replacement(
                    backbone, method, samples, replacement, corrupt_seed, device
                )
        elif view == "intact":
            layout = method.prompt_layout(samples, corrupt_seed=corrupt_seed)
        else:
            layout = method.control_layout(samples, seed, blank=view == "no_copy")
        answers = generate_answers(
            backbone,
            layout.to(device),
            budget,
            [tokenizer.eos_token_id],
            None if generated else replacement,
            view,
            written_block,
        )
        for i, (sample, row) in enumerate(zip(samples, answers.tokens.tolist(), strict=True)):
            extra: dict[str, Any] = {}
            if generated:
                stop = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else None
                text = tokenizer.decode(row[:stop], skip_special_tokens=False)
                row, exact = split_written(row, written, method.packer.cue_ids, block_end)
                extra = {"written": text, "wrote_block": exact}
                if answers.replaced is not None:
                    extra["replaced"] = bool(answers.replaced[i])
            raw = tokenizer.decode(row, skip_special_tokens=True)
            if sample.options:
                choice = extract_choice(raw, sample.options)
                correct = choice == sample.answer
            else:
                choice = normalise_answer(raw)
                correct = choice == normalise_answer(sample.answer)
            predictions.append(
                {
                    "index": sample.index,
                    "category": sample.category,
                    "question": sample.question,
                    "raw": raw,
                    "prediction": choice,
                    "answer": sample.answer,
                    "num_options": len(sample.options),
                    "correct": correct,
                    **extra,
                }
            )
    backbone.train(was_training)
    by_category: dict[str, list[bool]] = defaultdict(list)
    for p in predictions:
        by_category[p["category"]].append(p["correct"])
    count = max(len(predictions), 1)
    return EvalResult(
        accuracy=sum(p["correct"] for p in predictions) / count,
        chance=sum(1 / p["num_options"] for p in predictions if p["num_options"]) / count,
        num_samples=len(predictions),
        per_category={k: sum(v) / len(v) for k, v in sorted(by_category.items())},
        predictions=predictions,
        wrote_block=sum(p["wrote_block"] for p in predictions) / count if generated else None,
    )
