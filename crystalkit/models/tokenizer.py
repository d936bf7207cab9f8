"""Offline word-level tokenizers for the embedded backbone.

Built with the ``tokenizers`` library from the dataset's closed vocabulary and wrapped as a
``transformers`` fast tokenizer, so the rest of crystalkit uses the same API as with a real
checkpoint's tokenizer — and nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from crystalkit.errors import CheckpointError, one_line

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
}
IMAGE_TOKEN = "<image>"
TOKENIZER_FILE = "tokenizer.json"


def build_word_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over every word in ``corpus`` (deterministic ids)."""
    specials = [*SPECIAL_TOKENS.values(), IMAGE_TOKEN]
    words = sorted({word for text in corpus for word in text.split()} - set(specials))
    vocab = {token: i for i, token in enumerate([*specials, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _wrap(core)


def load_word_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A run's saved tokenizer; one line naming the file when it is not one."""
    path = directory / TOKENIZER_FILE
    try:
        return _wrap(Tokenizer.from_file(str(path)))
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise CheckpointError(f"{path}: not a readable tokenizer ({one_line(exc)})") from None


def save_word_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    tokenizer.backend_tokenizer.save(str(directory / TOKENIZER_FILE))


def _wrap(core: Tokenizer) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer
