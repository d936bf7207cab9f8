"""``crystalkit export --merge`` writes a folder plain transformers serves: ``AutoProcessor``
(chat template included) and ``AutoModelForImageTextToText`` load it, the processor's prompt is
crystalkit's prompt token for token, and the model's own ``generate()`` writes the answer
``crystalkit generate`` writes."""

from __future__ import annotations

import pytest
import torch
from cli_process import invoke
from conftest import ROOT
from hf_models import SMALL, written_export
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from crystalkit.config.loader import load_recipe
from crystalkit.data.prompt import ANSWER_CUE, format_question
from crystalkit.evaluation.predict import Query, predict
from crystalkit.runs.load import load_run
from crystalkit.training.trainer import train


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Qwen2.5-VL CrystaL run (full weights, K = 2), exported with --merge."""
    folder = tmp_path_factory.mktemp("hf_export")
    recipe = load_recipe(
        ROOT / "recipes" / "tiny" / "qwen2_5_vl.yaml",
        [*SMALL, "train.steps=2", "latents.schedule.k=2", f"output_dir={folder}", "name=run"],
    )
    run_dir = train(recipe).run_dir
    assert invoke("export", run_dir, "--merge").exit_code == 0
    return run_dir, run_dir / "export" / "pretrained"


def _user_turn(sample) -> list[dict]:
    text = format_question(sample.question, sample.options)
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def test_plain_transformers_serves_the_export(exported, tmp_path):
    run_dir, folder = exported
    _, dataset, _, method, _ = load_run(run_dir)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    sample = dataset.split("test")[0]
    block = processor.tokenizer.decode(method.block.ids(method.final_k))
    text = processor.apply_chat_template(_user_turn(sample), add_generation_prompt=True)
    image = Image.fromarray(sample.image.permute(1, 2, 0).numpy())
    inputs = processor(text=[text + block + ANSWER_CUE], images=[image], return_tensors="pt")

    layout = method.prompt_layout([sample])
    ours = layout.input_ids[layout.segments != 0]
    assert inputs["input_ids"][0].tolist() == ours.tolist()  # the same prompt, token for token

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    written = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    path = tmp_path / "sample.png"
    image.save(path)
    query = Query("sample", path, sample.question, tuple(sample.options))
    (answer,) = predict(run_dir, [query], max_new_tokens=8)
    assert written.replace(processor.tokenizer.eos_token, "").strip() == answer["answer"].strip()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):
    """The exported ``latents.write`` run of ``hf_models.written_export`` (trained once per session;
    tests/test_lmms_eval.py evaluates the same folder)."""
    return written_export(tmp_path_factory)


def test_plain_generate_writes_the_block_and_the_answer_crystalkit_generates(written, tmp_path):
    run_dir, folder = written
    _, dataset, _, method, _ = load_run(run_dir)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    tokenizer = processor.tokenizer
    budget = method.recipe.eval.max_new_tokens + len(method.written_ids())
    for index in range(4):
        sample = dataset.split("test")[index]
        text = processor.apply_chat_template(_user_turn(sample), add_generation_prompt=True)
        image = Image.fromarray(sample.image.permute(1, 2, 0).numpy())
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=budget, do_sample=False)
        ids = out[0, inputs["input_ids"].shape[1] :].tolist()
        ids = ids[: ids.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ids else ids
        assert ids[: len(method.written_ids())] == method.written_ids()  # the whole block first
        path = tmp_path / f"sample{index}.png"
        image.save(path)
        query = Query(f"sample {index}", path, sample.question, tuple(sample.options))
        (ours,) = predict(run_dir, [query], latent_block="generated")
        assert ours["wrote_block"]
        assert tokenizer.decode(ids, skip_special_tokens=False) == ours["written"]
