"""Latents the model writes itself (``latents.write``, ``eval.latent_block: generated``).

The layout keeps the latent block D exactly the block: the template's opening text ends the
question segments, its closing text starts the answer segments. With ``write`` the labels cover
the opening text, the block, the closing text, the cue and the answer on each path; D, shared by
both paths, is counted once in the pooled cross-entropy. At evaluation a model that writes its
block exactly gives the answers of the forced prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_process import assert_one_error_line, invoke
from conftest import ROOT, THREADS, TINY
from PIL import Image

from crystalkit.config.loader import load_recipe
from crystalkit.config.schema import RELEASED_TEMPLATE
from crystalkit.crystal.layout import Packer
from crystalkit.crystal.packing import BLANK_PATH, CORRUPTED_PATH, INTACT_PATH, Segment
from crystalkit.crystal.paths import intact_only, packed, two_pass
from crystalkit.data.prompt import ANSWER_CUE, IGNORE_INDEX
from crystalkit.errors import RecipeError, UsageError
from crystalkit.evaluation.accuracy import evaluate
from crystalkit.evaluation.generation import feed, run_prompt, split_written
from crystalkit.models.masks import additive, causal_allowed, positions_from_mask
from crystalkit.runs.build import build_dataset, build_model

K = 2
WRITE = [f"latents.schedule.k={K}", "latents.template=released", "latents.write=true"]
CRYSTAL = ["method=crystal", "objectives={kl: {}}", "dataset.tasks=[position]"]


def _setup(tiny_recipe, *overrides: str, samples: int = 4):
    torch.manual_seed(0)
    recipe = tiny_recipe(*overrides)
    dataset = build_dataset(recipe)
    model = build_model(recipe, dataset)
    batch = [dataset.split("train")[i] for i in range(samples)]
    return recipe, model.backbone, model.method, batch


def _encode(backbone, text: str) -> list[int]:
    return backbone.tokenizer.encode(text, add_special_tokens=False)


def _labelled(layout, path) -> list[list[int]]:
    """Each row's labels along ``path``, in order, without the unlabelled columns."""
    sub, _ = layout.select(path)
    return [[t for t in row if t != IGNORE_INDEX] for row in sub.labels.tolist()]


@pytest.mark.parametrize(
    "variant", ["finetune", "crystal", "no_copy"], ids=["finetune", "crystal", "no_copy"]
)
def test_written_labels_cover_template_block_and_answer_and_d_is_unchanged(tiny_recipe, variant):
    extra = {
        "finetune": [],
        "crystal": CRYSTAL,
        "no_copy": [*CRYSTAL, "crystal.copy_latents=false"],
    }
    _, backbone, method, samples = _setup(tiny_recipe, *WRITE, *extra[variant])
    layout = method.layout(samples, step=0)
    block = method.block.ids(K)
    opening, closing = (_encode(backbone, RELEASED_TEMPLATE[k]) for k in ("open", "close"))
    cue = _encode(backbone, ANSWER_CUE)
    eos = backbone.tokenizer.eos_token_id
    answers = [[*_encode(backbone, s.answer_text), eos] for s in samples]  # recipe: text answers
    expected = [[*opening, *block, *closing, *cue, *answer] for answer in answers]
    paths = {"finetune": [INTACT_PATH], "crystal": [INTACT_PATH, CORRUPTED_PATH]}
    for path in paths.get(variant, [INTACT_PATH, BLANK_PATH]):
        assert _labelled(layout, path) == expected
    # D is exactly the latent block, at the same columns in every row, as without write
    d = layout.regions[Segment.LATENT]
    assert len(d) == K + 2
    assert layout.input_ids[:, d.start : d.stop].tolist() == [block] * len(samples)
    forced = Packer(backbone, "text", (RELEASED_TEMPLATE["open"], RELEASED_TEMPLATE["close"]))
    images = torch.stack([s.image for s in samples]).float() / 255  # ids do not depend on them
    plain = forced(
        samples,
        block,
        corrupted_images=None if variant == "finetune" else images,
        blank_latents=variant == "no_copy",
    )
    assert torch.equal(plain.input_ids, layout.input_ids)
    assert torch.equal(plain.segments, layout.segments)
    assert plain.regions == layout.regions
    # only the answer (+ eos) is labelled without write, and the objectives read only the answer
    assert _labelled(plain, INTACT_PATH) == answers
    assert torch.equal(plain.answer_targets(), layout.answer_targets())


def test_each_written_token_is_predicted_from_the_column_before_it_on_its_path(tiny_recipe):
    _, _, method, samples = _setup(tiny_recipe, *WRITE, *CRYSTAL)
    layout = method.layout(samples, step=0)
    r = layout.regions
    b, c, d = r[Segment.CORRUPTED], r[Segment.INTACT], r[Segment.LATENT]
    e, f = r[Segment.ANSWER_INTACT], r[Segment.ANSWER_CORRUPTED]
    pairs = {
        k: dict(zip(t.tolist(), q.tolist(), strict=True))
        for k, (q, t) in layout.written_pairs().items()
    }
    # the last opening-text token predicts the first latent-block token, on each path
    assert pairs["intact"][d.start] == c.stop - 1
    assert pairs["corrupted"][d.start] == b.stop - 1
    # inside D and from D's last token to the first closing token: computed once (shared)
    assert pairs["shared"] == {
        **{col: col - 1 for col in range(d.start + 1, d.stop)},
        e.start: d.stop - 1,
    }
    assert f.start not in pairs["corrupted"]  # its pair is the shared one (same logits, target)
    assert torch.equal(layout.labels[:, e.start], layout.labels[:, f.start])
    opening = len(_encode(method.packer.backbone, RELEASED_TEMPLATE["open"]))
    assert {col: col - 1 for col in range(c.stop - opening, c.stop)}.items() <= pairs[
        "intact"
    ].items()


def _per_token_ce(backbone, layout, cols_of_path):
    """Plain causal-LM cross-entropy along one path (no packing): ``[B, T - 1]`` per-token losses
    (0 where unlabelled) and the path's labels shifted by one."""
    sub, _ = layout.select(cols_of_path)
    valid = (sub.segments != 0).long()
    embeds = backbone.embed(sub.input_ids, sub.pixel_values)
    logits = backbone(
        embeds, additive(causal_allowed(valid), embeds.dtype), positions_from_mask(valid)
    ).logits
    targets = sub.labels[:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(targets)
    return losses, targets, sub


def test_finetune_with_write_is_the_causal_lm_loss_over_template_block_and_answer(tiny_recipe):
    _, backbone, method, samples = _setup(tiny_recipe, *WRITE)
    backbone.eval()
    layout = method.layout(samples, step=0)
    with torch.no_grad():
        loss, terms = method.loss(backbone, layout)
        losses, targets, _ = _per_token_ce(backbone, layout, INTACT_PATH)
    assert terms.keys() == {"ce", "ce_template"}
    reference = losses.sum() / (targets != IGNORE_INDEX).sum()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("strategy", [packed, two_pass], ids=["packed", "two_pass"])
def test_the_shared_latent_block_counts_once_in_the_pooled_cross_entropy(tiny_recipe, strategy):
    """With an identity corruption both paths compute the same per-token losses as the plain
    intact path; ``ce: both`` then pools the own tokens of both paths and D's predictions once."""
    _, backbone, method, samples = _setup(tiny_recipe, *WRITE, *CRYSTAL, "corruption.name=none")
    backbone.eval()
    layout = method.layout(samples, step=0)
    with torch.no_grad():
        total, terms = method.terms(strategy(backbone, layout, method.needs))
        losses, targets, sub = _per_token_ce(backbone, layout, INTACT_PATH)
    d = sub.regions[Segment.LATENT]
    from_d = torch.zeros_like(targets, dtype=torch.bool)
    from_d[:, d.start : d.stop] = True  # query column t predicts target t + 1
    labelled = targets != IGNORE_INDEX
    own, shared = labelled & ~from_d, labelled & from_d
    assert int(shared.sum()) == len(samples) * len(d)  # D's tokens and the first closing token
    s_own, n_own = losses[own].sum(), own.sum()
    s_shared, n_shared = losses[shared].sum(), shared.sum()
    once = (2 * s_own + s_shared) / (2 * n_own + n_shared)
    per_path = (s_own + s_shared) / (n_own + n_shared)
    assert abs(once - per_path) > 1e-3  # the premise: counting D twice would show
    assert terms["ce_intact"].item() == pytest.approx(per_path.item(), rel=1e-5)
    assert terms["ce_corrupted"].item() == pytest.approx(per_path.item(), rel=1e-5)
    assert total.item() == pytest.approx(once.item(), rel=1e-5)  # weights: ce 1, kl ~ 0
    assert abs(terms["kl"].item()) < 1e-5


def test_packed_and_two_pass_agree_with_write(tiny_recipe):
    _, backbone, method, samples = _setup(tiny_recipe, *WRITE, *CRYSTAL)
    backbone.train()
    layout = method.layout(samples, step=0)
    results = {}
    for name, strategy in (("packed", packed), ("two_pass", two_pass)):
        backbone.zero_grad()
        total, terms = method.terms(strategy(backbone, layout, method.needs))
        total.backward()
        grads = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}
        results[name] = ({k: v.item() for k, v in terms.items()}, grads)
    (terms_a, grads_a), (terms_b, grads_b) = results["packed"], results["two_pass"]
    assert terms_a.keys() == {"ce_intact", "ce_corrupted", "ce_template", "kl"}
    assert terms_b == pytest.approx(terms_a, rel=1e-4, abs=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-3)


def test_k_zero_with_write_writes_the_template_alone(tiny_recipe):
    _, backbone, method, samples = _setup(tiny_recipe, *WRITE, "latents.schedule.k=0", samples=2)
    layout = method.layout(samples, step=0)
    assert not layout.has(Segment.LATENT)
    template = [_encode(backbone, RELEASED_TEMPLATE[k]) for k in ("open", "close")]
    cue = _encode(backbone, ANSWER_CUE)
    eos = backbone.tokenizer.eos_token_id
    assert _labelled(layout, INTACT_PATH) == [
        [*template[0], *template[1], *cue, *_encode(backbone, s.answer_text), eos] for s in samples
    ]
    assert method.written_ids() == [*template[0], *template[1], *cue]
    assert intact_only(backbone, layout).written.keys() == {"intact"}


def test_a_generated_prompt_fed_the_written_block_sees_the_forced_prefix(tiny_recipe):
    """Whatever the weights: once the model has written exactly the forced template and block,
    the next token's distribution is the forced prompt's first answer distribution."""
    _, backbone, method, samples = _setup(tiny_recipe, *WRITE, samples=5)
    backbone.eval()
    written = torch.tensor([method.written_ids()] * len(samples))
    with torch.no_grad():
        forced = run_prompt(backbone, method.prompt_layout(samples)).logits
        prompt = run_prompt(backbone, method.generated_prompt_layout(samples))
        logits, _ = feed(backbone, prompt, written, torch.ones_like(written, dtype=torch.bool))
    torch.testing.assert_close(logits[:, -1], forced, atol=1e-5, rtol=1e-4)


def test_split_written_reads_the_answer_after_the_block():
    written, cue, end = [1, 2, 9, 3, 4], [3, 4], 9
    assert split_written([1, 2, 9, 3, 4, 7, 0], written, cue, end) == ([7, 0], True)
    assert split_written([1, 9, 5, 3, 4, 7], written, cue, end) == ([7], False)  # other block
    assert split_written([3, 4, 9, 6, 7], written, cue, end) == ([6, 7], False)  # no cue after
    assert split_written([5, 3, 4, 8], written, cue, None) == ([8], False)  # K = 0: no marker


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["latents.family=recurrent", "latents.write=true"], "latents.write"),
        (["latents.family=recurrent", "eval.latent_block=generated"], "eval.latent_block"),
        (
            [
                "latents.write=true",
                "stages=[{name: a, fraction: 0.5}, {name: b, latents: {family: recurrent}}]",
            ],
            "stages.b.latents.write",
        ),
        (["latents.template=think"], "latents.template"),
        (["latents.template={open: x, closing: y}"], "latents.template.closing"),
    ],
)
def test_recipe_mistakes_are_one_line(tiny_recipe, overrides, key):
    with pytest.raises(RecipeError) as info:
        tiny_recipe(*overrides)
    message = str(info.value)
    assert "\n" not in message and f" {key}: " in message, message


def test_recurrent_latents_cannot_be_generated(tiny_recipe):
    _, _, method, samples = _setup(tiny_recipe, "latents.family=recurrent", "latents.schedule.k=2")
    with pytest.raises(UsageError, match="recurrent latents are hidden states"):
        method.generated_prompt_layout(samples)


# -- a run that has learnt to write its block ---------------------------------------------------

CAP, INCREMENT = 300, 10  # steps: at most, and between two checks


@pytest.fixture(scope="module")
def written_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CrystaL run with ``write`` trained, a few steps at a time, until greedy decoding
    writes the template and the block exactly for every test sample (at most ``CAP`` steps; the
    template is a fixed sequence, learnt in a few dozen steps at this learning rate)."""
    from crystalkit.runs.load import load_run
    from crystalkit.training.trainer import train

    tmp = tmp_path_factory.mktemp("written")
    recipe = load_recipe(
        ROOT / "recipes" / "direct_finetune.yaml",
        [
            *TINY,
            f"output_dir={tmp / 'runs'}",
            *WRITE,
            *CRYSTAL[:2],
            f"train.steps={CAP}",
            "train.lr=3e-3",
            "train.lr_schedule=constant",
            "train.warmup_ratio=0",
            f"train.num_threads={THREADS}",
        ],
    )
    generated = recipe.eval.model_copy(update={"latent_block": "generated"})
    step, run_dir = 0, None
    while step < CAP:
        step += INCREMENT
        run_dir = train(recipe, resume=step > INCREMENT, stop_after=step).run_dir
        _, dataset, backbone, method, _ = load_run(run_dir)
        if evaluate(backbone, dataset.split("test"), method, generated).wrote_block == 1.0:
            return run_dir
    pytest.fail(f"the block was not learnt in {CAP} steps")


def _predictions(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"predictions_{name}.jsonl").open()]


def test_generated_and_forced_latents_give_the_same_answers(written_run: Path):
    forced = invoke("eval", written_run, "--latent-block", "forced")
    assert forced.exit_code == 0, forced.output
    result = invoke("eval", written_run, "--latent-block", "generated")
    assert result.exit_code == 0, result.output
    assert "generated latents, 100% wrote the block" in " ".join(result.stdout.split())
    summary = json.loads((written_run / "eval_test_generated.json").read_text())
    assert summary["latent_block"] == "generated" and summary["wrote_block"] == 1.0
    generated, reference = (
        _predictions(written_run, "test_generated"),
        _predictions(written_run, "test"),
    )
    assert len(generated) == len(reference) == 32
    block = ["<latent_start>", *(f"<latent_{i}>" for i in range(K)), "<latent_end>"]
    head = [*RELEASED_TEMPLATE["open"].split(), *block, *RELEASED_TEMPLATE["close"].split()]
    for g, f in zip(generated, reference, strict=True):
        # the generation shows the whole block, then the cue and the answer it extracted
        words = g["written"].split()
        assert g["wrote_block"] and words[: len(head)] == head
        assert words[len(head) :] == [*ANSWER_CUE.split(), *g["raw"].split()]
        # the same prefix before the answer: greedy decoding writes the same answer
        assert (g["raw"], g["prediction"], g["correct"]) == (
            f["raw"],
            f["prediction"],
            f["correct"],
        )
    assert (
        summary["accuracy"] == json.loads((written_run / "eval_test.json").read_text())["accuracy"]
    )


def test_generate_shows_the_written_block(written_run: Path, tmp_path: Path):
    from crystalkit.runs.load import load_run

    _, dataset, _, _, _ = load_run(written_run)
    test = dataset.split("test")
    rows = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(test[i].image.permute(1, 2, 0).numpy()).save(path)
        rows.append(
            json.dumps(
                {"image": str(path), "question": test[i].question, "options": test[i].options}
            )
        )
    queries = tmp_path / "queries.jsonl"
    queries.write_text("\n".join(rows) + "\n")
    result = invoke(
        "generate", written_run, "--input", queries, "--latent-block", "generated", "--json"
    )
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    forced = invoke("generate", written_run, "--input", queries, "--json")
    assert [a["answer"] for a in answers] == [
        json.loads(line)["answer"] for line in forced.stdout.splitlines()
    ]
    for answer in answers:
        assert (
            answer["wrote_block"]
            and "<latent_start> <latent_0> <latent_1> <latent_end>" in (answer["written"])
        )
        assert answer["written"].endswith(f"{ANSWER_CUE} {answer['answer']}")
    table = invoke("generate", written_run, "--input", queries, "--latent-block", "generated")
    assert table.exit_code == 0 and "written" in table.stdout


def _evaluate_replaced(run_dir: Path, latent_block: str, replacement) -> list[dict]:
    from crystalkit.runs.load import load_run

    recipe, dataset, backbone, method, _ = load_run(run_dir)
    cfg = recipe.eval.model_copy(update={"latent_block": latent_block})
    return evaluate(
        backbone, dataset.split("test"), method, cfg, replacement=replacement
    ).predictions


def test_a_replacement_on_the_written_block_is_the_replacement_on_the_forced_block(
    written_run: Path,
):
    """The identity replacement leaves every generated answer as it was (the replacement lands on the
    written block's own columns); under ``zero`` and ``shuffle``, a row that goes on to write the
    closing text and cue exactly answers what the same replacement on the forced block answers: the
    same context, with the block replaced, before the answer."""
    from crystalkit.evaluation.replacement import BUILTIN

    plain = _predictions_of(written_run, "generated")
    same = _evaluate_replaced(written_run, "generated", lambda backbone, layout, kv: kv)
    assert all(p["replaced"] for p in same)
    assert [p["raw"] for p in same] == [p["raw"] for p in plain]
    compared = 0
    for name in ("zero", "shuffle"):
        generated = _evaluate_replaced(written_run, "generated", BUILTIN[name])
        forced = _evaluate_replaced(written_run, "forced", BUILTIN[name])
        assert all(p["replaced"] for p in generated)  # every test sample wrote the block
        for g, f in zip(generated, forced, strict=True):
            if g["wrote_block"]:
                assert g["raw"] == f["raw"], name
                compared += 1
    assert compared > 0  # the premise: some rows wrote the whole template after the replacement


def _predictions_of(run_dir: Path, latent_block: str) -> list[dict]:
    return _evaluate_replaced(run_dir, latent_block, None)


def test_eval_replace_with_generated_latents(written_run: Path):
    result = invoke("eval", written_run, "--replace", "zero", "--latent-block", "generated")
    assert result.exit_code == 0, result.output
    assert "wrote the block" in result.stdout and "replaced" in result.stdout
    summary = json.loads((written_run / "replacements_test_generated.json").read_text())
    assert summary["latent_block"] == "generated" and summary["wrote_block"] == 1.0
    assert summary["replaced"] == {"zero": 1.0}
    plain = [p for p in _predictions_of(written_run, "generated")]
    assert summary["accuracy"]["none"] == sum(p["correct"] for p in plain) / len(plain)


def test_views_on_the_corrupted_path_refuse_generated_latents(written_run: Path):
    line = assert_one_error_line(
        invoke(
            "eval", written_run, "--corrupted", "--latents", "copied", "--latent-block", "generated"
        )
    )
    assert "--latent-block forced" in line
    line = assert_one_error_line(invoke("eval", written_run, "--latent-block", "written"))
    assert "expected forced or generated" in line
