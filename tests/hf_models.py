"""Test-size Hugging Face VLMs built from ``recipes/tiny/`` (shared by the tests that use them)."""

from __future__ import annotations

import torch
from conftest import ROOT, THREADS

from crystalkit.config.loader import load_recipe
from crystalkit.crystal.packing import INTACT_PATH, Segment, packed_allowed
from crystalkit.crystal.paths import intact_only, layout_inputs
from crystalkit.models.masks import additive
from crystalkit.runs.build import build_dataset, build_model

FAMILIES = [
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "llava_clip",
    "llava_siglip",
    "idefics3",
    "smolvlm",
]
SMALL = [
    "dataset.image_size=64",
    "dataset.train_size=64",
    "dataset.val_size=8",
    "dataset.test_size=8",
    "train.steps=4",
    "train.batch_size=4",
    f"train.num_threads={THREADS}",
]


def build(family: str, *overrides: str):
    """``(recipe, backbone, method, three training samples)`` of ``recipes/tiny/FAMILY.yaml``."""
    torch.manual_seed(0)
    recipe = load_recipe(ROOT / "recipes" / "tiny" / f"{family}.yaml", [*SMALL, *overrides])
    dataset = build_dataset(recipe)
    model = build_model(recipe, dataset)
    samples = [dataset.split("train")[i] for i in range(3)]
    return recipe, model.backbone, model.method, samples


def own_forward(backbone, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """The model's own top-level forward on one unpadded sample: the reference computation."""
    if hasattr(backbone, "_grid_thw"):  # Qwen-VL: flattened patches + grid + token types
        return backbone.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_thw=backbone._grid_thw[None],
            mm_token_type_ids=(input_ids == backbone.image_token_id).int(),
        ).logits
    return backbone.model(input_ids=input_ids, pixel_values=pixel_values[None]).logits


def intact_answer_rows(backbone, layout):
    """Per sample: its unpadded intact-path ids ``[1, T]``, the packed intact path's logits at
    its answer queries ``[A, V]``, and where those queries sit in the unpadded ids (the model's
    own forward on the ids gives the same tokens' logits there)."""
    intact, _ = layout.select(INTACT_PATH)
    queries = intact.answer_queries(Segment.ANSWER_INTACT)
    ours = intact_only(backbone, layout).intact_logits
    for row in range(len(layout)):
        keep = intact.segments[row] != Segment.PAD
        kept = torch.nonzero(keep).flatten().tolist()
        inside = [(i, c) for i, c in enumerate(kept) if queries.start <= c < queries.stop]
        logits = ours[row, [c - queries.start for _, c in inside]]
        yield intact.input_ids[row : row + 1, keep], logits, [i for i, _ in inside]


def chunked_forward(backbone, layout, tail: int) -> tuple[torch.Tensor, object]:
    """``layout`` through ``backbone`` in two cached chunks (all but the last ``tail`` columns,
    then those), with crystalkit's explicit mask and positions: ``(logits, cache)``."""
    inputs = layout_inputs(backbone, layout)
    mask = additive(packed_allowed(layout.segments), inputs.embeds.dtype)
    width = inputs.embeds.shape[1]
    cache = backbone.new_cache()
    logits = []
    for cols in (slice(0, width - tail), slice(width - tail, width)):
        out = backbone(
            inputs.embeds[:, cols],
            mask[:, :, cols, : cols.stop],
            inputs.positions[..., cols],
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        logits.append(out.logits)
    return torch.cat(logits, 1), cache


CAP, INCREMENT = 300, 20  # training steps: at most, and between two checks
WRITE = ["latents.schedule.k=2", "latents.template=released", "latents.write=true"]
_WRITTEN: dict[str, tuple] = {}


def written_export(tmp_path_factory) -> tuple:
    """``(run_dir, export folder)``: a tiny Qwen2.5-VL CrystaL run with ``latents.write``, trained a
    few steps at a time until greedy decoding writes the template and the block for every test
    sample, then exported with --merge. Built once per test session, for the tests that serve the
    export with other tools (plain transformers, lmms-eval)."""
    if "run" in _WRITTEN:
        return _WRITTEN["run"]
    import pytest
    from cli_process import invoke

    from crystalkit.evaluation.accuracy import evaluate
    from crystalkit.runs.load import load_run
    from crystalkit.training.trainer import train

    folder = tmp_path_factory.mktemp("hf_written")
    recipe = load_recipe(
        ROOT / "recipes" / "tiny" / "qwen2_5_vl.yaml",
        [
            *SMALL,
            *WRITE,
            f"train.steps={CAP}",
            "train.lr=3e-3",
            "train.lr_schedule=constant",
            "train.warmup_ratio=0",
            "eval.max_samples=8",
            f"output_dir={folder}",
            "name=written",
        ],
    )
    generated = recipe.eval.model_copy(update={"latent_block": "generated"})
    step = 0
    while step < CAP:
        step += INCREMENT
        run_dir = train(recipe, resume=step > INCREMENT, stop_after=step).run_dir
        _, dataset, backbone, method, _ = load_run(run_dir)
        if evaluate(backbone, dataset.split("test"), method, generated).wrote_block == 1.0:
            assert invoke("export", run_dir, "--merge").exit_code == 0
            _WRITTEN["run"] = run_dir, run_dir / "export" / "pretrained"
            return _WRITTEN["run"]
    pytest.fail(f"the block was not learnt in {CAP} steps")
