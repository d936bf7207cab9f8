"""What a run's vision encoder hands the language model: linear probes of its image tokens for the
quantities the synthetic questions ask.

    python benchmarks/testbed_probes.py runs/direct_finetune              # 600 train images
    python benchmarks/testbed_probes.py RUN_DIR --samples 3000 --fresh    # and an untrained encoder

For ``synthetic_shapes`` runs. The image tokens are what ``Backbone.encode_images`` returns (the
projector's output plus the learned token positions: exactly the LM's image inputs). Probes
(cross-validated logistic regression, :func:`crystalkit.analysis.probing.probe`):

* ``token colour`` / ``token shape`` — the colour and the shape of the object whose centre lies in
  a token's cell ("none" for an empty cell), from that one token (colour and shape bound at a
  place: what "where is the red triangle ?" and "how many red objects ?" need); also over occupied
  tokens only;
* ``count <colour> (mean token)`` — how many objects of that colour the image holds (0-4), from the
  mean of its tokens (a count the tokens carry in aggregate).

Each line gives the probe's accuracy, the majority class and the shuffled-label control. High
probes with a model that answers near 50 % put the limit in the language model's reading of the
tokens; low probes put it in the encoder. ``--fresh`` adds the same probes on a freshly initialised
encoder (the run's recipe, seed 0): what the architecture gives before any training.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from crystalkit.analysis.probing import probe
from crystalkit.runs.build import build_backbone
from crystalkit.runs.load import load_run


@torch.inference_mode()
def tokens(backbone, samples: list, batch: int = 128) -> torch.Tensor:
    """The LM's image inputs ``[N, T, D]`` for ``samples``."""
    backbone.eval()
    out = []
    for start in range(0, len(samples), batch):
        images = [s.image.float() / 255.0 for s in samples[start : start + batch]]
        pixels = backbone.preprocess_images(torch.stack(images))
        out.append(backbone.encode_images(pixels).float())
    return torch.cat(out)


def probes(states: torch.Tensor, samples: list, side: int, seed: int) -> dict[str, tuple]:
    """Probe name -> (accuracy, majority, control)."""
    grid = int(states.shape[1] ** 0.5)
    cell = side / grid
    colour = [["none"] * states.shape[1] for _ in samples]
    shape = [["none"] * states.shape[1] for _ in samples]
    for i, sample in enumerate(samples):
        for obj in sample.meta["objects"]:
            x0, y0, x1, y1 = obj["box"]
            token = int((y0 + y1) / 2 // cell) * grid + int((x0 + x1) / 2 // cell)
            colour[i][token], shape[i][token] = obj["colour"], obj["shape"]
    rows = states.flatten(0, 1)
    results: dict[str, tuple] = {}
    for name, labels in (("token colour", colour), ("token shape", shape)):
        found = probe(rows, [label for row in labels for label in row], seed=seed)
        if found is not None:
            results[name] = (found.accuracy, found.majority, found.control)
        occupied = [k for k, label in enumerate(label for row in labels for label in row)
                    if label != "none"]  # fmt: skip
        index = torch.tensor(occupied)
        kept = [label for row in labels for label in row]
        found = probe(rows[index], [kept[k] for k in occupied], seed=seed)
        if found is not None:
            results[f"{name}, occupied tokens"] = (found.accuracy, found.majority, found.control)
    objects = [s.meta["objects"] for s in samples]
    for name in sorted({o["colour"] for scene in objects for o in scene}):
        labels = [min(sum(o["colour"] == name for o in scene), 4) for scene in objects]
        found = probe(states.mean(1), labels, seed=seed)
        if found is not None:
            results[f"count {name} (mean token)"] = (found.accuracy, found.majority, found.control)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--split", default="train")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    recipe, dataset, backbone, _, step = load_run(args.run_dir)
    data = dataset.split(args.split)
    samples = [data[i] for i in range(min(args.samples, len(data)))]
    side = recipe.dataset.params["image_size"]
    print(f"{args.run_dir} (step {step}), {len(samples)} {args.split} images")
    print(f"tasks: {dict(Counter(s.category for s in samples))}")
    encoders = {f"trained (step {step})": backbone}
    if args.fresh:
        torch.manual_seed(recipe.seed)
        encoders["fresh"] = build_backbone(recipe, dataset)
    found = {
        name: probes(tokens(model, samples), samples, side, recipe.seed)
        for name, model in encoders.items()
    }
    print("| probe | " + " | ".join(found) + " | majority | control |")
    print("|---" * (len(found) + 3) + "|")
    first = next(iter(found.values()))
    for key in first:
        cells = [f"{found[name][key][0]:.3f}" for name in found]
        majority, control = first[key][1], first[key][2]
        print(f"| {key} | " + " | ".join(cells) + f" | {majority:.3f} | {control:.3f} |")


if __name__ == "__main__":
    main()
