"""``crystalkit analyze``: each section on premises whose answer is known, then the whole analysis
on tiny models (an image-blind one, an untouched one, a tiny Qwen2.5-VL) and through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_process import assert_one_error_line, invoke
from hf_models import build as build_hf

from crystalkit.analysis.report import (
    HEADLINE,
    analyze,
    comparison_table,
    entries,
    grouped,
    headline,
    write_grouped,
)
from crystalkit.analysis.sections import (
    Collected,
    collapse_section,
    collect,
    intervention_section,
    mediation_section,
    probing_section,
    rescue_section,
)
from crystalkit.analysis.states import States
from crystalkit.crystal.method import Method
from crystalkit.data.sample import LETTERS, Sample
from crystalkit.runs.build import build_backbone, build_dataset

N, L, K, D = 64, 3, 4, 16


def _sure(letters: list[int], options: int = 4) -> torch.Tensor:
    """Option log-likelihoods that put (almost) all mass on ``letters``."""
    logp = torch.full((len(letters), options), -8.0)
    logp[torch.arange(len(letters)), torch.tensor(letters)] = 0.0
    return logp


def _options(data: Collected, **views: list[int]) -> None:
    for name, letters in views.items():
        data.add(name, _sure(letters))


def _answers(n: int = N) -> list[int]:
    return [i % 4 for i in range(n)]


def _wrong(answers: list[int]) -> list[int]:
    return [(a + 1) % 4 for a in answers]


def test_rescue_is_one_when_the_copied_latents_restore_the_intact_answer():
    data = Collected(answers=_answers())
    right, wrong = _answers(), _wrong(_answers())
    _options(data, intact=right, own=wrong, copied=right, no_copy=wrong)
    section = rescue_section(data)
    assert section["accuracy"] == {"intact": 1.0, "own": 0.0, "copied": 1.0, "no_copy": 0.0}
    assert section["rescue"] == pytest.approx(1.0) and section["kl_rescue"] == pytest.approx(1.0)
    assert section["kl_to_intact"]["copied"] == pytest.approx(0.0, abs=1e-6)
    assert section["kl_to_intact"]["own"] > 1.0


def test_rescue_is_zero_when_copying_changes_nothing_and_undefined_when_nothing_is_lost():
    data = Collected(answers=_answers())
    right, wrong = _answers(), _wrong(_answers())
    _options(data, intact=right, own=wrong, copied=wrong, no_copy=wrong)
    section = rescue_section(data)
    assert section["rescue"] == pytest.approx(0.0) and section["kl_rescue"] == pytest.approx(0.0)
    lossless = Collected(answers=_answers())
    _options(lossless, intact=right, own=right, copied=right, no_copy=right)
    assert math.isnan(rescue_section(lossless)["rescue"])


def test_an_answer_that_ignores_its_latents_shows_no_mediation():
    data = Collected(answers=_answers())
    right = _answers()
    _options(data, intact=right, donor=_wrong(right), zero=right, mean=right, shuffle=right)
    _options(data, swap=right)
    section = mediation_section(data)
    for name in ("zero", "mean", "shuffle", "swap"):
        assert section[name]["kl"] == pytest.approx(0.0, abs=1e-6)
        assert section[name]["flip_rate"] == 0.0 and section[name]["accuracy_drop"] == 0.0
    assert section["swap"]["follows_donor"] == 0.0


def test_an_answer_that_reads_only_its_latents_follows_the_donor_under_swap():
    data = Collected(answers=_answers())
    right, donor = _answers(), _wrong(_answers())
    _options(data, intact=right, donor=donor, zero=donor, mean=donor, shuffle=donor, swap=donor)
    section = mediation_section(data)
    assert section["swap"]["follows_donor"] == 1.0 and section["swap"]["flip_rate"] == 1.0
    assert section["swap"]["accuracy_drop"] == 1.0
    low, high = section["swap"]["kl_ci"]
    assert low <= section["swap"]["kl"] <= high


def _boxed(side: int) -> Sample:
    """A sample whose one evidence box is ``side`` px square in a 20 x 20 image."""
    sample = _sample(0)
    sample.image = torch.zeros(3, 20, 20, dtype=torch.uint8)
    sample.boxes = [(0, 0, side, side)]
    return sample


def test_rescue_is_reported_per_area_bucket_as_recomputed_row_by_row():
    """Small evidence (under 5 % of the image) is lost to the corruption and won back by the
    copied latents; large evidence survives it; samples without boxes are in no bucket."""
    sides = [2, 8, 0, 3, 9, 8, 2, 0] * 8  # 1 %, 16 %, no box, 2.25 %, ...
    samples = [_boxed(side) if side else _sample(0) for side in sides]
    answers = [LETTERS.index(s.answer) for s in samples]
    small = [side in (2, 3) for side in sides]
    own = [(a + 1) % 4 if is_small else a for a, is_small in zip(answers, small, strict=True)]
    data = Collected(area_buckets=(0.05,), answers=answers, samples=samples)
    _options(data, intact=answers, own=own, copied=answers, no_copy=own)
    per_bucket = rescue_section(data)["per_bucket"]
    assert list(per_bucket) == ["<5%", ">=5%"]
    for bucket, members in (("<5%", small), (">=5%", [side > 3 for side in sides])):
        rows = [i for i, member in enumerate(members) if member]
        own_right = sum(own[i] == answers[i] for i in rows) / len(rows)
        assert per_bucket[bucket]["n"] == len(rows)
        assert per_bucket[bucket]["accuracy"] == {
            "intact": 1.0,
            "own": own_right,
            "copied": 1.0,
            "no_copy": own_right,
        }
    assert per_bucket["<5%"]["rescue"] == pytest.approx(1.0)
    assert math.isnan(per_bucket[">=5%"]["rescue"])  # nothing lost: nothing to win back


def test_headline_rows_per_bucket_follow_the_intact_accuracy(tmp_path: Path):
    data = Collected(area_buckets=(0.05,), answers=[0, 0], samples=[_boxed(2), _boxed(9)])
    _options(data, intact=[0, 1], own=[0, 1])
    report = analyze(data, latent_block=False)
    head = headline(report)
    assert head["accuracy_intact/<5%"] == 1.0 and head["accuracy_intact/>=5%"] == 0.0
    labels = [entry.label for entry in entries(head)]
    assert labels[:4] == ["acc intact", "acc <5%", "acc >=5%", "rescue"]
    old = {k: v for k, v in head.items() if "/" not in k}  # a report from before buckets
    rows = grouped([("new", 0, head), ("old", 0, old)])
    assert rows[0]["accuracy_intact/<5%"]["mean"] == 1.0 and "accuracy_intact/<5%" not in rows[1]
    assert comparison_table(rows).row_count == len(HEADLINE) + 2
    markdown, per_seed = write_grouped(rows, [("new", 0, head), ("old", 0, old)], tmp_path / "a")
    assert "| acc intact | acc <5% | acc >=5% | rescue |" in markdown.read_text()
    assert per_seed.read_text().splitlines()[2].startswith("old,0,0.5,nan,nan,")


def _states(latents: torch.Tensor, image: torch.Tensor) -> States:
    tokens = torch.zeros(latents.shape[0], latents.shape[1], latents.shape[-1])
    return States(latents, image, torch.randn_like(image), tokens)


def test_latents_that_do_not_move_with_the_image_show_no_x_to_z():
    torch.manual_seed(0)
    latents, image = torch.randn(L, N, K, D), torch.randn(L, N, D)
    data = Collected()
    data.add("base", _states(latents, image), into="states")
    data.add("corrupted", _states(latents.clone(), image + torch.randn_like(image)), "states")
    data.add("other_image", _states(latents.roll(1, 1), image.roll(1, 1)), "states")
    section = intervention_section(data)
    assert section["corrupted"]["latent_change"] == pytest.approx([0.0] * L, abs=1e-6)
    assert section["corrupted"]["latent_cosine"] == pytest.approx([1.0] * L, abs=1e-5)
    assert min(section["corrupted"]["image_change"]) > 0.5
    # another instance's states are as far as two instances are apart: change ~ 1
    assert section["other_image"]["latent_change"] == pytest.approx([1.0] * L, abs=0.15)
    assert section["other_image"]["image_change"] == pytest.approx([1.0] * L, abs=0.15)


def test_collapse_tells_identical_latents_from_independent_ones():
    torch.manual_seed(0)
    shared = torch.randn(L, 1, K, D)
    collapsed, spread = Collected(), Collected()
    collapsed.add("base", _states(shared.expand(L, N, K, D), torch.randn(L, N, D)), "states")
    spread.add("base", _states(torch.randn(L, N, K, D), torch.randn(L, N, D)), "states")
    one, many = collapse_section(collapsed), collapse_section(spread)
    assert one["cosine_across_instances"] == pytest.approx([1.0] * L, abs=1e-5)
    assert max(abs(c) for c in many["cosine_across_instances"]) < 0.1
    assert max(one["effective_rank"]) < K + 0.5  # N identical instances: at most K directions
    assert min(many["effective_rank"]) > D / 2


def test_probes_read_an_answer_written_into_the_latents_and_not_into_the_question():
    torch.manual_seed(0)
    answers = _answers(96)
    latents = torch.randn(L, 96, K, D)
    latents[..., :4] += 3 * torch.eye(4)[answers][None, :, None]  # a one-hot code per answer
    samples = [_sample(a) for a in answers]
    data = Collected(answers=answers, samples=samples)
    data.add("base", _states(latents, torch.randn(L, 96, D)), into="states")
    data.add("blank_image", _states(latents, torch.randn(L, 96, D)), into="states")
    section = probing_section(data)
    for layer in section["answer"]["latents"]:
        assert layer["accuracy"] > 0.9 and layer["control"] < 0.5
        assert layer["majority"] == pytest.approx(0.25)
    for floor in ("question", "question_blank"):
        assert max(layer["accuracy"] for layer in section["answer"][floor]) < 0.6
    assert set(section) == {"answer"}  # no scene metadata: no attribute probes


def _sample(answer: int) -> Sample:
    options = ["top left", "top right", "bottom left", "bottom right"]
    return Sample(
        index=0,
        image=torch.zeros(3, 8, 8, dtype=torch.uint8),
        question="where?",
        options=options,
        answer=LETTERS[answer],
        category="position",
    )


def _embedded(tiny_recipe, *overrides: str):
    torch.manual_seed(0)
    recipe = tiny_recipe("latents.schedule.k=3", *overrides)
    dataset = build_dataset(recipe)
    backbone = build_backbone(recipe, dataset)
    test = dataset.split("test")
    samples = [test[i] for i in range(16)]
    return backbone, Method(recipe, backbone), samples, test


def _report(backbone, method, samples, test, batch_size: int = 8) -> dict:
    data = collect(backbone, method, samples, batch_size, 0, lambda s: test.counterfactual(s.index))
    return analyze(data, latent_block=method.final_k > 0)


def test_an_image_blind_model_shows_no_x_to_z_and_nothing_to_rescue(tiny_recipe):
    backbone, method, samples, test = _embedded(tiny_recipe)
    with torch.no_grad():
        backbone.projector[-1].weight.zero_()  # image features no longer depend on the image
    report = _report(backbone, method, samples, test)
    for name, moved in report["x_to_z"].items():
        assert max(moved["latent_change"]) < 1e-4, name
    for view in ("own", "copied"):  # no_copy latents never saw the image tokens: they differ
        assert report["rescue"]["kl_to_intact"][view] < 1e-6, view


def test_latents_of_an_untrained_model_read_the_image_after_the_first_layer(tiny_recipe):
    backbone, method, samples, test = _embedded(tiny_recipe)
    report = _report(backbone, method, samples, test)
    assert set(report["x_to_z"]) == {"corrupted", "other_image", "blank_image", "answer_changed"}
    for name, moved in report["x_to_z"].items():
        # layer 0: a latent token's keys/values are its embedding's, whatever the image
        assert moved["latent_change"][0] == pytest.approx(0.0, abs=1e-5), name
        assert max(moved["latent_change"][1:]) > 1e-3, name
    assert report["collapse"]["dimensions"] == 2 * _kv_width(backbone)
    head = headline(report)
    assert set(head) >= {"rescue", "x_to_z", "collapse", "probe_answer"}
    assert 0.0 <= head["accuracy_intact"] <= 1.0


def _kv_width(backbone) -> int:
    config = backbone.language_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads * head_dim


def test_without_a_latent_block_only_the_rescue_section_is_reported(tiny_recipe):
    backbone, _, samples, test = _embedded(tiny_recipe)
    method = Method(tiny_recipe("latents.schedule.k=0"), backbone)
    report = _report(backbone, method, samples, test)
    assert set(report) == {"num_samples", "rescue"}
    assert set(report["rescue"]["accuracy"]) == {"intact", "own"}
    head = headline(report)
    assert list(head) == [entry.key for entry in HEADLINE]
    # no latent block to copy: of the headline, only the intact accuracy and KL own apply
    assert [k for k, v in head.items() if not math.isnan(v)] == ["accuracy_intact", "kl_own"]


def test_headline_keeps_the_committed_columns():
    """Results under docs/results/regime/ were written with these keys and labels, in this order:
    a new measure may add columns, never rename or reorder these."""
    results = Path(__file__).resolve().parents[1] / "docs" / "results" / "regime"
    keys = (results / "analysis_test_seeds.csv").read_text().splitlines()[0].split(",")[2:]
    labels = (results / "analysis_test.md").read_text().splitlines()[0].strip("| ").split(" | ")[2:]
    assert [e.key for e in HEADLINE if e.key in keys] == keys
    assert [e.label for e in HEADLINE if e.label in labels] == labels
    assert len({e.key for e in HEADLINE}) == len(HEADLINE)


def test_analysis_runs_on_a_tiny_qwen2_5_vl():
    _, backbone, method, _ = build_hf("qwen2_5_vl")
    from crystalkit.runs.build import build_dataset as dataset_of

    test = dataset_of(method.recipe).split("test")
    samples = [test[i] for i in range(8)]
    report = _report(backbone, method, samples, test, batch_size=4)
    assert len(report["collapse"]["effective_rank"]) == backbone.num_layers
    assert report["collapse"]["dimensions"] == 2 * _kv_width(backbone)
    assert report["x_to_z"]["other_image"]["latent_change"][0] == pytest.approx(0.0, abs=1e-4)
    assert max(report["x_to_z"]["other_image"]["latent_change"]) > 1e-3


def test_analyze_command_writes_the_report_and_groups_a_grids_seeds(tiny_recipe, tmp_path):
    from crystalkit.training.trainer import train

    runs = [
        train(tiny_recipe(f"name=s{seed}", f"seed={seed}", "train.steps=2", "latents.schedule.k=2"))
        for seed in (0, 1)
    ]
    result = invoke("analyze", *(r.run_dir for r in runs), "--max-samples", "16")
    assert result.exit_code == 0, result.output
    saved = json.loads((runs[0].run_dir / "analysis_test.json").read_text())
    assert saved["num_samples"] == 16 and saved["step"] == 2
    assert (runs[0].run_dir / "analysis_test.png").read_bytes()[:4] == b"\x89PNG"
    assert "rescue" in result.output and "X→Z" in result.output
    rows = grouped(
        [
            ("a", s, json.loads((r.run_dir / "analysis_test.json").read_text())["headline"])
            for s, r in enumerate(runs)
        ]
    )
    assert rows[0]["seeds"] == 2 and rows[0]["accuracy_intact"]["ci"] is not None
    # 6-7 px objects in 32 px images: every sample in the 0.5-5 % bucket of the default edges
    assert saved["rescue"]["per_bucket"]["0.5-5%"]["n"] == 16 and "acc 0.5-5%" in result.output
    assert comparison_table(rows).row_count == len(HEADLINE) + 1


def test_analyze_command_names_a_missing_run(tmp_path):
    result = invoke("analyze", tmp_path / "nowhere")
    assert "nowhere" in assert_one_error_line(result)


def test_analyze_grid_groups_seeds_and_reuses_saved_analyses(tmp_path):
    import yaml
    from conftest import ROOT, TINY

    from crystalkit.ablation.grid import load_grid
    from crystalkit.ablation.runner import cell_dir

    spec = {
        "base": str(ROOT / "recipes" / "direct_finetune.yaml"),
        "overrides": [*TINY, "train.steps=2", "eval.max_samples=8", "latents.schedule.k=2"],
        "variants": {"latent_block": []},
        "seeds": [0, 1],
        "output_dir": "out",
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert invoke("ablate", "--grid", path).exit_code == 0
    result = invoke("analyze", "--grid", path)
    assert result.exit_code == 0, result.output
    assert "2 seeds" in result.output
    table = (tmp_path / "out" / "analysis_test.md").read_text().splitlines()
    assert len(table) == 3 and table[2].startswith("| variant=latent_block | 2 |")
    per_seed = (tmp_path / "out" / "analysis_test_seeds.csv").read_text().splitlines()
    assert len(per_seed) == 3 and per_seed[0].startswith("cell,seed,accuracy_intact")
    saved = [cell_dir(load_grid(path), c) / "analysis_test.json" for c in load_grid(path).cells()]
    stamps = [p.stat().st_mtime_ns for p in saved]
    assert invoke("analyze", "--grid", path).exit_code == 0
    assert [p.stat().st_mtime_ns for p in saved] == stamps  # read back, not recomputed
    both = invoke("analyze", saved[0].parent, "--grid", path)
    assert "not both" in assert_one_error_line(both)


def test_recurrent_latents_read_the_image_from_the_first_layer(tiny_recipe):
    """A recurrent latent's input is the previous position's last hidden state, so unlike a latent
    token its layer-0 keys and values already depend on the image."""
    backbone, method, samples, test = _embedded(tiny_recipe, "latents.family=recurrent")
    report = _report(backbone, method, samples, test)
    assert report["x_to_z"]["other_image"]["latent_change"][0] > 1e-3
    assert report["z_to_y"]["swap"]["kl"] > 0
