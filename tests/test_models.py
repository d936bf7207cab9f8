"""The embedded backbone, masks, collation and decoding against slow reference computations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crystalkit.crystal.layout import Packer
from crystalkit.crystal.packing import Segment
from crystalkit.data.prompt import IGNORE_INDEX, format_question
from crystalkit.evaluation.accuracy import extract_choice
from crystalkit.evaluation.generation import generate_answers
from crystalkit.models.masks import additive, causal_allowed, positions_from_mask
from crystalkit.models.tokenizer import load_word_tokenizer
from crystalkit.runs.build import build_backbone, build_dataset


@pytest.fixture
def parts(tiny_recipe):
    torch.manual_seed(0)
    recipe = tiny_recipe()
    dataset = build_dataset(recipe)
    backbone = build_backbone(recipe, dataset).eval()
    return backbone, dataset.split("val")


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    width=st.integers(7, 9),
    past=st.integers(0, 6),
)
def test_causal_mask_matches_reference(lengths, width, past):
    valid = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        valid[row, width - n :] = 1  # left padding
    allowed = causal_allowed(valid, past_length=past)
    for b in range(len(lengths)):
        for qi, q in enumerate(range(past, width)):
            for k in range(width):
                expected = (k <= q and bool(valid[b, k])) or (k == q and not valid[b, q])
                assert bool(allowed[b, qi, k]) == expected
    assert allowed.any(-1).all()  # no fully masked row: SDPA would return NaN


def test_additive_mask_values():
    allowed = torch.tensor([[[True, False], [True, True]]])
    mask = additive(allowed, torch.float32)
    assert mask.shape == (1, 1, 2, 2)
    assert mask[0, 0, 0, 0] == 0 and mask[0, 0, 0, 1] == torch.finfo(torch.float32).min


def test_positions_skip_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def _valid(layout):
    return (layout.segments != Segment.PAD).long()


def test_packer_lays_out_segments_and_labels_only_the_answer(parts):
    backbone, split = parts
    samples = [split[i] for i in range(4)]
    layout = Packer(backbone)(samples)
    tok = backbone.tokenizer
    cue = tok.encode("answer :", add_special_tokens=False)
    answer = layout.regions[Segment.ANSWER_INTACT]
    for row, sample in enumerate(samples):
        labelled = layout.labels[row][layout.labels[row] != IGNORE_INDEX].tolist()
        assert labelled == [tok.convert_tokens_to_ids(sample.answer), tok.eos_token_id]
        ids = layout.input_ids[row][_valid(layout)[row].bool()]
        assert int((ids == backbone.image_token_id).sum()) == backbone.num_image_tokens
        assert ids[0] == tok.bos_token_id
        # every segment is one column range: the answer segment starts with the cue in every row
        assert layout.input_ids[row, answer.start : answer.start + 2].tolist() == cue
    assert set(layout.regions) == {
        Segment.PREFIX,
        Segment.INTACT,
        Segment.LATENT,
        Segment.ANSWER_INTACT,
    }


def test_question_first_moves_the_question_before_the_image_and_nothing_else(parts):
    backbone, split = parts
    samples = [split[i] for i in range(3)]
    default, first = Packer(backbone)(samples), Packer(backbone, question_first=True)(samples)
    for row, sample in enumerate(samples):
        ids = first.input_ids[row][_valid(first)[row].bool()].tolist()
        question = backbone.tokenizer.encode(
            format_question(sample.question, sample.options), add_special_tokens=False
        )
        image = backbone.image_prompt_ids()
        assert ids[: 1 + len(question) + len(image)] == [ids[0], *question, *image]
        old = default.input_ids[row][_valid(default)[row].bool()].tolist()
        assert old[: 1 + len(image) + len(question)] == [ids[0], *image, *question]
        assert ids[1 + len(question) + len(image) :] == old[1 + len(image) + len(question) :]
    torch.testing.assert_close(
        first.labels[first.labels != IGNORE_INDEX], default.labels[default.labels != IGNORE_INDEX]
    )


def test_image_features_land_on_placeholders(parts):
    backbone, split = parts
    layout = Packer(backbone)([split[0], split[1]])
    embeds = backbone.embed(layout.input_ids, layout.pixel_values)
    features = backbone.encode_images(layout.pixel_values)
    for row in range(2):
        at = layout.input_ids[row] == backbone.image_token_id
        torch.testing.assert_close(embeds[row][at], features[row])
    with pytest.raises(ValueError, match="image placeholder"):
        backbone.embed(layout.input_ids, layout.pixel_values[:1])


def test_padding_does_not_change_a_samples_logits(parts):
    backbone, split = parts
    samples = [split[i] for i in range(5)]
    pack = Packer(backbone)
    layout = pack(samples)
    valid = _valid(layout)
    with torch.no_grad():
        embeds = backbone.embed(layout.input_ids, layout.pixel_values)
        mask = additive(causal_allowed(valid), embeds.dtype)
        batched = backbone(embeds, mask, positions_from_mask(valid)).logits
        for row, sample in enumerate(samples):
            alone = pack([sample])
            alone_valid = _valid(alone)
            e = backbone.embed(alone.input_ids, alone.pixel_values)
            m = additive(causal_allowed(alone_valid), e.dtype)
            logits = backbone(e, m, positions_from_mask(alone_valid)).logits[0]
            torch.testing.assert_close(
                batched[row][valid[row].bool()],
                logits[alone_valid[0].bool()],
                atol=1e-5,
                rtol=1e-4,
            )


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_boolean_mask_means_what_the_additive_one_means(parts, kernel):
    """A boolean "may attend" mask gives the additive mask's logits under either kernel (eager
    attention would add it as a +1 / 0 bias were it passed through), padded rows included."""
    backbone, split = parts
    backbone.lm.set_attn_implementation(kernel)
    layout = Packer(backbone)([split[i] for i in range(3)])
    valid = _valid(layout)
    allowed = causal_allowed(valid)
    with torch.no_grad():
        embeds = backbone.embed(layout.input_ids, layout.pixel_values)
        positions = positions_from_mask(valid)
        additive_out = backbone(embeds, additive(allowed, embeds.dtype), positions).logits
        boolean_out = backbone(embeds, allowed[:, None], positions).logits
        cast = backbone(embeds, allowed[:, None].float(), positions).logits
    torch.testing.assert_close(boolean_out, additive_out, atol=1e-6, rtol=1e-5)
    assert (cast - additive_out).abs().max() > 1e-2  # the premise: a +1 / 0 bias masks nothing


def test_hidden_states_per_layer(parts):
    backbone, split = parts
    layout = Packer(backbone)([split[0]])
    embeds = backbone.embed(layout.input_ids, layout.pixel_values)
    mask = additive(causal_allowed(_valid(layout)), embeds.dtype)
    out = backbone(embeds, mask, positions_from_mask(_valid(layout)), output_hidden_states=True)
    assert len(out.hidden_states) == backbone.config.num_layers + 1
    assert out.hidden_states[-1].shape == (*layout.input_ids.shape, backbone.config.hidden_size)


def _naive_greedy(backbone, layout, steps):
    """Reference decoding: recompute the whole sequence for every new token (no cache)."""
    prompt = backbone.embed(layout.input_ids, layout.pixel_values)
    valid = _valid(layout)
    out: list[torch.Tensor] = []
    for _ in range(steps):
        generated = torch.stack(out, 1) if out else layout.input_ids[:, :0]
        embeds = torch.cat([prompt, backbone.embed(generated)], 1)
        mask = additive(causal_allowed(valid), embeds.dtype)
        token = backbone(embeds, mask, positions_from_mask(valid)).logits[:, -1].argmax(-1)
        out.append(token)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], 1)
    return torch.stack(out, 1)


def test_cached_greedy_decoding_matches_full_recompute(parts):
    backbone, split = parts
    layout = Packer(backbone)([split[i] for i in range(6)], with_answer=False)
    with torch.no_grad():
        # an unreachable stop id forces the full length, so every cached step is compared
        cached = generate_answers(backbone, layout, max_new_tokens=4, stop_ids=[-1]).tokens
        naive = _naive_greedy(backbone, layout, 4)
    assert torch.equal(cached, naive)


def test_tokenizer_round_trips_through_the_run_dir(parts, tmp_path):
    backbone, split = parts
    backbone.save_assets(tmp_path)
    reloaded = load_word_tokenizer(tmp_path)
    text = f"{split[0].question} A B"
    assert reloaded.encode(text) == backbone.tokenizer.encode(text)
    assert len(reloaded) == len(backbone.tokenizer)


@given(st.sampled_from("ABCD"), st.sampled_from(["{}", "({})", "{}.", "answer : {}", " {} </s>"]))
def test_extract_choice_finds_the_letter(letter, template):
    assert extract_choice(template.format(letter), OPTIONS) == letter


OPTIONS = ["red", "top left", "top", "blue"]


def test_extract_choice_accepts_option_text_preferring_the_longest_match():
    assert extract_choice("top left", OPTIONS) == "B"
    assert extract_choice("top", OPTIONS) == "C"
    assert extract_choice("blue </s>", OPTIONS) == "D"


def test_extract_choice_rejects_letters_inside_words_and_out_of_range():
    assert extract_choice("Because", OPTIONS) is None
    assert extract_choice("E", OPTIONS) is None
    assert extract_choice("green", OPTIONS) is None


def test_collator_text_answers_label_the_option_words(parts):
    backbone, split = parts
    sample = split[0]
    layout = Packer(backbone, answer="text")([sample])
    labelled = layout.labels[0][layout.labels[0] != IGNORE_INDEX].tolist()
    words = backbone.tokenizer.encode(sample.answer_text, add_special_tokens=False)
    assert labelled == [*words, backbone.tokenizer.eos_token_id]
    assert extract_choice(backbone.tokenizer.decode(words), sample.options) == sample.answer


def test_added_tokens_copy_the_init_row_and_survive_the_run_dir(parts, tmp_path):
    backbone, split = parts
    before = len(backbone.tokenizer)
    tokens = [f"<latent_{i}>" for i in range(3)] + ["<bot>"]
    ids = backbone.add_tokens(tokens, init_from="answer")
    assert ids == list(range(before, before + 4))
    assert backbone.add_tokens(tokens[:1], init_from="answer") == ids[:1]  # idempotent
    weight = backbone.lm.get_input_embeddings().weight
    source = backbone.tokenizer.convert_tokens_to_ids("answer")
    assert all(torch.equal(weight[i], weight[source]) for i in ids)
    assert (
        backbone.tokenizer.encode("answer : <latent_2> <bot>", add_special_tokens=False)[-2:]
        == ids[2:]
    )
    layout = Packer(backbone)([split[0]])
    embeds = backbone.embed(layout.input_ids, layout.pixel_values)
    mask = additive(causal_allowed(_valid(layout)), embeds.dtype)
    assert (
        backbone(embeds, mask, positions_from_mask(_valid(layout))).logits.shape[-1] == before + 4
    )

    backbone.save_assets(tmp_path)
    reloaded = load_word_tokenizer(tmp_path)
    assert reloaded.convert_tokens_to_ids(tokens) == ids
    with pytest.raises(ValueError, match="not in the vocabulary"):
        backbone.add_tokens(["<x>"], init_from="no-such-word")


def test_every_prompt_word_is_in_the_vocabulary(parts):
    backbone, split = parts
    layout = Packer(backbone, answer="text")([split[i] for i in range(20)])
    assert backbone.tokenizer.unk_token_id not in layout.input_ids.tolist()


def test_a_backbone_whose_create_takes_no_device_is_built_on_the_cpu(tiny_recipe, tmp_path):
    """Plugin backbones written before ``create(..., device=...)`` still build (and the trainer
    moves them), instead of failing on an unexpected keyword."""
    plugin = tmp_path / "older.py"
    plugin.write_text(
        "from crystalkit.models.embedded import EmbeddedBackbone\n\n\n"
        "class Older(EmbeddedBackbone):\n"
        "    @classmethod\n"
        "    def create(cls, config, *, corpus, assets=None):\n"
        "        return super().create(config, corpus=corpus, assets=assets)\n"
    )
    recipe = tiny_recipe(f"backbone.name={plugin}:Older")
    backbone = build_backbone(recipe, build_dataset(recipe), device=torch.device("meta"))
    assert type(backbone).__name__ == "Older"
    assert {p.device.type for p in backbone.parameters()} == {"cpu"}
