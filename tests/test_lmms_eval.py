"""lmms-eval (the ``lmms`` extra) evaluates a ``crystalkit export --merge`` folder offline, with its
own Qwen2.5-VL model class, on the task in ``tests/fixtures/lmms_task`` over crystalkit's synthetic
test split: the prompt it builds is the export's chat-templated prompt, the model writes its latent
block under lmms-eval's ``generate()``, and the accuracy it reports is the one its logged samples
give.

Not asserted: that lmms-eval's accuracy equals crystalkit's. lmms-eval loads the weights in
bfloat16 and resamples each image through qwen_vl_utils, so a few answers of the tiny model can
flip (crystalkit evaluates in float32 on the image as is)."""

from __future__ import annotations

import pytest

pytest.importorskip("lmms_eval")

import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import ROOT, THREADS
from hf_models import written_export
from PIL import Image
from transformers import AutoProcessor

from crystalkit.data.prompt import ANSWER_CUE, format_question
from crystalkit.runs.load import load_run

TASK = ROOT / "tests" / "fixtures" / "lmms_task"
DATA = "crystal_synth_test.parquet"  # the task's data_files entry, relative to the working dir
PIXELS = 64 * 64  # min_pixels = max_pixels: lmms-eval resamples every image to the training size

# Runs lmms-eval's CLI and records each prompt text its model class builds with the processor's
# chat template (the text tokenized for generate(); --log_samples logs only the question text).
SPY = """
import json, os, runpy, sys
from transformers import processing_utils

template = processing_utils.ProcessorMixin.apply_chat_template

def recorded(self, conversation, *args, **kwargs):
    out = template(self, conversation, *args, **kwargs)
    if kwargs.get("tokenize") is False and isinstance(out, (str, list)):
        with open(os.environ["PROMPTS_FILE"], "a") as f:
            for text in [out] if isinstance(out, str) else out:
                f.write(json.dumps(text) + "\\n")
    return out

processing_utils.ProcessorMixin.apply_chat_template = recorded
sys.argv = ["lmms_eval", *sys.argv[1:]]
runpy.run_module("lmms_eval", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):
    return written_export(tmp_path_factory)


def _task_utils():
    spec = importlib.util.spec_from_file_location("crystal_synth_utils", TASK / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_parquet(samples, path) -> None:
    """The split as the task reads it: a PNG image (from uint8 [3, H, W]), question, options and
    the answer letter, with the ``datasets`` features in the schema (``image`` loads as a PIL
    image). Written with pyarrow: ``Dataset.from_dict`` fingerprints its data with dill, which
    fails on some pyarrow versions."""
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "options": datasets.Sequence(datasets.Value("string")),
            "answer": datasets.Value("string"),
        }
    )
    images = []
    for sample in samples:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(sample.image.permute(1, 2, 0).numpy())).save(
            buffer, format="PNG"
        )
        images.append({"bytes": buffer.getvalue(), "path": None})
    columns = {
        "image": images,
        "question": [s.question for s in samples],
        "options": [list(s.options) for s in samples],
        "answer": [s.answer for s in samples],
    }
    pq.write_table(pa.Table.from_pydict(columns, schema=features.arrow_schema), path)


def test_lmms_eval_evaluates_the_export_offline(written, tmp_path):
    run_dir, folder = written
    _, dataset, _, method, _ = load_run(run_dir)
    samples = list(dataset.split("test"))
    _write_parquet(samples, tmp_path / DATA)
    shutil.copytree(TASK, tmp_path / "tasks" / "crystal_synth")
    prompts_file = tmp_path / "prompts.jsonl"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(THREADS),
        "PROMPTS_FILE": str(prompts_file),
    }
    model_args = (
        f"pretrained={folder},device=cpu,device_map=cpu,min_pixels={PIXELS},max_pixels={PIXELS}"
    )
    command = [sys.executable, "-c", SPY, "--model", "qwen2_5_vl", "--model_args", model_args]
    command += ["--tasks", "crystal_synth", "--include_path", str(tmp_path / "tasks")]
    command += ["--batch_size", "1", "--log_samples", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    (results_file,) = (tmp_path / "out").rglob("*_results.json")
    (samples_file,) = (tmp_path / "out").rglob("*_samples_crystal_synth.jsonl")
    logged = sorted(
        (json.loads(line) for line in samples_file.read_text().splitlines()),
        key=lambda r: r["doc_id"],
    )
    assert [r["doc_id"] for r in logged] == list(range(len(samples)))

    # the prompt: the logged question text is crystalkit's, and the text lmms-eval's model class
    # tokenized is the export's own chat template applied to the user turn (image, then text)
    processor = AutoProcessor.from_pretrained(folder)
    expected = []
    for record, sample in zip(logged, samples, strict=True):
        text = format_question(sample.question, sample.options)
        assert record["input"] == text
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        expected.append(processor.apply_chat_template(turn, add_generation_prompt=True))
    prompts = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    assert sorted(prompts) == sorted(expected)  # one per sample, in lmms-eval's own order

    # the raw response holds the written template: the model wrote its block (decoded without
    # the latent tokens, which are special) and closed it before the answer cue
    template = method.recipe.latents.template  # released: "<think> ..." + block + ". </think>"
    assert template.close.endswith("</think>")
    for record in logged:
        raw = record["resps"][0] if isinstance(record["resps"], list) else record["resps"]
        assert raw.startswith(template.open) and template.close in raw, raw
        answer = raw.split(template.close, 1)[1]
        assert answer.lstrip().startswith(ANSWER_CUE), raw
        assert record["filtered_resps"] == answer.strip()  # strip_thinking left the answer

    # the reported accuracy is the one the logged responses give
    task = _task_utils()
    recomputed = [
        float(task.to_letter(r["filtered_resps"], list(s.options)) == s.answer)
        for r, s in zip(logged, samples, strict=True)
    ]
    assert [r["accuracy"] for r in logged] == recomputed
    accuracy = json.loads(results_file.read_text())["results"]["crystal_synth"][
        "accuracy,think_stripped"
    ]
    assert accuracy == pytest.approx(sum(recomputed) / len(recomputed))
    row = re.search(
        r"\|crystal_synth\s*\|think_stripped\s*\|[^\n]*?\|accuracy\s*\|[^|]*\|\s*([\d.]+)\s*\|",
        done.stdout,
    )
    assert row is not None, done.stdout[-3000:]
    assert float(row.group(1)) == pytest.approx(accuracy, abs=5e-4)
