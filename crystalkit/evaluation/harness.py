"""``crystalkit eval RUN_DIR --bench NAME_OR_FILE``: score a run on a benchmark file.

A benchmark is a TSV or JSONL file (:mod:`crystalkit.evaluation.benchfiles`), a YAML file that
declares one (name, format, path, scorer, prompt template), or ``synthetic`` (the run's own test
split). Answers are generated exactly as in training-time evaluation (latent block included) and
scored by the benchmark's scorer.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from crystalkit.config.loader import format_validation_error
from crystalkit.data.sample import LETTERS, Sample
from crystalkit.errors import UsageError
from crystalkit.evaluation.accuracy import normalise_answer
from crystalkit.evaluation.benchfiles import BadRow, read_jsonl, read_tsv
from crystalkit.evaluation.buckets import bucket_accuracy
from crystalkit.io import atomic_write_json, atomic_write_text, read_yaml
from crystalkit.runs.files import RECIPE_FILE, bench_file, bench_predictions_file

Scorer = Literal["multiple_choice", "mmvp_pairs", "hrbench", "exact_match"]


class BenchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="names the output files: bench_NAME.json")
    format: Literal["synthetic", "tsv", "jsonl"]
    path: str | None = Field(None, description="the data file, relative to the YAML file")
    image_root: str | None = Field(None, description="JSONL image paths are relative to this")
    split: str = Field("test", description="synthetic: which split of the run's dataset")
    scorer: Scorer = "multiple_choice"
    prompt: str = Field("{question}", description="question template; {question} is replaced")
    max_samples: int | None = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _file_name_part(cls, name: str) -> str:
        """The name becomes part of file names inside the run directory."""
        if not name or len(name) > 100 or any(c in name for c in "/\\\0") or name in (".", ".."):
            raise ValueError("expected a short name without slashes, e.g. mmvp")
        return name


def resolve_bench(value: str) -> tuple[BenchSpec, Path]:
    """``synthetic``, a ``.tsv``/``.jsonl`` file, or a YAML file declaring a benchmark; returns the
    spec and the folder its paths are relative to."""
    path = Path(value)
    if value == "synthetic":
        return BenchSpec(name="synthetic", format="synthetic"), Path.cwd()
    if not path.is_file():
        raise UsageError(
            f"--bench: {value!r} is neither 'synthetic' nor an existing .tsv, .jsonl or .yaml file"
        )
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".jsonl"):
        return BenchSpec(name=path.stem, format=suffix[1:], path=path.name), path.parent
    if suffix not in (".yaml", ".yml"):
        raise UsageError(f"{path}: expected a .tsv, .jsonl or .yaml benchmark file")
    data = read_yaml(path)
    try:
        return BenchSpec.model_validate(data), path.parent
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc, BenchSpec, str(path), {})) from None


def load_samples(
    spec: BenchSpec, root: Path, dataset: Any, image_size: int | None
) -> tuple[list[Sample], list[BadRow]]:
    if spec.format == "synthetic":
        split = dataset.split(spec.split)
        samples, bad = [split[i] for i in range(len(split))], []
    else:
        if spec.path is None:
            raise UsageError(f"bench {spec.name}: format {spec.format} needs a 'path'")
        data = root / spec.path
        if spec.format == "tsv":
            samples, bad = read_tsv(data, image_size)
        else:
            image_root = root / spec.image_root if spec.image_root else data.parent
            samples, bad = read_jsonl(data, image_root, image_size)
    if spec.max_samples is not None:
        samples = samples[: spec.max_samples]
    if spec.prompt != "{question}":
        for sample in samples:
            sample.question = spec.prompt.replace("{question}", sample.question)
    if not samples:
        first = f"; first: {bad[0].index}: {bad[0].reason}" if bad else ""
        raise UsageError(f"bench {spec.name}: no usable rows ({len(bad)} skipped{first})")
    return samples, bad


def score(predictions: list[dict[str, Any]], scorer: Scorer) -> dict[str, Any]:
    """Overall, per-category and per-area-bucket scores of evaluated predictions under
    ``scorer``."""
    if scorer == "exact_match":
        for p in predictions:
            p["correct"] = normalise_answer(p["raw"]) == normalise_answer(p["answer_text"])
    correct = [bool(p["correct"]) for p in predictions]
    by_category: dict[str, list[bool]] = defaultdict(list)
    for p in predictions:
        by_category[p["category"]].append(bool(p["correct"]))
    per_category = {k: sum(v) / len(v) for k, v in sorted(by_category.items())}
    accuracy = sum(correct) / max(len(correct), 1)
    per_bucket, per_bucket_samples = bucket_accuracy(predictions)
    result: dict[str, Any] = {
        "accuracy": accuracy,
        "per_category": per_category,
        "per_bucket": per_bucket,
        "per_bucket_samples": per_bucket_samples,
        "score": accuracy,
    }
    if scorer == "mmvp_pairs":  # MMVP: consecutive questions form a pair; both must be right
        pairs = [correct[i] and correct[i + 1] for i in range(0, len(correct) - 1, 2)]
        result["pair_accuracy"] = result["score"] = sum(pairs) / max(len(pairs), 1)
        result["num_pairs"] = len(pairs)
    if scorer == "hrbench":  # HRBench: mean of the single-instance and cross-instance accuracies
        splits = {k: per_category[k] for k in ("single", "cross") if k in per_category}
        if not splits:
            raise UsageError("scorer hrbench needs categories 'single' and/or 'cross'")
        result |= {f"{k}_accuracy": v for k, v in splits.items()}
        result["score"] = sum(splits.values()) / len(splits)
    return result


def recipe_hash(run_dir: Path) -> str:
    return hashlib.sha1((run_dir / RECIPE_FILE).read_bytes()).hexdigest()[:12]


def write_bench(
    run_dir: Path,
    spec: BenchSpec,
    predictions: list[dict[str, Any]],
    bad: list[BadRow],
    step: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``bench_NAME.json`` (summary) and ``bench_NAME_predictions.jsonl``."""
    summary = {
        "bench": spec.name,
        "format": spec.format,
        "scorer": spec.scorer,
        "step": step,
        "recipe_sha1": recipe_hash(run_dir),
        "num_samples": len(predictions),
        **score(predictions, spec.scorer),
        "skipped": [{"index": b.index, "reason": b.reason} for b in bad],
        **(extra or {}),
    }
    atomic_write_json(run_dir / bench_file(spec.name), summary)
    atomic_write_text(
        run_dir / bench_predictions_file(spec.name),
        "".join(json.dumps(p) + "\n" for p in predictions),
    )
    return summary


def answer_texts(samples: list[Sample], predictions: list[dict[str, Any]]) -> None:
    """Attach each sample's answer text (exact-match scoring compares against it)."""
    for sample, p in zip(samples, predictions, strict=True):
        p["answer_text"] = sample.options[LETTERS.index(sample.answer)]
