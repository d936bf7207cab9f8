"""Tokenizers for randomly initialised test-size VLMs, trained locally (no hub access).

A byte-level BPE trained with the ``tokenizers`` library on the dataset's own texts, wrapped as a
``transformers`` fast tokenizer and given the special tokens the model family's prompt uses, so
that the full path — raw image + text -> processor -> model -> loss — runs offline. The backbone
then gives it the family's real chat template (:mod:`crystalkit.models.hf.chat`).
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


def train_bpe_tokenizer(
    corpus: Sequence[str],
    specials: Sequence[str],
    *,
    eos: str,
    pad: str,
    bos: str | None = None,
    add_bos: bool = False,
    vocab_size: int = 1024,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE of at most ``vocab_size`` entries over ``corpus`` (deterministic ids:
    the special tokens first, in the order given). ``add_bos``: encoding with special tokens
    prepends ``bos``, as Llama-style tokenizers do."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(dict.fromkeys(specials)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=eos, pad_token=pad, bos_token=bos
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in specials if t not in (eos, pad, bos)]}
    )
    if add_bos:
        if bos is None:
            raise ValueError("add_bos needs a bos token")
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))],
        )
    return tokenizer
