"""Malformed input never ends in a traceback or a hang: every case below (recipes and their
``inherit`` chains, overrides, grid files, benchmark files, ``generate --input`` files, run
directories and checkpoints, output paths) is one ``error:`` line on stderr naming what was wrong,
exit code 2, within seconds.

The corpus runs in-process (:func:`cli_process.invoke`); the alias bomb and the missing GPU also
run as real subprocesses, started together so they pay their imports in parallel.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_process import ROOT, assert_one_error_line, finish, invoke, start, stderr_of
from conftest import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from crystalkit.config.loader import load_recipe
from crystalkit.errors import UsageError
from crystalkit.io import MAX_YAML_NODES, load_yaml, read_yaml

DIRECT = ROOT / "recipes" / "direct_finetune.yaml"
#: wall-clock bound of one in-process case (the hangs this guards against took minutes)
SECONDS = 10
#: an alias bomb: nine levels of nine aliases each, 9**9 values once expanded
BOMB = "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['x'] * 9)}]\n"
    for i in range(9)
)
#: a GPU this machine does not have
MISSING_GPU = f"cuda:{max(7, torch.cuda.device_count())}"
SEED_30_DIGITS = "123456789012345678901234567890"
#: one axis of a grid too large to expand: 39 x 39 x 40 cells
AXIS = list(range(1, 40))


def _png(path: Path, size: tuple[int, int] = (8, 8)) -> Path:
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(path)
    return path


def _b64_png() -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _bomb_png() -> bytes:
    """A PNG whose header claims 100,000 x 100,000 pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b"")


@pytest.fixture(scope="module", autouse=True)
def _imported() -> None:
    """Load a valid recipe once first: the time bound is for handling the input, not for
    importing torch and the registries."""
    load_recipe(DIRECT)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-step run of the tiny recipe (what the run-level cases corrupt copies of)."""
    folder = tmp_path_factory.mktemp("bad_input_run") / "run"
    overrides = [*TINY, "train.steps=1", "train.num_threads=1", "eval.max_samples=4"]
    result = invoke("train", DIRECT, *overrides, "--run-dir", folder)
    assert result.exit_code == 0, result.output
    return folder


@dataclass(frozen=True)
class Case:
    """One malformed input: ``build(folder, run)`` writes what it needs under ``folder`` and returns
    the CLI arguments; the error line must contain every string of ``expect``."""

    name: str
    build: Callable[[Path, Path], list]
    expect: tuple[str, ...]
    needs_run: bool = False


def _file(name: str, content: str | bytes) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    return write


def recipe(name: str, content: str | bytes, *expect: str) -> Case:
    """``crystalkit recipe validate`` on a file holding ``content``."""
    write = _file(name, content)
    return Case(f"recipe:{name}", lambda f, r: ["recipe", "validate", write(f)], (name, *expect))


def override(text: str, *expect: str) -> Case:
    return Case(
        f"override:{text[:30]}",
        lambda f, r: ["recipe", "show", DIRECT, text],
        ("override", *expect),
    )


def grid(name: str, content: str, *expect: str) -> Case:
    """``crystalkit ablate --grid FILE --dry-run``; ``BASE`` in ``content`` is the base recipe."""
    write = _file(name, content.replace("BASE", str(DIRECT)))
    return Case(f"grid:{name}", lambda f, r: ["ablate", "--grid", write(f), "--dry-run"], expect)


def bench(name: str, content: str | bytes, *expect: str) -> Case:
    """``crystalkit eval RUN --bench FILE``; ``B64`` in ``content`` is a valid base64 PNG."""
    if isinstance(content, str):
        content = content.replace("B64", _b64_png())
    write = _file(name, content)

    def build(folder: Path, run: Path) -> list:
        _png(folder / "ok.png")
        return ["eval", run, "--bench", write(folder)]

    return Case(f"bench:{name}", build, expect, needs_run=True)


def queries(name: str, content: str, *expect: str) -> Case:
    """``crystalkit generate RUN --input FILE`` (``ok.png`` and ``not_an_image.png`` beside it)."""
    write = _file(name, content)

    def build(folder: Path, run: Path) -> list:
        _png(folder / "ok.png")
        (folder / "not_an_image.png").write_text("hello")
        (folder / "zero.png").write_bytes(b"")
        (folder / "bomb.png").write_bytes(_bomb_png())
        return ["generate", run, "--input", write(folder)]

    return Case(f"generate:{name}", build, (name, *expect), needs_run=True)


def broken_run(name: str, damage: Callable[[Path], object], *expect: str, args=("eval",)) -> Case:
    """A command on a copy of the run that ``damage`` broke."""

    def build(folder: Path, run: Path) -> list:
        copy = folder / name
        shutil.copytree(run, copy)
        damage(copy)
        return [*args, copy] if args[0] == "eval" else [*args, "--run-dir", copy]

    return Case(f"run:{name}", build, expect, needs_run=True)


def _weights(run: Path) -> Path:
    return next(run.glob("checkpoints/step_*/model.safetensors"))


def _edit_recipe(old: str, new: str) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        saved = run / "recipe.yaml"
        text = saved.read_text()
        assert old in text
        saved.write_text(text.replace(old, new))

    return edit


TSV_HEADER = "index\timage\tquestion\tA\tB\tanswer\n"
QUESTION = '"question": "q", "options": ["a", "b"], "answer": "A"'

CASES = [
    # -- recipes: the file itself
    recipe("binary.yaml", bytes(range(256)) * 4, "cannot read"),
    recipe("list.yaml", "- 1\n- 2\n", "must be a mapping", "got list"),
    Case("recipe:folder", lambda f, r: ["recipe", "validate", f], ("is a folder",)),
    Case("recipe:missing", lambda f, r: ["recipe", "validate", f / "nope.yaml"], ("not found",)),
    recipe("duplicate.yaml", "seed: 1\nseed: 2\n", "duplicate key 'seed'"),
    recipe("bomb.yaml", BOMB, "expands to more than"),
    recipe("self_alias.yaml", "a: &a [1, *a]\n", "alias refers to the collection"),
    recipe("deep.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deep"),
    recipe("date.yaml", "description: 2020-13-45\n", "invalid YAML"),
    recipe("tag.yaml", "seed: !!python/object:os.system ls\n", "invalid YAML"),
    recipe("utf16.yaml", "seed: 1\n".encode("utf-16"), "cannot read"),
    # -- recipes: values
    recipe("seed.yaml", f"seed: {SEED_30_DIGITS}\n", "seed", "less than 4294967296"),
    recipe("seed_negative.yaml", "seed: -1\n", "seed", "greater than or equal to 0"),
    recipe("lr_nan.yaml", "train: {lr: .nan}\n", "train.lr", "finite number"),
    recipe("betas_inf.yaml", "train: {betas: [.inf, 0.9]}\n", "train.betas.0", "finite"),
    recipe(
        "weight_inf.yaml",
        "method: crystal\nobjectives: {kl: {weight: .inf}}\n",
        "objectives.kl.weight",
        "finite",
    ),
    recipe("batch_negative.yaml", "train: {batch_size: -4}\n", "train.batch_size"),
    recipe("steps_huge.yaml", f"train: {{steps: {SEED_30_DIGITS}}}\n", "train.steps"),
    recipe("image_huge.yaml", "dataset: {image_size: 100000000}\n", "dataset.image_size"),
    recipe("k_huge.yaml", "latents: {schedule: {k: 100000000000}}\n", "latents.schedule", "k"),
    recipe("unknown_key.yaml", "trian: {steps: 1}\n", "unknown key", "did you mean 'train'"),
    recipe("wrong_type.yaml", "train: [1, 2]\n", "train"),
    recipe("name_nul.yaml", 'name: "a\\0b"\n', "name", "NUL"),
    recipe("device_spaced.yaml", "device: cuda 7\n", "device", "torch device"),
    recipe("stage_scalar.yaml", "stages: [3]\n", "stages.0", "expected a mapping"),
    recipe("inherit_missing.yaml", "inherit: nowhere.yaml\n", "inherit", "not found"),
    recipe("inherit_self.yaml", "inherit: inherit_self.yaml\n", "inherit cycle"),
    recipe("inherit_number.yaml", "inherit: 3\n", "inherit", "file path"),
    # -- overrides on the command line
    override("train.lr=[1", "not valid YAML"),
    override(
        "x=[&a [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a,*a,*a,*a,"
        "*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,"
        "*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]]",
        "expands to more than",
    ),
    override("train={lr: 1, lr: 2}", "duplicate key"),
    override(f"seed={SEED_30_DIGITS}", "seed"),
    override("eval.area_buckets=[0.05, 0.005]", "eval.area_buckets", "increasing fractions"),
    override("eval.area_buckets=[a]", "eval.area_buckets.0", "valid number"),
    # -- grid files
    grid("grid_list.yaml", "[1]\n", "grid_list.yaml", "mapping"),
    grid(
        "grid_huge.yaml",
        f"base: BASE\ngrid: {{train.lr: {AXIS}, train.steps: {AXIS}, "
        f"train.weight_decay: {[0, *AXIS]}}}\n",
        "grid_huge.yaml",
        "60,840 cells",
        "at most 10,000",
    ),
    grid("grid_seeds.yaml", "base: BASE\nseeds: [0, 1, 0]\n", "grid_seeds.yaml", "0 repeats"),
    grid(
        "grid_seed_axis.yaml",
        "base: BASE\ngrid: {seed: [0, 1]}\n",  # each cell's seed=S would silently win
        "grid_seed_axis.yaml",
        "seed_keys: seed is varied too",
    ),
    grid("grid_base.yaml", "base: nope.yaml\n", "grid_base.yaml", "base", "not found"),
    grid("grid_key.yaml", "base: BASE\ngrid: {'bad key!': [1]}\n", "grid_key.yaml", "bad key!"),
    grid("grid_seed.yaml", f"base: BASE\nseeds: [{SEED_30_DIGITS}]\n", "grid_seed.yaml", "seed"),
    # -- benchmark files
    bench("binary.tsv", bytes(range(256)) * 10, "binary.tsv", "cannot read as a TSV"),
    bench("columns.tsv", "index\tquestion\n1\tq\n", "columns.tsv", "missing column"),
    bench(
        "images.tsv",
        TSV_HEADER + "1\t!!!\tq\tx\ty\tA\n2\t[]\tq\tx\ty\tA\n3\t[1, 2]\tq\tx\ty\tA\n",
        "no usable rows (3 skipped; first: 1: image is not a decodable base64 image",
    ),
    bench(
        "bomb.tsv",
        TSV_HEADER + f"1\t{base64.b64encode(_bomb_png()).decode()}\tq\tx\ty\tA\n",
        "first: 1: image is not a decodable base64 image (DecompressionBombError)",
    ),
    bench(
        "answers.tsv", TSV_HEADER + "1\tB64\tq\tx\ty\tZ\n", "answer 'Z' is not among the options"
    ),
    bench(
        "json.jsonl",
        "[" * 100_000 + "\n" + "1" + "0" * 5000 + "\n{{{\n",
        "no usable rows (3 skipped; first: line 1: not valid JSON (nested too deep)",
    ),
    bench(
        "options.jsonl",
        json.dumps({"image": "ok.png", "question": "q", "options": list("abcdefghij")}) + "\n",
        "'options' must be a list of 2 to 8 strings",
    ),
    bench(
        "images.jsonl",
        "\n".join(
            f'{{"image": "{image}", {QUESTION}}}' for image in ("nope.png", ".", "a\\u0000b")
        ),
        "no usable rows (3 skipped",
        "nope.png not found",
    ),
    bench("escape.yaml", "name: ../../x\nformat: synthetic\n", "escape.yaml", "name"),
    bench("format.yaml", "name: x\nformat: csv\n", "format.yaml", "format"),
    bench("list.yaml", "[1]\n", "list.yaml"),
    bench("bench.csv", "a,b\n", "expected a .tsv, .jsonl or .yaml"),
    # -- generate --input
    queries("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", "line 1", "nested too deep"),
    queries("number.jsonl", "1" + "0" * 5000 + "\n", "line 1", "not valid JSON"),
    queries("text.jsonl", '{"image": "not_an_image.png", "question": "q"}\n', "not a readable"),
    queries("zero.jsonl", '{"image": "zero.png", "question": "q"}\n', "not a readable image"),
    queries("bomb.jsonl", '{"image": "bomb.png", "question": "q"}\n', "(DecompressionBombError)"),
    queries("missing.jsonl", '{"image": "nope.png", "question": "q"}\n', "not found"),
    queries("options.jsonl", '{"image": "ok.png", "question": "q", "options": "ab"}\n', "options"),
    Case(
        "generate:folder",
        lambda f, r: ["generate", r, "--input", f],
        ("--input", "cannot read"),
        needs_run=True,
    ),
    # -- run directories and checkpoints
    Case("run:not_a_folder", lambda f, r: ["eval", f / "nope"], ("not a directory",)),
    broken_run("yaml", lambda d: (d / "recipe.yaml").write_text("[1"), "recipe.yaml", "invalid"),
    broken_run("empty", lambda d: (d / "recipe.yaml").write_text(""), "empty file"),
    broken_run("bad_value", _edit_recipe("seed: 0", "seed: banana"), "recipe.yaml", "seed"),
    broken_run(
        "gpu", _edit_recipe("device: cpu", f"device: {MISSING_GPU}"), "device", "not available"
    ),
    broken_run(
        "truncated",
        lambda d: _weights(d).write_bytes(_weights(d).read_bytes()[:1000]),
        "model.safetensors",
        "cannot load weights",
    ),
    broken_run(
        "other_model",
        _edit_recipe("hidden_size: 32", "hidden_size: 64"),
        "cannot load weights",
        "size mismatch",
        "more)",
    ),
    broken_run("tokenizer", lambda d: (d / "tokenizer.json").write_text("{bad"), "tokenizer.json"),
    broken_run(
        "components",
        lambda d: (
            (d / "components.json").write_text('{"backbone": 3, "dataset": [1]}'),
            _edit_recipe("name: synthetic_shapes", "name: gone_dataset")(d),
        ),
        "dataset 'gone_dataset' is not available",
    ),
    broken_run(
        "no_checkpoint", lambda d: shutil.rmtree(d / "checkpoints"), "no complete checkpoint"
    ),
    Case(
        "eval:max_samples",
        lambda f, r: ["eval", r, "--max-samples", "0"],
        ("--max-samples", ">= 1"),
        needs_run=True,
    ),
    # -- training into run directories
    Case(
        "train:resume_nothing",
        lambda f, r: ["train", DIRECT, "--resume", "--run-dir", f / "never"],
        ("no run to resume", "drop --resume"),
    ),
    broken_run(
        "resume_list",
        lambda d: (d / "recipe.yaml").write_text("- 1\n"),
        "not a recipe",
        args=("train", DIRECT, "--resume"),
    ),
    Case(
        "train:gpu",
        lambda f, r: ["train", DIRECT, f"device={MISSING_GPU}", "--run-dir", f / "run"],
        ("device", MISSING_GPU, "not available on this machine"),
    ),
    Case(
        "train:init_from",
        lambda f, r: [
            *("train", DIRECT, *TINY, "latents.schedule.k=2", "latents.init_from=nope"),
            *("--run-dir", f / "run"),
        ],
        ("latents.init_from", "'nope' is not a token"),
    ),
    Case(
        "train:lm_type",
        lambda f, r: ["train", DIRECT, *TINY, "backbone.lm_type=nosuch", "--run-dir", f / "run"],
        ("backbone.lm_type", "Unrecognized model identifier: nosuch"),
    ),
    Case(
        "train:under_a_file",
        lambda f, r: ["train", DIRECT, "--run-dir", _file("a_file", "x")(f) / "run"],
        ("is a file, not a folder",),
    ),
    # -- output paths
    Case("schema:folder", lambda f, r: ["recipe", "schema", "-o", f], ("--output", "folder")),
    Case(
        "export:under_a_file",
        lambda f, r: ["export", r, "--merge", "--out", _file("file", "x")(f) / "out"],
        ("cannot create the export folder",),
        needs_run=True,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_malformed_input_is_one_line_within_seconds(
    case: Case, tmp_path: Path, request: pytest.FixtureRequest
):
    run = request.getfixturevalue("run_dir") if case.needs_run else tmp_path / "no_run"
    args = case.build(tmp_path, run)
    began = time.monotonic()
    result = invoke(*args)  # asserts: no traceback, no exception but the deliberate exit
    elapsed = time.monotonic() - began
    line = assert_one_error_line(result)
    for text in case.expect:
        assert text in line, (text, line)
    assert elapsed < SECONDS, f"{case.name} took {elapsed:.1f} s"


def test_the_corpus_is_broad():
    kinds = {case.name.split(":")[0] for case in CASES}
    assert len(CASES) >= 60
    assert kinds >= {"recipe", "override", "grid", "bench", "generate", "run", "train"}


def test_grid_report_leaves_out_hand_edited_cells(tmp_path: Path):
    """Cell files edited into nonsense: unreadable results are a warning and an unfinished cell,
    odd sections are ignored, an unknown state or a pid that is not a process is pending."""
    from crystalkit.ablation.grid import load_grid
    from crystalkit.ablation.runner import cell_dir, cell_state

    path = tmp_path / "grid.yaml"
    path.write_text(f"base: {DIRECT}\noutput_dir: out\nseeds: [0, 1, 2]\n")
    grid = load_grid(path)
    broken, odd, unknown = (cell_dir(grid, cell) for cell in grid.cells())
    for directory, status, results in (
        (broken, '{"state": "done"}', "{bad"),
        (odd, '{"state": "done"}', '{"accuracy": 0.5, "per_category": [1], "controls": 3}'),
        (unknown, '{"state": [1], "pid": -1}', None),
    ):
        directory.mkdir(parents=True)
        (directory / "status.json").write_text(status)
        if results is not None:
            (directory / "results.json").write_text(results)
    assert cell_state(unknown) == "pending"
    result = invoke("ablate", "report", path)
    assert result.exit_code == 0, result.output
    warning = stderr_of(result).strip().splitlines()[0]
    assert warning == (
        f"warning: {broken / 'results.json'}: unreadable (Expecting property name enclosed in "
        "double quotes); cell left out"
    )
    rows = (grid.output_dir / "report_seeds.csv").read_text().splitlines()
    assert rows == ["seed,accuracy", "1,0.5"]  # seed 1 alone finished


def test_error_messages_quoting_several_lines_print_as_one():
    from crystalkit.errors import CheckpointError, PluginError

    hub = "cannot load 'x': We couldn't connect.\n\nCheck your connection   or  cache."
    assert str(CheckpointError(hub)) == "cannot load 'x': We couldn't connect. Check your " + (
        "connection or cache."
    )
    assert str(PluginError("a\n  b")) == "a b"
    assert str(UsageError("got 'a  b'")) == "got 'a  b'"  # one line already: kept as written


def test_device_is_checked_against_the_machine(monkeypatch: pytest.MonkeyPatch):
    """A machine with two GPUs (torch's answers stand in for them): cuda:1 is there, cuda:7 is
    not; a misspelt device kind is not a device anywhere."""
    from crystalkit.device import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    check_device("cuda")
    check_device("cpu")
    with pytest.raises(
        UsageError, match=r"'cuda:7' is not available .* 2 cuda devices \(cuda:0 to"
    ):
        check_device("cuda:7")
    with pytest.raises(UsageError, match="'gpu' is not a torch device"):
        check_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="torch finds no cuda device"):
        check_device("cuda")


# -- the alias bomb and the missing GPU, as real processes ------------------------------------


def test_bomb_and_missing_gpu_as_subprocesses(tmp_path: Path):
    """The alias bomb used to hang for minutes and the missing GPU ended in a torch traceback; as
    the user meets them, in a process of their own (the 30-digit seed and ``--resume`` of a run
    that never existed are in the corpus above)."""
    (tmp_path / "bomb.yaml").write_text(BOMB)
    processes = {
        "expands to more than": start("recipe", "validate", str(tmp_path / "bomb.yaml")),
        f"device: '{MISSING_GPU}' is not available on this machine": start(
            "train", str(DIRECT), f"device={MISSING_GPU}", "--run-dir", str(tmp_path / "run")
        ),
    }
    for expected, process in processes.items():
        result = finish(process, timeout=60)  # mostly the import of torch, on a busy machine
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert expected in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_resume_still_continues_a_run_that_exists(run_dir: Path, tmp_path: Path):
    """The refusal is for a run that never existed: a saved run resumes (here: already done, so
    the recipe must match and nothing trains)."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    overrides = [*TINY, "train.steps=1", "train.num_threads=1", "eval.max_samples=4"]
    result = invoke("train", DIRECT, *overrides, "--resume", "--run-dir", copy)
    assert result.exit_code == 0, result.output
    changed = invoke("train", DIRECT, *overrides, "train.steps=2", "--resume", "--run-dir", copy)
    assert "cannot resume: train.steps was 1" in assert_one_error_line(changed)


# -- the YAML bound, as a property ------------------------------------------------------------


def _nested_anchors(levels: int, fanout: int) -> tuple[str, int]:
    """A document of ``levels`` anchors, each a list of ``fanout`` aliases of the previous one,
    and the number of values it expands to (mapping, keys, lists and scalars, each once per
    appearance)."""
    lines, size, total = [], 0, 1
    for level in range(levels):
        items = ["x"] * fanout if level == 0 else [f"*l{level - 1}"] * fanout
        lines.append(f"l{level}: &l{level} [{', '.join(items)}]")
        size = 1 + fanout * (1 if level == 0 else size)
        total += 1 + size
    return "\n".join(lines) + "\n", total


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(levels=st.integers(1, 12), fanout=st.integers(1, 12))
def test_yaml_loads_exactly_the_documents_within_the_bound(levels: int, fanout: int):
    text, total = _nested_anchors(levels, fanout)
    began = time.monotonic()
    if total <= MAX_YAML_NODES:
        data = load_yaml(text)
        assert len(data) == levels and len(data[f"l{levels - 1}"]) == fanout
    else:
        with pytest.raises(yaml.YAMLError, match="expands to more than"):
            load_yaml(text)
    assert time.monotonic() - began < 2


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(max_size=200))
def test_any_yaml_file_loads_or_is_one_line(tmp_path: Path, text: str):
    path = tmp_path / "any.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        read_yaml(path)
    except UsageError as exc:
        message = str(exc)
        assert message.startswith(str(path)) and "\n" not in message


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.text(max_size=80), max_size=5))
def test_any_bench_jsonl_is_rows_or_skips(tmp_path: Path, lines: list[str]):
    """A JSONL benchmark file never raises past its reader: every line is a row or a skip."""
    from crystalkit.evaluation.benchfiles import read_jsonl

    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(line.replace("\n", " ").replace("\r", " ") for line in lines))
    samples, bad = read_jsonl(path, tmp_path, 16)
    assert len(samples) + len(bad) == sum(
        1 for line in path.read_text().splitlines() if line.strip()
    )


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.text(max_size=80), max_size=5))
def test_any_generate_input_is_queries_or_one_usage_error(tmp_path: Path, lines: list[str]):
    from crystalkit.evaluation.predict import read_queries

    path = tmp_path / "queries.jsonl"
    path.write_text("\n".join(line.replace("\n", " ").replace("\r", " ") for line in lines))
    try:
        assert read_queries(path)
    except UsageError as exc:
        assert "\n" not in str(exc)
