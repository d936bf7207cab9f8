"""The CrystaL step: strategies agree, the copy is real, latents run the same way in training and
evaluation, and the recurrent loop equals a naive recompute."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from cli_process import assert_one_error_line, invoke

from crystalkit.crystal.layout import Layout
from crystalkit.crystal.packing import INTACT_PATH, Segment
from crystalkit.crystal.paths import Needs, intact_only, layout_inputs, packed, two_pass
from crystalkit.crystal.runner import run_sequence
from crystalkit.evaluation.generation import generate_answers
from crystalkit.models.masks import additive, causal_allowed, positions_from_mask
from crystalkit.runs.build import build_dataset, build_model

CRYSTAL_SCRATCH = Path(__file__).resolve().parents[1] / "recipes" / "crystal_scratch.yaml"
CRYSTAL = [
    "method=crystal",
    "latents.schedule.k=3",
    "objectives={kl: {fraction: 1.0}, attention: {layers: [0, -1]}, cosine: {}}",
    "dataset.tasks=[position]",
]


def _setup(tiny_recipe, *overrides: str, samples: int = 4):
    torch.manual_seed(0)
    recipe = tiny_recipe(*CRYSTAL, *overrides)
    dataset = build_dataset(recipe)
    model = build_model(recipe, dataset)
    batch = [dataset.split("train")[i] for i in range(samples)]
    return recipe, model.backbone, model.method, batch


def _grads(backbone) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["token", "recurrent"])
@pytest.mark.parametrize("copy_latents", [True, False])
def test_packed_and_two_pass_give_the_same_losses_and_gradients(tiny_recipe, family, copy_latents):
    _, backbone, method, samples = _setup(
        tiny_recipe, f"latents.family={family}", f"crystal.copy_latents={copy_latents}"
    )
    backbone.train()  # batch-norm in the encoder sees the same batch either way
    layout = method.layout(samples, step=0)
    assert layout.has(Segment.LATENT_BLANK) is not copy_latents
    results = {}
    for name, strategy in (("packed", packed), ("two_pass", two_pass)):
        backbone.zero_grad()
        total, terms = method.terms(strategy(backbone, layout, method.needs))
        total.backward()
        results[name] = ({k: v.item() for k, v in terms.items()}, _grads(backbone))
    (terms_a, grads_a), (terms_b, grads_b) = results["packed"], results["two_pass"]
    assert terms_a.keys() == {"ce_intact", "ce_corrupted", "kl", "attention", "cosine"}
    for key in terms_a:
        assert terms_b[key] == pytest.approx(terms_a[key], rel=1e-4, abs=1e-6), key
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-3)
    assert terms_a["attention"] > 0  # the term is live, not a constant zero


def _corrupted_logits(backbone, method, layout):
    with torch.no_grad():
        return packed(backbone, layout, Needs()).corrupted_logits


@pytest.mark.parametrize("family", ["token", "recurrent"])
def test_the_corrupted_path_reads_the_intact_image_only_through_the_copy(tiny_recipe, family):
    """Changing the intact image changes the corrupted path's answer only when latents are copied
    (no_copy's blank block sees no image), and never changes what the intact path sees of B."""
    outputs = {}
    for copy_latents in (True, False):
        _, backbone, method, samples = _setup(
            tiny_recipe, f"latents.family={family}", f"crystal.copy_latents={copy_latents}"
        )
        backbone.eval()
        layout = method.layout(samples, step=0)
        other = copy.copy(layout)
        other.pixel_values = torch.flip(layout.pixel_values, dims=[0])  # other samples' images
        with torch.no_grad():
            a, b = packed(backbone, layout), packed(backbone, other)
            moved = copy.copy(layout)
            moved.corrupted_pixels = torch.randn_like(layout.corrupted_pixels)
            c = packed(backbone, moved)
        outputs[copy_latents] = (a, b, c)
        torch.testing.assert_close(c.intact_logits, a.intact_logits)  # C, D, E never see B
    a, b, _ = outputs[True]
    assert not torch.allclose(a.corrupted_logits, b.corrupted_logits, atol=1e-5)
    a, b, _ = outputs[False]
    torch.testing.assert_close(a.corrupted_logits, b.corrupted_logits)


@pytest.mark.parametrize(("norm", "independent"), [("groupnorm1", True), ("batchnorm", False)])
def test_in_train_mode_the_corrupted_path_sees_nothing_of_the_intact_images(
    tiny_recipe, norm, independent
):
    """With ``no_copy``, the intact images reach the corrupted path through nothing: not through
    the latents, and not through the encoder's normalisation. Batch norm (the control) couples
    every image of a step through its batch statistics."""
    _, backbone, method, samples = _setup(
        tiny_recipe, "crystal.copy_latents=false", f"backbone.encoder_norm={norm}"
    )
    backbone.train()
    layout = method.layout(samples, step=0)
    other = copy.copy(layout)  # other intact images (a permutation would keep batch statistics)
    other.pixel_values = torch.rand_like(layout.pixel_values) * 2 - 1
    with torch.no_grad():
        a, b = packed(backbone, layout).corrupted_logits, packed(backbone, other).corrupted_logits
    assert torch.equal(a, b) is independent


def test_detaching_the_corrupted_image_keeps_only_the_latents_route(tiny_recipe):
    """``crystal.detach_corrupted_image``: the corrupted answer's loss no longer reaches the
    encoder through the corrupted image, and still reaches the intact image through the copy."""
    for detach in (False, True):
        _, backbone, method, samples = _setup(
            tiny_recipe, f"crystal.detach_corrupted_image={detach}"
        )
        backbone.train()
        layout = method.layout(samples, step=0)
        layout.pixel_values.requires_grad_(True)
        layout.corrupted_pixels.requires_grad_(True)
        _, terms = method.loss(backbone, layout)
        terms["ce_corrupted"].backward()
        corrupted = layout.corrupted_pixels.grad
        assert (corrupted is None or not bool(corrupted.abs().sum() > 0)) is detach
        assert bool(layout.pixel_values.grad.abs().sum() > 0)


def test_corrupted_loss_gradient_reaches_the_intact_image_through_the_copy(tiny_recipe):
    for copy_latents, expect_flow in ((True, True), (False, False)):
        _, backbone, method, samples = _setup(tiny_recipe, f"crystal.copy_latents={copy_latents}")
        backbone.train()  # per-sample norms: no route through batch statistics
        layout = method.layout(samples, step=0)
        layout.pixel_values.requires_grad_(True)
        _, terms = method.loss(backbone, layout)
        terms["ce_corrupted"].backward()
        grad = layout.pixel_values.grad
        assert (grad is not None and bool(grad.abs().sum() > 0)) is expect_flow


def _naive_recurrent_latents(backbone, embeds, segments, slot: range) -> list[torch.Tensor]:
    """Reference: recompute the whole prefix without a cache for every latent."""
    filled = embeds.clone()
    latents = []
    for col in slot:
        valid = (segments[:, :col] != 0).long()
        out = backbone(
            filled[:, :col],
            additive(causal_allowed(valid), embeds.dtype),
            positions_from_mask(valid),
            output_hidden_states=True,
        )
        latent = out.hidden_states[-1][:, -1]
        filled[:, col] = latent
        latents.append(latent)
    return latents, filled


def test_recurrent_loop_with_cache_equals_naive_recompute_and_parallel_replay(tiny_recipe):
    _, backbone, method, samples = _setup(
        tiny_recipe, "latents.family=recurrent", "method=finetune"
    )
    backbone.eval()
    layout = method.layout(samples, step=0)
    intact, cols = layout.select(INTACT_PATH)
    (slot,) = intact.slot_ranges()
    assert len(slot) == 3
    with torch.no_grad():
        inputs = layout_inputs(backbone, layout).columns(cols)
        embeds = inputs.embeds
        run = run_sequence(backbone, inputs, slots=[slot])
        naive, filled = _naive_recurrent_latents(backbone, embeds, intact.segments, slot)
        for col, latent in zip(slot, naive, strict=True):
            torch.testing.assert_close(run.slot_inputs[col], latent, atol=1e-5, rtol=1e-4)
        # the same latents replayed in one parallel forward give the same answer logits
        valid = (intact.segments != 0).long()
        replay = backbone(
            filled, additive(causal_allowed(valid), filled.dtype), positions_from_mask(valid)
        ).logits
        answer = intact.answer_queries(Segment.ANSWER_INTACT)
        torch.testing.assert_close(
            run.logits(answer), replay[:, answer.start : answer.stop], atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize("family", ["token", "recurrent"])
def test_evaluation_runs_the_training_latent_computation(tiny_recipe, family):
    """The first answer token's distribution at evaluation equals the training intact path's; a
    prompt without the latent block (the bug of evaluating without latents) does not."""
    _, backbone, method, samples = _setup(tiny_recipe, f"latents.family={family}")
    backbone.eval()
    with torch.no_grad():
        train_layout = method.layout(samples, step=method.recipe.train.steps)
        training = intact_only(backbone, train_layout).intact_logits
        cue_end = len(backbone.tokenizer.encode("answer :", add_special_tokens=False)) - 1
        expected = training[:, cue_end]
        prompt = method.prompt_layout(samples)
        evaluated = generate_answers(backbone, prompt, 1, [-1]).first_logits
        torch.testing.assert_close(evaluated, expected, atol=1e-5, rtol=1e-4)
        skipped = method.packer(samples, [], with_answer=False)
        without = generate_answers(backbone, skipped, 1, [-1]).first_logits
    assert not torch.allclose(without, expected, atol=1e-3)


@pytest.mark.parametrize("family", ["token", "recurrent"])
@pytest.mark.parametrize("view", ["copied", "no_copy"])
def test_corrupted_views_at_evaluation_are_the_training_corrupted_path(tiny_recipe, family, view):
    """``eval --corrupted --latents copied`` decodes what training's corrupted path computes with
    the copy, ``no_copy`` what it computes with the image-free block; the two differ."""
    copy_latents = view == "copied"
    _, backbone, method, samples = _setup(
        tiny_recipe, f"latents.family={family}", f"crystal.copy_latents={copy_latents}"
    )
    backbone.eval()
    cue_end = len(backbone.tokenizer.encode("answer :", add_special_tokens=False)) - 1
    with torch.no_grad():
        train_layout = method.layout(samples, step=method.recipe.train.steps, corrupt_seed=7)
        expected = packed(backbone, train_layout).corrupted_logits[:, cue_end]
        prompt = method.control_layout(samples, 7, blank=not copy_latents)
        evaluated = generate_answers(backbone, prompt, 1, [-1], view=view).first_logits
        other = "no_copy" if copy_latents else "copied"
        contrast = method.control_layout(samples, 7, blank=True)
        elsewhere = generate_answers(backbone, contrast, 1, [-1], view=other).first_logits
    torch.testing.assert_close(evaluated, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(elsewhere, expected, atol=1e-4)


def test_runner_attention_rows_match_eager_attention(tiny_recipe):
    _, backbone, method, samples = _setup(tiny_recipe)
    backbone.eval()
    layout: Layout = method.layout(samples, step=0)
    with torch.no_grad():
        out = packed(backbone, layout, Needs(layers=(0, -1)))
        eager = copy.deepcopy(backbone)
        eager.language_model.set_attn_implementation("eager")
        embeds = eager.embed(layout.input_ids, layout.image_pixels())
        from crystalkit.crystal.packing import packed_allowed, packed_positions

        reference = eager.language_model(
            inputs_embeds=embeds,
            attention_mask=additive(packed_allowed(layout.segments), embeds.dtype),
            position_ids=packed_positions(layout.segments),
            output_attentions=True,
        ).attentions
    latent = layout.regions[Segment.LATENT]
    for asked, layer in ((0, 0), (-1, backbone.num_layers - 1)):
        for side, segment in (
            ("intact", Segment.ANSWER_INTACT),
            ("corrupted", Segment.ANSWER_CORRUPTED),
        ):
            q = layout.answer_queries(segment)
            rows = reference[layer][:, :, q.start : q.stop, latent.start : latent.stop].mean(1)
            rows = rows / rows.sum(-1, keepdim=True)
            got = getattr(out, f"{side}_attention")[asked]
            torch.testing.assert_close(got, rows, atol=1e-5, rtol=1e-4)


def test_k_zero_is_direct_finetuning(tiny_recipe):
    """With K = 0 the finetune method's loss is the plain causal LM loss over the sequence."""
    _, backbone, method, samples = _setup(tiny_recipe, "method=finetune", "latents.schedule.k=0")
    layout = method.layout(samples, step=0)
    assert not layout.has(Segment.LATENT) and not layout.has(Segment.CORRUPTED)
    loss, terms = method.loss(backbone, layout)
    assert terms.keys() == {"ce"}
    valid = (layout.segments != 0).long()
    embeds = backbone.embed(layout.input_ids, layout.pixel_values)
    logits = backbone(
        embeds, additive(causal_allowed(valid), embeds.dtype), positions_from_mask(valid)
    ).logits
    reference = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), layout.labels[:, 1:].flatten(), ignore_index=-100
    )
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_identical_paths_give_zero_alignment(tiny_recipe):
    _, backbone, method, samples = _setup(tiny_recipe, "corruption.name=none")
    layout = method.layout(samples, step=0)
    with torch.no_grad():
        _, terms = method.loss(backbone, layout)
    assert terms["ce_corrupted"].item() == pytest.approx(terms["ce_intact"].item(), rel=1e-5)
    for key in ("kl", "attention", "cosine"):
        assert abs(terms[key].item()) < 1e-5, key


def test_train_new_rows_only_changes_only_the_latent_rows(tiny_recipe):
    from crystalkit.training.optim import build_optimizer

    recipe, backbone, method, samples = _setup(tiny_recipe, "latents.train_new_rows_only=true")
    matrices = backbone.token_matrices()
    before = [m.detach().clone() for m in matrices]
    optimizer, _ = build_optimizer(backbone, recipe.train, no_decay=matrices)
    for step in range(2):
        loss, _ = method.loss(backbone, method.layout(samples, step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    new = method.block.new_token_ids
    for old, matrix in zip(before, matrices, strict=True):
        changed = (old != matrix.detach()).any(-1).nonzero().flatten().tolist()
        assert changed and set(changed) <= set(new)
    encoder = next(backbone.encoder.parameters())
    assert encoder.grad is not None  # the rest of the model still trains


def _metric_records(run_dir):
    import json

    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").open()) if "loss" in r]


def test_end_to_end_crystal_run_logs_every_term_and_lowers_both_cross_entropies(tiny_recipe):
    from crystalkit.training.trainer import train

    recipe = tiny_recipe(*CRYSTAL, "train.steps=40", "train.lr=3e-3", "train.log_every=5")
    records = _metric_records(train(recipe).run_dir)
    terms = {"loss/ce_intact", "loss/ce_corrupted", "loss/kl", "loss/attention", "loss/cosine"}
    assert terms <= records[0].keys()
    assert {"weight/ce", "weight/kl", "weight/attention", "weight/cosine"} <= records[0].keys()
    assert records[0]["k"] == 3 and records[0]["samples_per_s"] > 0
    assert {r["stage"] for r in records} == {"train"}
    for key in ("loss/ce_intact", "loss/ce_corrupted"):  # from ~log(vocab): a wide margin
        early, late = records[0][key] + records[1][key], records[-1][key] + records[-2][key]
        assert late < 0.8 * early, key


@pytest.mark.parametrize(
    ("key", "spec"), [("kl", "{fraction: 1.0}"), ("attention", "{layers: [-1]}"), ("cosine", "{}")]
)
def test_optimising_an_alignment_term_alone_lowers_it(tiny_recipe, key, spec):
    """The premise is built, not hoped for: image features amplified 8x make the answer depend
    on the image, so the intact and corrupted paths disagree whatever the machine; optimising the
    term alone (no CE) then brings the paths together."""
    from crystalkit.training.optim import build_optimizer

    overrides = ("train.lr=3e-3", "crystal.ce_weight=0", f"objectives={{{key}: {spec}}}")
    recipe, backbone, method, samples = _setup(tiny_recipe, *overrides, samples=16)
    with torch.no_grad():
        for param in backbone.projector[-1].parameters():
            param.mul_(8.0)
    backbone.eval()
    layout = method.layout(samples, step=0)
    optimizer, _ = build_optimizer(backbone, recipe.train)
    values = []
    for _ in range(15):
        loss, terms = method.loss(backbone, layout)
        values.append(terms[key].item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert values[0] > 1e-4, (key, values[0])  # the premise (float noise is ~1e-7)
    assert values[-1] < 0.5 * values[0], (key, values)


def test_crystal_training_resumes_exactly(tiny_recipe):
    """Corruption and latent schedule are functions of (seed, step): a resumed CrystaL run ends
    with the uninterrupted run's weights."""
    from safetensors.torch import load_file

    from crystalkit.runs import checkpoint as ckpt
    from crystalkit.runs import files
    from crystalkit.training.trainer import train

    growing = [*CRYSTAL, "latents.schedule={name: linear, start: 0, end: 3, ramp: 0.5}"]
    full = train(tiny_recipe(*growing, "name=full", "train.steps=6"))
    interrupted = tiny_recipe(*growing, "name=resumed", "train.steps=6", "train.save_every=3")
    train(interrupted, stop_after=3)
    resumed = train(interrupted, resume=True)
    a = load_file(str(ckpt.latest_checkpoint(full.run_dir).path / files.CHECKPOINT_WEIGHTS))
    b = load_file(str(ckpt.latest_checkpoint(resumed.run_dir).path / files.CHECKPOINT_WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # K of the step just taken, logged after steps 2, 4, 6 (0-based steps 1, 3, 5 of a 0 -> 3 ramp)
    assert [r["k"] for r in _metric_records(full.run_dir)] == [1, 3, 3]


ONE_LINE_VARIANTS = [
    ("corruption.name=mask", lambda r: r.corruption.name == "mask"),
    ("objectives.attention.weight=0.5", lambda r: r.objectives["attention"].weight == 0.5),
    ("~objectives.kl", lambda r: "kl" not in r.objectives),
    ("latents.family=recurrent", lambda r: r.latents.family == "recurrent"),
    ("latents.schedule.k=2", lambda r: r.latents.schedule.params["k"] == 2),
    ("crystal.strategy=two_pass", lambda r: r.crystal.strategy == "two_pass"),
    ("crystal.copy_latents=false", lambda r: not r.crystal.copy_latents),
    (
        "objectives.js={name: attention, divergence: js}",
        lambda r: r.objectives["js"].name == "attention",
    ),
]


@pytest.mark.parametrize(("override", "check"), ONE_LINE_VARIANTS)
def test_variants_are_one_line_overrides(override, check):
    from crystalkit.config.loader import load_recipe

    assert check(load_recipe(CRYSTAL_SCRATCH, [override]))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("corruption.name=blurr", "corruption.name: unknown corruption 'blurr'"),
        ("corruption.radius=[5, 1]", "corruption: radius must be an ordered pair"),
        ("objectives.kl.fraction=0", "objectives.kl: fraction must be in (0, 1]"),
        ("objectives.attention.divergence=l1", "objectives.attention.divergence: Input should be"),
        ("objectives.kl.weight=-1", "objectives.kl.weight: must be >= 0"),
        (
            "objectives.kl.weight={until: 0.5}",
            "objectives.kl.weight: a weight schedule needs a name",
        ),
        ("objectives.kl.weight={name: gate, until: 2}", "objectives.kl.weight: until must be"),
        ("latents.family=vector", "latents.family: Input should be 'token' or 'recurrent'"),
        ("latents.schedule.k=-2", "latents.schedule: k must be >= 0"),
        ("crystal.strategy=fused", "crystal.strategy: Input should be 'packed' or 'two_pass'"),
        ("objectives.klx.weight=1", "objectives.klx.name: unknown objective 'klx'"),
    ],
)
def test_bad_variant_values_are_one_line_errors(override, expected):
    line = assert_one_error_line(invoke("recipe", "show", CRYSTAL_SCRATCH, override))
    assert f"override '{override}'" in line and expected in line, line


def test_attention_layer_out_of_range_is_reported(tiny_recipe):
    from crystalkit.errors import UsageError

    with pytest.raises(UsageError, match=r"attention layers \[5\] out of range for a 2-layer"):
        _setup(tiny_recipe, "objectives={attention: {layers: [5]}}")


def test_objective_classes_stop_the_intact_gradient_and_match_their_kernels():
    from crystalkit.crystal.paths import PathOutputs
    from crystalkit.objectives.alignment import AnswerKL, AttentionAlignment, HiddenCosine
    from crystalkit.objectives.functional import hardest_mean, token_kl

    torch.manual_seed(0)
    targets = torch.tensor([[3, 1, -100], [2, -100, -100]])
    intact = torch.randn(2, 3, 5, requires_grad=True)
    corrupted = torch.randn(2, 3, 5, requires_grad=True)
    rows = torch.softmax(torch.randn(2, 3, 4), -1).requires_grad_(True)
    other = torch.softmax(torch.randn(2, 3, 4), -1).requires_grad_(True)
    hidden_a, hidden_b = (
        torch.randn(2, 3, 6, requires_grad=True),
        torch.randn(2, 3, 6, requires_grad=True),
    )
    out = PathOutputs(targets, intact, corrupted, {-1: rows}, {-1: other}, hidden_a, hidden_b, 4)
    kl = AnswerKL(fraction=1.0)(out)
    expected = hardest_mean(token_kl(intact, corrupted), targets != -100, 1.0, 1)
    assert kl.item() == pytest.approx(expected.item())
    manual = [
        (
            torch.softmax(intact[b, t], -1)
            * (torch.log_softmax(intact[b, t], -1) - torch.log_softmax(corrupted[b, t], -1))
        ).sum()
        for b, t in ((0, 0), (0, 1), (1, 0))
    ]
    assert kl.item() == pytest.approx(
        ((manual[0] + manual[1]) / 2 + manual[2]).item() / 2, rel=1e-5
    )
    total = kl + AttentionAlignment()(out) + HiddenCosine()(out)
    total.backward()
    for target in (intact, rows, hidden_a):
        assert target.grad is None
    for student in (corrupted, other, hidden_b):
        assert student.grad is not None and student.grad.abs().sum() > 0
    symmetric = AnswerKL(stop_gradient=False)(out)
    symmetric.backward()
    assert intact.grad is not None
