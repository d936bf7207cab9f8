"""LLaVA-style conversation data — the reference's training format and that of most VLM
instruction sets — as :class:`~crystalkit.data.sample.Sample` s.

A file is a JSON list of records, or ``.jsonl`` with one record per line::

    {"id": "000001", "image": "coco/train2017/000001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                       {"from": "gpt", "value": "A red cup."}, ...]}

Only the first question/answer turn is used: crystalkit trains one answer per image. The question
is the human text with its ``<image>`` placeholder removed and stripped, as LLaVA's own
preprocessing does (the backbone inserts its own image tokens). Samples are open-ended: a
multiple-choice question lists its options in its own text and its answer is whatever the gpt turn
says (often the letter), so training targets the answer text and evaluation is a normalised exact
match.

Files are parsed once, when the dataset is built; images are decoded on access, so a large set
costs the memory of its records' text, not of its pixels.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from crystalkit.data.images import ImageFileError, open_rgb, sample_tensor
from crystalkit.data.sample import Sample
from crystalkit.data.splits import SPLITS, named_split
from crystalkit.errors import DataWarning, UsageError
from crystalkit.io import json_problem
from crystalkit.registries import DATASETS

IMAGE_PLACEHOLDER = "<image>"
HUMAN = ("human", "user")
GPT = ("gpt", "assistant")
_QUOTED = 3  # bad records quoted in the skip warning (all of them are in LlavaJson.skipped)
_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}


class RecordError(ValueError):
    """What is wrong with one record; the caller names the file and the record."""


def _json_type(value: object) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), "a number")


def _speaker(turns: list, i: int) -> str:
    turn = turns[i]
    if not (
        isinstance(turn, dict)
        and isinstance(turn.get("from"), str)
        and isinstance(turn.get("value"), str)
    ):
        raise RecordError(
            f"conversations[{i}] is {_json_type(turn)} without string 'from' and 'value' "
            "(expected a turn like {'from': 'human', 'value': '...'})"
        )
    return turn["from"]


def first_turn(conversations: object) -> tuple[str, str]:
    """``(question, answer)`` of the first human turn and the gpt turn right after it."""
    if not isinstance(conversations, list) or not conversations:
        found = "missing" if conversations is None else _json_type(conversations)
        found = "empty" if conversations == [] else found
        raise RecordError(f"'conversations' is {found} (expected a non-empty list of turns)")
    human = next(
        (i for i in range(len(conversations)) if _speaker(conversations, i) in HUMAN), None
    )
    if human is None:
        raise RecordError("no human turn (expected a turn with 'from': 'human')")
    if human + 1 == len(conversations) or _speaker(conversations, human + 1) not in GPT:
        raise RecordError(
            f"conversations[{human}] (the first human turn) is not followed by a gpt turn "
            "(expected 'from': 'gpt' next)"
        )
    text, answer = conversations[human]["value"], conversations[human + 1]["value"].strip()
    count = text.count(IMAGE_PLACEHOLDER)
    if count != 1:
        raise RecordError(
            f"the first human turn has {count} '{IMAGE_PLACEHOLDER}' placeholders "
            "(expected exactly one)"
        )
    question = text.replace(IMAGE_PLACEHOLDER, "").strip()
    if not question:
        raise RecordError(f"the question is empty besides '{IMAGE_PLACEHOLDER}' (expected text)")
    if IMAGE_PLACEHOLDER in answer:
        raise RecordError(f"the gpt answer contains '{IMAGE_PLACEHOLDER}' (expected plain text)")
    if not answer:
        raise RecordError("the gpt answer is empty (expected the answer text)")
    return question, answer


def parse_record(record: object) -> tuple[str, str, str]:
    """``(image path, question, answer)`` of one record, or :class:`RecordError`."""
    if not isinstance(record, dict):
        raise RecordError(
            f"is {_json_type(record)} (expected an object with 'image' and 'conversations')"
        )
    image = record.get("image")
    if not isinstance(image, str) or not image.strip():
        found = "missing" if image is None else _json_type(image)
        found = "empty" if isinstance(image, str) else found
        raise RecordError(f"'image' is {found} (expected one image path, relative to image_root)")
    question, answer = first_turn(record.get("conversations"))
    return image, question, answer


@dataclass(frozen=True)
class Record:
    """A usable record: its origin (for messages), image file and first question/answer turn."""

    source: Path
    where: str
    image: str
    question: str
    answer: str
    id: str | int | None = None


def _where(label: str, record: object) -> str:
    """``record 3 (id "abc")``: the position, and the id where the record has a usable one."""
    rid = record.get("id") if isinstance(record, dict) else None
    ok = isinstance(rid, str | int) and not isinstance(rid, bool)
    return f"{label} (id {json.dumps(rid, ensure_ascii=False)})" if ok else label


def _read(path: Path) -> list[tuple[str, object]]:
    """``(where, record)`` pairs: ``record I`` of a JSON list, ``line N`` of a ``.jsonl`` file,
    where a line that is not JSON holds a :class:`RecordError` instead of a record."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found (expected LLaVA-style JSON or JSONL)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    if path.suffix.lower() == ".jsonl":
        entries: list[tuple[str, object]] = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                record = RecordError(f"is not valid JSON ({exc.msg} at column {exc.colno})")
            except (ValueError, RecursionError) as exc:  # a huge number, deep nesting
                record = RecordError(f"is not valid JSON ({json_problem(exc)})")
            entries.append((_where(f"line {number}", record), record))
        return entries
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg} (expected a JSON list of "
            "records, or a .jsonl file with one record per line)"
        ) from None
    except (ValueError, RecursionError) as exc:  # a huge number, deep nesting
        raise UsageError(f"{path}: invalid JSON: {json_problem(exc)}") from None
    if not isinstance(data, list):
        raise UsageError(f"{path}: holds {_json_type(data)} (expected a JSON list of records)")
    return [(_where(f"record {i}", record), record) for i, record in enumerate(data)]


class LlavaSplit(torch.utils.data.Dataset):
    """One split of :class:`LlavaJson`; each access decodes one image (and squares it to
    ``image_size`` unless that is ``None``)."""

    def __init__(self, name: str, records: list[Record], image_size: int | None):
        self.name = name
        self.records = records
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self.records):
            raise IndexError(f"{self.name} split index {index} out of range [0, {len(self)})")
        record = self.records[index]
        try:
            image = sample_tensor(open_rgb(Path(record.image)), self.image_size)
        except ImageFileError as exc:
            raise UsageError(f"{record.source}: {record.where}: {exc}") from None
        return Sample(
            index=index,
            image=image,
            question=record.question,
            options=[],
            answer=record.answer,
            meta={"split": self.name, "id": record.id, "image": record.image},
        )


@DATASETS.register("llava_json")
class LlavaJson:
    """LLaVA-style conversation JSON/JSONL (first question/answer turn, open-ended answers)."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        train: str = Field(
            description="training records: a JSON list, or a .jsonl file with one record per line"
        )
        val: str | None = Field(
            None, description="records of the val split (default: carved from train, see holdout)"
        )
        test: str | None = Field(
            None, description="records of the test split (default: carved from train, see holdout)"
        )
        holdout: int | float | None = Field(
            None,
            description="records carved out of train for each of val and test without a file: "
            "a count (>= 1) or a fraction of train's usable records (0 < f < 1); chosen by seed, "
            "disjoint, and removed from train",
        )
        image_root: str | None = Field(
            None,
            description="folder the records' image paths are relative to (default: the "
            "folder of the file that lists them)",
        )
        image_size: int | None = Field(
            448,
            ge=8,
            le=4096,
            description="images are resized to image_size x image_size (RGB) when decoded; null "
            "keeps each at its native size, so the corruption sees it there and the backbone "
            "resizes afterwards (the released code's blur-then-resize, with crystal.corrupt_at: "
            "sample)",
        )
        max_samples: int | None = Field(
            None, ge=1, description="keep the first max_samples records of each split"
        )
        on_bad_record: Literal["skip", "fail"] = Field(
            "skip",
            description="a malformed record (or missing image file): skip it with a warning that "
            "counts them, or fail on the first one",
        )
        seed: int = Field(0, ge=0, description="seed of the holdout draw")
        max_text_tokens: int | None = Field(
            None,
            ge=2,
            description="most question + answer tokens of a record, counted with the "
            "backbone's tokenizer (image tokens and the prompt come on top); a longer record "
            "follows on_long_record; null = no bound",
        )
        on_long_record: Literal["skip", "truncate"] = Field(
            "skip",
            description="a record over max_text_tokens: skip it, or cut its answer to fit (one "
            "whose question alone fills the bound is skipped); one warning counts them",
        )

        @field_validator("train", "val", "test", "image_root")
        @classmethod
        def _absolute(cls, value: str | None) -> str | None:
            """Absolute, so that a saved run finds its data from any working directory."""
            if value is None:
                return None
            if not value.strip():
                raise ValueError("expected a path, got an empty string")
            return os.path.abspath(os.path.expanduser(value))

        @field_validator("holdout")
        @classmethod
        def _check_holdout(cls, value: int | float | None) -> int | float | None:
            if value is None or (isinstance(value, int) and value >= 1) or 0 < value < 1:
                return value
            raise ValueError(f"holdout must be a count >= 1 or a fraction in (0, 1), got {value}")

        @model_validator(mode="after")
        def _check_splits(self) -> LlavaJson.Config:
            missing = [s for s in ("val", "test") if getattr(self, s) is None]
            if missing and self.holdout is None:
                raise ValueError(
                    f"no {' or '.join(missing)} file: set {' and '.join(missing)}, or holdout "
                    "(records carved out of train for each split without a file)"
                )
            return self

    def __init__(self, config: LlavaJson.Config):
        self.config = config
        self.skipped: list[str] = []
        self.truncated: list[str] = []
        files = {"train": config.train, "val": config.val, "test": config.test}
        records = {name: self._load(Path(f)) for name, f in files.items() if f is not None}
        missing = [s for s in SPLITS if s not in records]
        if missing:
            carved, records["train"] = self._carve(records["train"], missing)
            records.update(zip(missing, carved, strict=True))
        self._splits = {
            name: LlavaSplit(name, records[name][: config.max_samples], config.image_size)
            for name in SPLITS
        }

    def _load(self, path: Path) -> list[Record]:
        root = Path(self.config.image_root) if self.config.image_root else path.parent
        entries = _read(path)
        records: list[Record] = []
        bad: list[str] = []
        for where, record in entries:
            try:
                if isinstance(record, RecordError):
                    raise record
                image, question, answer = parse_record(record)
                image_path = root / image
                if not image_path.is_file():
                    raise RecordError(
                        f"image file {image_path} not found (expected under image_root {root})"
                    )
            except RecordError as exc:
                if self.config.on_bad_record == "fail":
                    raise UsageError(f"{path}: {where}: {exc}") from None
                bad.append(f"{where}: {exc}")
                continue
            rid = record.get("id") if isinstance(record, dict) else None
            records.append(Record(path, where, str(image_path), question, answer, rid))
        if not records:
            detail = f"all {len(entries)} skipped, the first: {bad[0]}" if bad else "it is empty"
            raise UsageError(f"{path}: no usable record ({detail})")
        if bad:
            self.skipped += [f"{path}: {b}" for b in bad]
            more = "; ..." if len(bad) > _QUOTED else ""
            warnings.warn(
                DataWarning(
                    f"{path}: skipped {len(bad)} of {len(entries)} records: "
                    f"{'; '.join(bad[:_QUOTED])}{more}"
                ),
                stacklevel=2,
            )
        return records

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Apply ``max_text_tokens`` with the backbone's tokenizer (called once it exists): a
        sequence's length is then bounded before training starts, not found by running out
        of memory. Every split is bounded (after ``max_samples``); skipped records join
        :attr:`skipped`, truncated ones are listed in :attr:`truncated`."""
        limit = self.config.max_text_tokens
        if limit is None:
            return
        long: list[str] = []
        total = truncated = 0
        for split in self._splits.values():
            records, kept = split.records, []
            total += len(records)
            questions = tokenizer([r.question for r in records], add_special_tokens=False)
            answers = tokenizer([r.answer for r in records], add_special_tokens=False)
            for record, question, answer in zip(
                records, questions["input_ids"], answers["input_ids"], strict=True
            ):
                if len(question) + len(answer) <= limit:
                    kept.append(record)
                    continue
                where = f"{record.source}: {record.where}: {len(question)} + {len(answer)} tokens"
                long.append(where)
                room = limit - len(question) if self.config.on_long_record == "truncate" else 0
                cut = tokenizer.decode(answer[:room]).strip() if room > 0 else ""
                if not cut:  # skipping, or no room left for an answer
                    self.skipped.append(f"{where} (over max_text_tokens {limit})")
                    continue
                kept.append(replace(record, answer=cut))
                self.truncated.append(where)
                truncated += 1
            if not kept:
                raise UsageError(
                    f"dataset.max_text_tokens: {limit} leaves no {split.name} record (all "
                    f"{len(records)} are longer, e.g. {long[-1]})"
                )
            split.records = kept
        if long:
            warnings.warn(
                DataWarning(
                    f"dataset.max_text_tokens {limit}: skipped {len(long) - truncated} and "
                    f"truncated the answers of {truncated} of {total} records "
                    f"(the first: {long[0]})"
                ),
                stacklevel=2,
            )

    def _carve(
        self, train: list[Record], splits: list[str]
    ) -> tuple[list[list[Record]], list[Record]]:
        """``holdout`` records per split in ``splits``, drawn by ``seed``; the rest stays train.
        Every part keeps file order."""
        holdout = self.config.holdout
        assert holdout is not None  # the Config requires it when a split has no file
        size = holdout if isinstance(holdout, int) else max(1, round(holdout * len(train)))
        if size * len(splits) >= len(train):
            raise UsageError(
                f"{self.config.train}: holdout {holdout} carves {size} records for each of "
                f"{' and '.join(splits)} out of {len(train)} usable ones, leaving none to train on"
            )
        order = np.random.default_rng(self.config.seed).permutation(len(train))
        held = [sorted(order[k * size : (k + 1) * size]) for k in range(len(splits))]
        rest = sorted(order[len(splits) * size :])
        return [[train[i] for i in part] for part in held], [train[i] for i in rest]

    def split(self, name: str) -> LlavaSplit:
        """The ``train``, ``val`` or ``test`` split."""
        return named_split("llava_json", self._splits, name)

    def corpus(self) -> list[str]:
        """Every question and answer of every split (the embedded backbone's vocabulary)."""
        return [
            text
            for split in self._splits.values()
            for record in split.records
            for text in (record.question, record.answer)
        ]
