"""Benchmark files: VLMEvalKit-style TSV and JSONL, read into :class:`Sample` s.

Rows that cannot be used (an undecodable image, a missing cell, an answer that is not among the
options) are skipped and reported with their index; a file that cannot be used at all (missing
columns, not a table) is one :class:`~crystalkit.errors.UsageError` line.

Images are decoded with Pillow and resized to a square ``image_size`` so a batch stacks (kept at
their native size with ``image_size=None``, for a backbone that resizes each image itself); a row
with several images (a list of base64 strings) is tiled left to right into one image first.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from crystalkit.data.boxes import Box, enclosing, read_boxes, resize_boxes
from crystalkit.data.images import ImageFileError, open_rgb, sample_tensor
from crystalkit.data.sample import LETTERS, OptionKeyError, Sample, ordered_options
from crystalkit.errors import UsageError
from crystalkit.io import json_problem

OPTION_COLUMNS = tuple(LETTERS[:5])  # VLMEvalKit: A ... E


@dataclass(frozen=True)
class BadRow:
    index: str
    reason: str


class _RowError(Exception):
    pass


def _decode_base64(text: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(base64.b64decode(text, validate=True))).convert("RGB")
    except (
        binascii.Error,
        UnidentifiedImageError,
        OSError,
        ValueError,
        Image.DecompressionBombError,  # a header claiming billions of pixels
    ) as exc:
        raise _RowError(f"image is not a decodable base64 image ({type(exc).__name__})") from None


def _open_path(path: Path) -> Image.Image:
    try:
        return open_rgb(path)
    except ImageFileError as exc:
        raise _RowError(str(exc)) from None


def _tile(images: list[Image.Image]) -> Image.Image:
    if len(images) == 1:
        return images[0]
    height = max(im.height for im in images)
    resized = [im.resize((max(1, im.width * height // im.height), height)) for im in images]
    canvas = Image.new("RGB", (sum(im.width for im in resized), height))
    x = 0
    for im in resized:
        canvas.paste(im, (x, 0))
        x += im.width
    return canvas


def _options(cells: dict[str, str]) -> list[str]:
    options = []
    for letter in OPTION_COLUMNS:
        text = (cells.get(letter) or "").strip()
        if not text or text.lower() == "nan":
            break  # options are contiguous: A, B, ... up to the first empty cell
        options.append(text)
    return options


def _boxes(value: object, image: Image.Image, size: int | None) -> list[Box]:
    """A row's optional evidence boxes, in the pixels of its (tiled) image, on the sample's."""
    try:
        boxes = read_boxes(value, *image.size)
    except ValueError as exc:
        raise _RowError(str(exc)) from None
    return resize_boxes(boxes, *image.size, size)


def _tsv_boxes(text: str) -> object:
    """The ``boxes`` cell's JSON (an empty or ``nan`` cell: none)."""
    text = text.strip()
    if not text or text.lower() == "nan":
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise _RowError(f"'boxes' is not JSON (got {text!r:.80})") from None


def _answer_letter(answer: str, options: list[str]) -> str:
    answer = answer.strip()
    if answer in LETTERS[: len(options)] and answer:
        return answer
    for i, option in enumerate(options):  # some files store the option text
        if answer.lower() == option.lower():
            return LETTERS[i]
    raise _RowError(f"answer {answer!r} is not among the options {LETTERS[: len(options)]}")


def read_tsv(path: Path, image_size: int | None) -> tuple[list[Sample], list[BadRow]]:
    """A VLMEvalKit TSV: ``index``, ``image`` (base64, a list of base64, or another row's index)
    or ``image_path``, ``question``, options ``A``..``E``, ``answer``, optional ``hint``,
    ``category``, ``l2-category``, ``split``, ``boxes`` (JSON: the evidence boxes)."""
    csv.field_size_limit(sys.maxsize)
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    except (OSError, ValueError, csv.Error) as exc:  # ValueError: undecodable, NUL in path
        raise UsageError(f"{path}: cannot read as a TSV file ({exc})") from None
    columns = set(rows[0]) if rows else set()
    missing = [c for c in ("index", "question", "answer", "A", "B") if c not in columns]
    if not columns.intersection({"image", "image_path"}):
        missing.append("image or image_path")
    if missing:
        raise UsageError(
            f"{path}: missing column(s) {', '.join(missing)} (a VLMEvalKit TSV has index, image, "
            "question, A..E, answer)"
        )
    by_index = {row["index"]: row for row in rows}
    samples, bad = [], []
    for position, row in enumerate(rows):
        index = row.get("index") or f"row {position + 2}"
        try:
            samples.append(_tsv_sample(row, position, by_index, path.parent, image_size))
        except _RowError as exc:
            bad.append(BadRow(index, str(exc)))
    return samples, bad


def _tsv_image(row: dict[str, str], by_index: dict[str, dict[str, str]], root: Path) -> Image.Image:
    text = (row.get("image") or "").strip()
    seen = set()
    while text.isdigit() and text in by_index and text not in seen:  # a reference to another row
        seen.add(text)
        text = (by_index[text].get("image") or "").strip()
    if text.startswith("["):
        try:
            parts = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            parts = None
        if not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
            raise _RowError("image looks like a list but is not a list of base64 strings")
        return _tile([_decode_base64(p) for p in parts])
    if text:
        return _decode_base64(text)
    image_path = (row.get("image_path") or "").strip()
    if image_path:
        return _open_path(root / image_path)
    raise _RowError("row has neither an image nor an image_path")


def _tsv_sample(
    row: dict[str, str],
    position: int,
    by_index: dict[str, dict[str, str]],
    root: Path,
    size: int | None,
) -> Sample:
    question = (row.get("question") or "").strip()
    if not question:
        raise _RowError("empty question")
    options = _options(row)
    if len(options) < 2:
        raise _RowError("fewer than two options")
    hint = (row.get("hint") or "").strip()
    if hint and hint.lower() != "nan":
        question = f"{hint} {question}"
    meta = {k: row[k] for k in ("l2-category", "split", "index") if row.get(k)}
    image = _tsv_image(row, by_index, root)
    boxes = _boxes(_tsv_boxes(row.get("boxes") or ""), image, size)
    return Sample(
        index=position,
        image=sample_tensor(image, size),
        question=question,
        options=options,
        answer=_answer_letter(row.get("answer") or "", options),
        category=(row.get("category") or "").strip(),
        box=enclosing(boxes) if boxes else None,
        meta=meta,
        boxes=boxes,
    )


def read_jsonl(
    path: Path, image_root: Path, image_size: int | None
) -> tuple[list[Sample], list[BadRow]]:
    """One JSON object per line: ``id``, ``image`` or ``images`` (paths relative to
    ``image_root``), ``question``, ``options`` (a list, or a mapping keyed by the letters A-H in
    any order), ``answer`` (letter or option text), ``category``, ``boxes`` (the evidence boxes:
    ``[[x0, y0, x1, y1], ...]`` in pixels of the image). Options keyed by anything else
    are one :class:`~crystalkit.errors.UsageError` naming the row."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as exc:  # ValueError: undecodable, or a NUL in the path
        raise UsageError(f"{path}: cannot read ({exc})") from None
    samples, bad = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:
            bad.append(BadRow(f"line {number}", f"not valid JSON ({json_problem(exc)})"))
            continue
        index = (
            str(record.get("id", f"line {number}"))
            if isinstance(record, dict)
            else f"line {number}"
        )
        try:
            samples.append(_jsonl_sample(record, len(samples), image_root, image_size))
        except _RowError as exc:
            bad.append(BadRow(index, str(exc)))
        except OptionKeyError as exc:
            row = f"line {number}" + (f" (id {index})" if index != f"line {number}" else "")
            raise UsageError(f"{path}: {row}: {exc}") from None
    return samples, bad


def _jsonl_sample(record: object, position: int, root: Path, size: int | None) -> Sample:
    if not isinstance(record, dict):
        raise _RowError("not a JSON object")
    paths = record.get("images") or ([record["image"]] if record.get("image") else [])
    if not paths or not all(isinstance(p, str) for p in paths):
        raise _RowError("needs 'image' (a path) or 'images' (a list of paths)")
    options = ordered_options(record.get("options"))
    if (
        not isinstance(options, list)
        or not 2 <= len(options) <= len(LETTERS)
        or not all(isinstance(o, str) for o in options)
    ):
        raise _RowError(
            f"'options' must be a list of 2 to {len(LETTERS)} strings, or a mapping of letters "
            "to them"
        )
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise _RowError("'question' must be a non-empty string")
    image = _tile([_open_path(root / p) for p in paths])
    boxes = _boxes(record.get("boxes"), image, size)
    return Sample(
        index=position,
        image=sample_tensor(image, size),
        question=question.strip(),
        options=[o.strip() for o in options],
        answer=_answer_letter(str(record.get("answer", "")), options),
        category=str(record.get("category", "")),
        box=enclosing(boxes) if boxes else None,
        meta={"id": record.get("id")},
        boxes=boxes,
    )
