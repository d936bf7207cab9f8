"""``crystalkit generate``: the user's images get exactly the answers evaluation computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_process import assert_one_error_line, invoke
from conftest import ROOT, TINY
from PIL import Image

from crystalkit.config.loader import load_recipe
from crystalkit.crystal.method import Method
from crystalkit.errors import UsageError
from crystalkit.evaluation.predict import read_queries
from crystalkit.runs.build import build_dataset

NUM = 6  # queries compared against evaluation (one evaluation batch)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A 2-step run with a latent block, and its first NUM test samples saved as PNG files."""
    from crystalkit.training.trainer import train

    tmp = tmp_path_factory.mktemp("generate")
    recipe = load_recipe(
        ROOT / "recipes" / "direct_finetune.yaml",
        [*TINY, f"output_dir={tmp / 'runs'}", "train.steps=2", "latents.schedule.k=2"],
    )
    run_dir = train(recipe).run_dir
    test = build_dataset(recipe).split("test")
    queries = []
    for i in range(NUM):
        sample = test[i]
        path = tmp / f"test_{i}.png"
        Image.fromarray(sample.image.permute(1, 2, 0).numpy()).save(path)
        queries.append({"image": str(path), "question": sample.question, "options": sample.options})
    return run_dir, queries


def _generate(run_dir: Path, *args: str) -> list[dict]:
    result = invoke("generate", run_dir, *args, "--json")
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def _args(queries: list[dict], options: list[str]) -> list[str]:
    args = [a for q in queries for a in ("--image", q["image"], "--question", q["question"])]
    return args + [a for o in options for a in ("--option", o)]


def _jsonl(path: Path, queries: list[dict]) -> Path:
    path.write_text("".join(json.dumps(q) + "\n" for q in queries))
    return path


def _eval_predictions(run_dir: Path, *flags: str) -> list[dict]:
    result = invoke("eval", run_dir, "--max-samples", str(NUM), *flags)
    assert result.exit_code == 0, result.output
    name = "predictions_test_corrupted" if flags else "predictions_test"
    return [json.loads(line) for line in (run_dir / f"{name}.jsonl").read_text().splitlines()]


def test_answers_equal_evaluation_batched_or_one_at_a_time(run, tmp_path: Path):
    run_dir, queries = run
    expected = _eval_predictions(run_dir)
    input_file = _jsonl(tmp_path / "queries.jsonl", queries)
    batched = _generate(run_dir, "--input", input_file)
    assert [a["answer"] for a in batched] == [p["raw"] for p in expected]
    assert [a["choice"] for a in batched] == [p["prediction"] for p in expected]
    assert [a["question"] for a in batched] == [q["question"] for q in queries]
    assert _generate(run_dir, "--input", input_file, "--batch-size", "1") == batched
    assert _generate(run_dir, "--input", input_file, "--batch-size", "4") == batched
    # --image/--question pairs give what the same rows of a file give (options: shared by all)
    assert _generate(run_dir, *_args(queries[:1], queries[0]["options"])) == batched[:1]
    open_ended = [{**q, "options": []} for q in queries]
    rows = _generate(run_dir, "--input", _jsonl(tmp_path / "open.jsonl", open_ended))
    assert _generate(run_dir, *_args(queries, [])) == rows
    assert all(a["options"] == [] and a["choice"] is None for a in rows)
    # the budget is passed through: one token at most
    short = _generate(run_dir, "--input", input_file, "--max-new-tokens", "1")
    assert all(len(a["answer"].split()) <= 1 for a in short)
    assert [a["answer"].split()[:1] for a in short] == [a["answer"].split()[:1] for a in batched]


def test_corrupted_answers_equal_evaluation_on_corrupted_images(run, tmp_path: Path, monkeypatch):
    run_dir, queries = run
    seeds: list[int | None] = []
    layout = Method.prompt_layout

    def spy(self, samples, corrupt_seed=None):
        seeds.append(corrupt_seed)
        return layout(self, samples, corrupt_seed)

    monkeypatch.setattr(Method, "prompt_layout", spy)
    expected = _eval_predictions(run_dir, "--corrupted")
    eval_seeds, seeds[:] = list(seeds), []
    input_file = _jsonl(tmp_path / "queries.jsonl", queries)
    answers = _generate(run_dir, "--input", input_file, "--corrupted")
    assert [a["answer"] for a in answers] == [p["raw"] for p in expected]
    assert seeds == eval_seeds and len(seeds) == 1 and None not in seeds  # same corruption


def test_one_question_for_several_images_and_table_output(run):
    run_dir, queries = run
    images = [a for q in queries[:2] for a in ("--image", q["image"])]
    answers = _generate(run_dir, *images, "--question", "what colour ?")
    assert [a["question"] for a in answers] == ["what colour ?"] * 2
    result = invoke("generate", run_dir, *images, "--question", "what colour ?")
    assert result.exit_code == 0, result.output
    assert "answers" in result.stdout and "what colour ?" in result.stdout
    # whatever the 2-step model writes (possibly nothing), the table shows it
    assert all(word in result.stdout for a in answers for word in a["answer"].split())


def test_bad_queries_are_one_error_line(run, tmp_path: Path):
    run_dir, queries = run
    image, question = queries[0]["image"], queries[0]["question"]
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    cases = {
        ("--image", str(tmp_path / "none.png"), "--question", question): "not found",
        ("--image", str(garbage), "--question", question): "is not a readable image",
        ("--image", image, "--question", "  "): "query 1 (--image",
        ("--image", image, "--image", image, "--question", "a", "--question", " "): "query 2",
        (
            "--image",
            image,
            "--image",
            image,
            "--question",
            "a",
            "--question",
            "b",
            "--question",
            "c",
        ): ("2 --image and 3 --question"),
        ("--image", image, "--question", question, "--option", "red"): "1 options (expected none",
        ("--question", question): "pass --image and --question",
        ("--input", str(tmp_path / "q.jsonl"), "--image", image): "--input replaces",
        ("--input", str(tmp_path / "none.jsonl")): "file not found",
    }
    for args, expected in cases.items():
        line = assert_one_error_line(invoke("generate", run_dir, *args))
        assert expected in line, (args, line)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"image": Path(image).name, "question": question}) + "\n{bad\n")
    line = assert_one_error_line(invoke("generate", run_dir, "--input", rows))
    assert line.endswith(
        f"{rows}: line 2: not valid JSON (Expecting property name enclosed in double quotes)"
    )
    rows.write_text(json.dumps({"image": "missing.png", "question": question}) + "\n")
    line = assert_one_error_line(invoke("generate", run_dir, "--input", rows))
    assert f"{rows}: line 1: image file {tmp_path / 'missing.png'} not found" in line
    line = assert_one_error_line(invoke("generate", tmp_path, "--image", image, "--question", "q"))
    assert "not a crystalkit run directory" in line


def test_input_options_as_a_list_or_a_letter_mapping(tmp_path: Path):
    rows = tmp_path / "rows.jsonl"
    listed = {"image": "a.png", "question": "colour ?", "options": ["red", "blue", "green"]}
    keyed = {**listed, "options": {"B": "blue", "C": "green", "A": "red"}}
    rows.write_text(f"{json.dumps(listed)}\n{json.dumps(keyed)}\n")
    first, second = read_queries(rows)
    assert first.options == second.options == ("red", "blue", "green")
    for options, expected in (
        ({"A": "red", "option B": "blue"}, "'options' key 'option B' is not an option letter"),
        ({"A": "red", "C": "blue"}, "'options' keys A, C skip B"),
    ):
        rows.write_text(f"{json.dumps(listed)}\n{json.dumps({**listed, 'options': options})}\n")
        with pytest.raises(UsageError) as error:
            read_queries(rows)
        assert str(error.value).startswith(f"{rows}: line 2: {expected}")
