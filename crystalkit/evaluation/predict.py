"""``crystalkit generate``: a trained run answers questions about the user's own images.

Each query becomes a :class:`~crystalkit.data.sample.Sample` the way a dataset builds one (RGB,
resized to the square size the run's dataset produced; the backbone then preprocesses it as in
training) and goes through :func:`~crystalkit.evaluation.accuracy.evaluate` itself: the final
latent block laid out by :meth:`~crystalkit.crystal.method.Method.prompt_layout`, greedy decoding
by :func:`~crystalkit.evaluation.generation.generate_answers`, corrupted images seeded per batch
as ``crystalkit eval --corrupted`` seeds them. An image of the run's dataset therefore gets the
very answer evaluation wrote for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from crystalkit.data.images import open_rgb, sample_tensor
from crystalkit.data.sample import LETTERS, OptionKeyError, Sample, ordered_options
from crystalkit.errors import UsageError
from crystalkit.evaluation.accuracy import evaluate
from crystalkit.evaluation.saved import check_latent_block
from crystalkit.io import json_problem
from crystalkit.runs.load import load_run, run_image_size


@dataclass(frozen=True)
class Query:
    """One question about one image; ``where`` names it in error messages."""

    where: str
    image: Path
    question: str
    options: tuple[str, ...] = ()


def _checked(where: str, image: Path, question: object, options: object) -> Query:
    """The query, or a one-line error naming ``where``."""
    if not isinstance(question, str) or not question.strip():
        raise UsageError(f"{where}: the question is empty (expected a question about the image)")
    if not isinstance(options, list | tuple) or not all(
        isinstance(o, str) and o.strip() for o in options
    ):
        raise UsageError(
            f"{where}: options must be a list of non-empty strings, or a mapping of the letters "
            "A, B, ... to them"
        )
    if len(options) == 1 or len(options) > len(LETTERS):
        raise UsageError(
            f"{where}: {len(options)} options (expected none for an open-ended question, or "
            f"2 to {len(LETTERS)})"
        )
    return Query(where, image, question.strip(), tuple(o.strip() for o in options))


def queries_from_args(images: list[Path], questions: list[str], options: list[str]) -> list[Query]:
    """``--image``/``--question`` pairs (one ``--question`` may serve every image); the
    ``--option`` s apply to every query."""
    if not images:
        raise UsageError("generate: pass --image and --question (or --input FILE.jsonl)")
    if len(questions) == 1:
        questions = questions * len(images)
    if len(questions) != len(images):
        raise UsageError(
            f"generate: {len(images)} --image and {len(questions)} --question; pass one "
            "--question per --image, in the same order (or one for all)"
        )
    return [
        _checked(f"query {i} (--image {image})", image, question, options)
        for i, (image, question) in enumerate(zip(images, questions, strict=True), start=1)
    ]


def read_queries(path: Path) -> list[Query]:
    """A JSONL file of ``{"image", "question", "options"?}`` rows, images relative to the file;
    ``options`` is a list or a mapping keyed by the letters A-H in any order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"--input: {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--input: {path}: cannot read ({exc})") from None
    queries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise UsageError(f"{where}: not valid JSON ({json_problem(exc)})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise UsageError(
                f"{where}: expected an object with 'image' (a path), 'question' and optional "
                "'options'"
            )
        try:
            options = ordered_options(row.get("options", []))
        except OptionKeyError as exc:
            raise UsageError(f"{where}: {exc}") from None
        queries.append(_checked(where, path.parent / row["image"], row.get("question"), options))
    if not queries:
        raise UsageError(f"--input: {path}: no queries (expected one JSON object per line)")
    return queries


def predict(
    run_dir: Path,
    queries: list[Query],
    *,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    corrupted: bool = False,
    latent_block: str | None = None,
) -> list[dict[str, Any]]:
    """The run's answer to every query: ``raw`` text, and for multiple choice the extracted
    ``choice`` letter (``None`` if it wrote none). Budget and batch size default to the recipe's
    ``eval`` settings; ``corrupted`` answers from the recipe's corrupted images.
    ``latent_block`` (default: the recipe's ``eval.latent_block``): with ``generated`` the model
    writes the latent template and block itself, and each answer also holds ``written``, the
    whole generation (latent tokens shown), and ``wrote_block``."""
    check_latent_block(latent_block)
    images: list[Image.Image] = []
    for query in queries:  # every file is checked before the (slower) run is loaded
        try:
            images.append(open_rgb(query.image))
        except UsageError as exc:
            raise UsageError(f"{query.where}: {exc}") from None
    recipe, dataset, backbone, method, _ = load_run(run_dir)
    size = run_image_size(dataset, backbone)
    samples = [
        Sample(
            index=i,
            image=sample_tensor(image, size),
            question=query.question,
            options=list(query.options),
            answer="",
        )
        for i, (query, image) in enumerate(zip(queries, images, strict=True))
    ]
    update: dict[str, Any] = {"max_samples": None}
    if max_new_tokens is not None:
        update["max_new_tokens"] = max_new_tokens
    if batch_size is not None:
        update["batch_size"] = batch_size
    if latent_block is not None:
        update["latent_block"] = latent_block
    cfg = recipe.eval.model_copy(update=update)
    result = evaluate(backbone, samples, method, cfg, corrupted=corrupted)
    return [
        {
            "image": str(query.image),
            "question": query.question,
            "options": list(query.options),
            "answer": p["raw"],
            "choice": p["prediction"] if query.options else None,
            **{key: p[key] for key in ("written", "wrote_block") if key in p},
        }
        for query, p in zip(queries, result.predictions, strict=True)
    ]
