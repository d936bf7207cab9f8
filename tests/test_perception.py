"""``method: perceive``: dense labels against a pixel-level reference, the loss against a cell-by-cell
computation, what the stage trains, exact resumes, one-line errors."""

from __future__ import annotations

import pytest
import torch
from cli_process import assert_one_error_line, invoke
from conftest import ROOT
from hf_models import build
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from crystalkit.crystal.perception import HEADS, cell_labels
from crystalkit.data.sample import Sample
from crystalkit.errors import UsageError
from crystalkit.runs import checkpoint as ckpt
from crystalkit.runs import files
from crystalkit.runs.build import build_dataset, build_model
from crystalkit.runs.snapshot import SNAPSHOT_DIR, SNAPSHOT_WEIGHTS
from crystalkit.training.trainer import train

PERCEIVE = [
    "prompt.question_first=true",
    "stages=[{name: perceive, method: perceive, fraction: 0.5, train: {lr: 2.0e-3}}, "
    "{name: finetune, train: {vision_lr_scale: 0.1}}]",
]
VOCAB = {"colour": ["red", "blue", "green"], "shape": ["circle", "square"]}


@settings(max_examples=60, deadline=None)
@given(
    size=st.tuples(st.integers(8, 40), st.integers(8, 40)),
    grid=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    objects=st.lists(
        st.tuples(
            st.floats(0, 0.95),
            st.floats(0, 0.95),
            st.floats(0.02, 0.5),
            st.floats(0.02, 0.5),
            st.sampled_from(VOCAB["colour"]),
            st.sampled_from(VOCAB["shape"]),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_cell_labels_match_a_pixel_reference(size, grid, objects):
    """Each cell holds the attributes of the last object whose box centre lies inside the cell's
    pixel rectangle, ``none`` (the index past the values) elsewhere."""
    height, width = size
    rows, cols = grid
    described = []
    for fx, fy, fw, fh, colour, shape in objects:
        x0, y0 = int(fx * width), int(fy * height)
        box = [
            x0,
            y0,
            min(width, x0 + max(1, int(fw * width))),
            min(height, y0 + max(1, int(fh * height))),
        ]
        described.append({"box": box, "colour": colour, "shape": shape})
    sample = Sample(
        0,
        torch.zeros(3, height, width, dtype=torch.uint8),
        "q",
        [],
        "a",
        meta={"objects": described},
    )
    labels = cell_labels([sample], VOCAB, grid)
    assert labels.shape == (1, 2, rows * cols)
    for r in range(rows):
        for c in range(cols):
            expected = [len(VOCAB["colour"]), len(VOCAB["shape"])]
            for obj in described:
                x0, y0, x1, y1 = obj["box"]
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                inside_y = r * height / rows <= cy < (r + 1) * height / rows or (
                    r == rows - 1 and cy >= height
                )
                inside_x = c * width / cols <= cx < (c + 1) * width / cols or (
                    c == cols - 1 and cx >= width
                )
                if inside_y and inside_x:
                    expected = [
                        VOCAB["colour"].index(obj["colour"]),
                        VOCAB["shape"].index(obj["shape"]),
                    ]
            assert labels[0, :, r * cols + c].tolist() == expected


def test_perceive_loss_is_the_cell_by_cell_cross_entropy_and_trains_only_the_vision_tower(
    tiny_recipe,
):
    recipe = tiny_recipe(*PERCEIVE)
    model = build_model(recipe, build_dataset(recipe))
    backbone, perceive = model.backbone, model.stage_methods[0]
    samples = [build_dataset(recipe).split("train")[i] for i in range(4)]
    layout = perceive.layout(samples, 0)
    total, terms = perceive.loss(backbone, layout)
    heads = getattr(backbone, HEADS)
    features = backbone.vision_features(layout.pixel_values)  # [B, C, rows, cols]
    rows, cols = backbone.image_grid
    expected = torch.zeros(())
    for a, name in enumerate(heads):
        losses = []
        for b in range(len(samples)):
            for r in range(rows):
                for c in range(cols):
                    logits = heads[name](features[b, :, r, c])
                    target = layout.cell_labels[b, a, r * cols + c]
                    losses.append(-torch.log_softmax(logits, -1)[target])
        term = torch.stack(losses).mean()
        torch.testing.assert_close(terms[f"perceive_{name}"], term)
        expected = expected + term
    torch.testing.assert_close(total, expected)
    assert (
        layout.cell_labels < torch.tensor([len(v) for v in perceive.vocab.values()])[:, None]
    ).any()

    total.backward()
    for name, param in backbone.named_parameters():  # the encoder and the heads, nothing else
        assert (param.grad is not None) == name.startswith(("encoder.", HEADS)), name


@pytest.mark.parametrize("interrupt", [3, 6], ids=["mid-perceive", "mid-finetune"])
def test_a_perceive_run_resumes_exactly(tiny_recipe, interrupt):
    full = train(tiny_recipe(*PERCEIVE, "name=full", "train.steps=8")).run_dir
    cut = tiny_recipe(*PERCEIVE, "name=cut", "train.steps=8", f"train.save_every={interrupt}")
    train(cut, stop_after=interrupt)
    resumed = train(cut, resume=True).run_dir
    a = load_file(str(ckpt.latest_checkpoint(full).path / files.CHECKPOINT_WEIGHTS))
    b = load_file(str(ckpt.latest_checkpoint(resumed).path / files.CHECKPOINT_WEIGHTS))
    assert any(k.startswith(HEADS) for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_warm_start_from_a_perceive_run_keeps_its_encoder_and_leaves_the_heads(tiny_recipe):
    source = train(tiny_recipe(*PERCEIVE, "name=source", "train.steps=4")).run_dir
    recipe = tiny_recipe("name=warm", f"warm_start.source={source}", "train.steps=2")
    run_dir = train(recipe).run_dir
    trained = load_file(str(ckpt.latest_checkpoint(source).path / files.CHECKPOINT_WEIGHTS))
    started = load_file(str(run_dir / SNAPSHOT_DIR / SNAPSHOT_WEIGHTS))
    assert any(k.startswith(HEADS) for k in trained)
    assert set(started) == {k for k in trained if not k.startswith(HEADS)}
    assert all(torch.equal(started[k], trained[k]) for k in started)


def test_perception_errors_are_one_line(tiny_recipe, tmp_path):
    recipe = tiny_recipe(*PERCEIVE, "perception.attributes=[colour, size]")
    with pytest.raises(
        UsageError, match=r"perception\.attributes: the dataset lists no values for 'size'"
    ):
        build_model(recipe, build_dataset(recipe))
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"inherit: {ROOT / 'recipes' / 'direct_finetune.yaml'}\n"
        "method: perceive\nperception: {attributes: [colour, size]}\n"
    )
    line = assert_one_error_line(invoke("train", path, "train.steps=1"))
    assert "perception.attributes" in line and "'size'" in line
    with pytest.raises(UsageError, match="exposes no vision feature map"):
        build("qwen2_5_vl", "method=perceive")
