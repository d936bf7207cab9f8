"""Prompts from the chat template: every Hugging Face family against its own processor, offline.

The reference prompt is what the family's transformers processor makes of the tokenizer's
``apply_chat_template`` text (a user turn: image, question; then the generation prompt): the
processor expands the template's single image placeholder into the model's image tokens and adds
the tokenizer's special tokens unless the text already starts with bos (as its own
``apply_chat_template`` does). crystalkit's packed generation prompt (K = 0), cut before the answer
cue, must be exactly those ids — a wrong prefix, suffix, separator, bos or image order fails.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import transformers
from cli_process import assert_one_error_line, invoke
from conftest import ROOT
from hf_models import FAMILIES, build

from crystalkit.crystal.layout import Packer
from crystalkit.crystal.packing import Segment
from crystalkit.data.prompt import ANSWER_CUE, format_question
from crystalkit.errors import UsageError
from crystalkit.models.hf.base import HFConfig
from crystalkit.models.hf.chat import (
    TEMPLATES,
    packaged_template,
    split_chat_template,
    user_turn,
)

#: the templates are verbatim copies (each file's header names its source); editing one fails here
BODY_SHA256 = {
    "qwen2_vl": "a0bc6f6fc7a29a80",
    "qwen2_5_vl": "a0bc6f6fc7a29a80",
    # pinned by its source, zhongkaifu/TensorSharp's QwenImageIntentScorerTests.cs
    "qwen3_vl": "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4",
    "llava": "50c43d0ac06b32dd",
    "idefics3": "0d7e56ca41705b79",
    "smolvlm": "830005085ddd94ce",
}
#: sizes of the hub files (chat_template.json, as the hub serves them) the bodies were copied from
HUB_JSON_BYTES = {"qwen3_vl": 5497, "llava": 701, "idefics3": 434, "smolvlm": 429}
#: the fixed prompts of ``prompt: plain`` (crystalkit's prompts before chat templates)
PLAIN = {
    "qwen2_5_vl": ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
    "llava_clip": ("<s>USER: ", " ASSISTANT:"),
    "idefics3": ("<|im_start|>User:", "<end_of_utterance>\nAssistant:"),
    "smolvlm": ("<|im_start|>User:", "<end_of_utterance>\nAssistant:"),
}


def body(family: str) -> str:
    """The template without crystalkit's header comment."""
    header, text = packaged_template(family).split("-#}\n", 1)
    assert header.startswith("{#-")
    return text


def processor(backbone, tokenizer):
    """The family's own transformers processor around ``tokenizer`` and the backbone's image
    processor (one global view per Idefics3 / SmolVLM image, as crystalkit feeds them)."""
    name, config = type(backbone).__name__, backbone.model.config
    images = backbone.image_processor
    if name.startswith("Qwen3"):
        video = transformers.Qwen3VLVideoProcessor()
        return transformers.Qwen3VLProcessor(images, tokenizer, video)
    if name.startswith("Qwen"):
        video = transformers.Qwen2VLVideoProcessor()
        return transformers.Qwen2VLProcessor(images, tokenizer, video)
    if name.startswith("Llava"):
        strategy = config.vision_feature_select_strategy
        return transformers.LlavaProcessor(
            images,
            tokenizer,
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=strategy,
            num_additional_image_tokens=1 if strategy == "default" else 0,  # CLIP's class token
        )
    if name.startswith("SmolVLM"):
        try:
            video = transformers.SmolVLMVideoProcessor()
            return transformers.SmolVLMProcessor(
                images, tokenizer, video, image_seq_len=backbone.num_image_tokens
            )
        except ImportError:  # needs num2words; Idefics3's processor expands one view the same way
            pass
    return transformers.Idefics3Processor(
        images, tokenizer, image_seq_len=backbone.num_image_tokens
    )


def reference_ids(backbone, tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        user_turn(question), add_generation_prompt=True, tokenize=False
    )
    bos = tokenizer.bos_token
    size = backbone.config.image_size
    out = processor(backbone, tokenizer)(
        text=[text],
        images=[np.zeros((size, size, 3), dtype=np.uint8)],
        add_special_tokens=not (bos and text.startswith(bos)),
    )
    return list(out["input_ids"][0])


def generation_prompt(backbone, sample) -> tuple[list[int], list[int]]:
    """crystalkit's packed generation prompt for one sample (K = 0): the ids before the answer
    cue, and the cue."""
    layout = Packer(backbone)([sample], with_answer=False)
    cue = layout.regions[Segment.ANSWER_INTACT].start
    ids = layout.input_ids[0].tolist()
    return ids[:cue], ids[cue:]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("saved", ["assets", "checkpoint"])
def test_generation_prompt_is_the_chat_template_expanded_by_the_processor(tmp_path, family, saved):
    _, built, _, samples = build(family, "latents.schedule.k=0")
    cls = type(built)
    if saved == "assets":  # as a run saves and reloads it (--resume, eval, generate)
        built.save_assets(tmp_path)
        backbone = cls.create(built.config, corpus=["unrelated words"], assets=tmp_path)
    else:  # an exported tiny checkpoint, loaded as backbone.name_or_path
        built.save_pretrained(tmp_path)
        config = HFConfig(name_or_path=str(tmp_path), image_size=built.config.image_size)
        backbone = cls.create(config, corpus=[])
    tokenizer = backbone.tokenizer
    assert tokenizer.chat_template == packaged_template(built.chat_family)
    sample = samples[0]
    prompt, cue = generation_prompt(backbone, sample)
    question = format_question(sample.question, sample.options)
    assert prompt == reference_ids(backbone, tokenizer, question), family
    assert cue == tokenizer.encode(ANSWER_CUE, add_special_tokens=False)
    assert prompt.count(backbone.image_token_id) == backbone.num_image_tokens


def test_system_turn_only_where_the_template_writes_one():
    expected = {
        "qwen2_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
        "qwen3_vl": "<|im_start|>user\n",
        "llava_clip": "<s>USER: ",
        "idefics3": "<|begin_of_text|>User:",
        "smolvlm": "<|im_start|>User:",
    }
    for family, prefix in expected.items():
        backbone = build(family)[1]
        assert backbone.prompt_prefix == prefix, family
    assert build("llava_clip")[1].image_suffix == "\n"


@pytest.mark.parametrize("family", sorted(PLAIN))
def test_plain_prompt_keeps_the_fixed_prompt(family):
    _, backbone, _, samples = build(family, "backbone.prompt=plain")
    prefix, suffix = PLAIN[family]
    assert (backbone.prompt_prefix, backbone.image_suffix, backbone.question_suffix) == (
        prefix,
        "",
        suffix,
    )
    sample = samples[0]
    encode = backbone.tokenizer.encode
    question = format_question(sample.question, sample.options)
    expected = [
        *encode(prefix, add_special_tokens=False),
        *backbone.image_prompt_ids(),
        *encode(question, add_special_tokens=False),
        *encode(suffix, add_special_tokens=False),
    ]
    assert generation_prompt(backbone, sample)[0] == expected
    custom = build(family, "backbone.prompt=plain", "backbone.prompt_prefix=Question")[1]
    assert custom.prompt_prefix == "Question"
    assert custom.question_suffix == suffix


@pytest.mark.parametrize("family", sorted(PLAIN))
def test_question_first_puts_the_question_before_the_image(family):
    backbone = build(family, "backbone.prompt=plain")[1]
    prefix, before, after = backbone.prompt_ids("where is it ?", question_first=True)
    encode = backbone.tokenizer.encode
    assert before == encode("where is it ?", add_special_tokens=False)
    assert (
        prefix + after
        == backbone.prompt_ids("", question_first=False)[0] + backbone.prompt_ids("")[2]
    )
    with pytest.raises(UsageError, match=r"prompt\.question_first"):
        build(family)[1].prompt_ids("where is it ?", question_first=True)


def test_prompt_text_without_plain_is_refused():
    with pytest.raises(ValueError, match="set prompt: plain to use them"):
        HFConfig(config={}, prompt_prefix="Q:")


def test_a_tokenizer_without_a_template_fails_with_one_line(tmp_path):
    _, backbone, _, _ = build("qwen2_5_vl")
    backbone.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    overrides = ["~backbone.config", "~backbone.init", f"backbone.name_or_path={tmp_path}"]
    args = ["train", ROOT / "recipes" / "tiny" / "qwen2_5_vl.yaml", *overrides]
    line = assert_one_error_line(invoke(*args, f"output_dir={tmp_path / 'run'}"))
    assert f"backbone.prompt: {tmp_path} has no chat template" in line
    assert "backbone.prompt: plain" in line


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (
            "{% for c in messages[0]['content'] | reverse %}{{ c.get('text', '<image>') }}"
            "{% endfor %}",
            "puts the question before the image",
        ),
        ("{{ messages[0]['content'][1]['text'] }}", "renders the image markup '<image>' 0 times"),
        ("{{ messages[0]['content'] | length + }}", "does not render an image and a question"),
        (None, "some/checkpoint has no chat template; set backbone.prompt: plain"),
    ],
)
def test_a_template_that_cannot_be_split_fails_with_one_line(template, expected):
    tokenizer = build("smolvlm")[1].tokenizer
    tokenizer.chat_template = template
    with pytest.raises(UsageError) as error:
        split_chat_template(tokenizer, "<image>", "some/checkpoint")
    assert expected in str(error.value)
    assert "some/checkpoint" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("family", sorted(BODY_SHA256))
def test_packaged_templates_are_the_copied_text_and_the_header_renders_nothing(family):
    text = body(family)
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert digest.startswith(BODY_SHA256[family])
    if family in HUB_JSON_BYTES:
        encoded = json.dumps({"chat_template": text}, indent=2, ensure_ascii=False)
        assert len(encoded.encode()) == HUB_JSON_BYTES[family]
    tokenizer = build("smolvlm")[1].tokenizer
    conversation = [
        *user_turn("what colour ?"),
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        *user_turn("and now ?"),
    ]
    rendered = [
        tokenizer.apply_chat_template(
            conversation, chat_template=template, add_generation_prompt=True, tokenize=False
        )
        for template in (packaged_template(family), text)
    ]
    assert rendered[0] == rendered[1]
    assert "This comment" not in rendered[0]
    assert {path.stem for path in TEMPLATES.glob("*.jinja")} == set(BODY_SHA256)


def sentencepiece_tokenizer(
    corpus: list[str], legacy: bool
) -> transformers.PreTrainedTokenizerFast:
    """A Llama-style tokenizer (``▁`` for spaces, bos added on encode) with LLaVA's special tokens
    at the offline tokenizer's ids: Metaspace with ``prepend_scheme: first`` (transformers'
    ``LlamaTokenizer``, ``legacy=False``: ``▁`` only where the string starts), or the legacy
    ``Prepend("▁")`` normalizer (llava-1.5-7b-hf's tokenizer.json: ``▁`` before every span between
    special tokens)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    core = Tokenizer(models.BPE())
    if legacy:
        core.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
    else:
        core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    alphabet = sorted({c for text in corpus for c in text.replace(" ", "▁")} | {"▁"})
    specials = ["<pad>", "</s>", "<image>", "<s>"]  # the ids of LLaVA's offline tokenizer
    trainer = BpeTrainer(
        vocab_size=200, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    core.train_from_iterator(corpus, trainer=trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.convert_tokens_to_ids("<s>"))]
    )
    return tokenizer


@pytest.mark.parametrize("legacy", [False, True], ids=["metaspace", "legacy_prepend"])
def test_a_sentencepiece_prompt_is_encoded_as_one_string(tmp_path, legacy):
    """A tiny LLaVA checkpoint with a SentencePiece-style tokenizer: the prompt equals the
    processor's, although its pieces encoded one by one would not (the premise, checked: ``▁``
    at the start of a piece, a suffix that merges with the question)."""
    _, built, _, samples = build("llava_clip", "latents.schedule.k=0")
    built.save_pretrained(tmp_path)
    parts = split_chat_template(built.tokenizer, "<image>", "the tiny checkpoint")
    questions = [format_question(s.question, s.options) for s in samples]
    corpus = [*questions, parts.prefix, parts.between, parts.suffix, ANSWER_CUE] * 3
    tokenizer = sentencepiece_tokenizer(corpus, legacy)
    tokenizer.chat_template = built.tokenizer.chat_template
    tokenizer.save_pretrained(tmp_path)
    config = HFConfig(name_or_path=str(tmp_path), image_size=built.config.image_size)
    backbone = type(built).create(config, corpus=[])
    assert type(backbone.tokenizer.backend_tokenizer.normalizer).__name__ == (
        "Sequence" if legacy else "NoneType"
    )
    prompt, _ = generation_prompt(backbone, samples[0])
    reference = reference_ids(backbone, backbone.tokenizer, questions[0])
    assert prompt == reference
    encode = backbone.tokenizer.encode
    pieces = [
        *encode(backbone.prompt_prefix, add_special_tokens=False),
        *backbone.image_prompt_ids(),
        *encode(backbone.image_suffix + questions[0], add_special_tokens=False),
        *encode(backbone.question_suffix, add_special_tokens=False),
    ]
    assert pieces != reference  # the premise: piece by piece would be wrong
