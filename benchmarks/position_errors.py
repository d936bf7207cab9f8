"""Where do a run's wrong position answers point? The anatomy of its errors on ``synthetic_shapes``.

    python benchmarks/position_errors.py RUN_DIR              # its predictions_test.jsonl
    python benchmarks/position_errors.py RUN_DIR --split val

"where is the red triangle ?" scenes hold a distractor of the target's colour (another shape) and
one of its shape (another colour). A wrong answer that names the quadrant of one of them says the
model found an object matching *one* of the two words but did not bind both; an answer that names
no object's quadrant says it did not find the objects at all. Reads the run's saved predictions
(``crystalkit train`` / ``crystalkit eval`` write them) and regenerates each item's scene.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from crystalkit.data.sample import LETTERS
from crystalkit.data.synthetic import QUADRANTS, quadrant
from crystalkit.runs.files import predictions_file
from crystalkit.runs.load import load_run

RIGHT = "the target (right)"


def classify(sample, choice: str | None, correct: bool) -> str:
    """``right``, ``no answer``, or the objects whose quadrant the wrong answer names."""
    if correct:
        return RIGHT
    if choice is None:
        return "no answer"
    named = sample.options[LETTERS.index(choice)]
    size = sample.image.shape[-1]
    objects = sample.meta["objects"]
    at = [QUADRANTS[quadrant(tuple(o["box"]), size)] == named for o in objects]
    target = objects[0]
    same_colour = any(
        a and o["colour"] == target["colour"] for a, o in zip(at[1:], objects[1:], strict=True)
    )
    same_shape = any(
        a and o["shape"] == target["shape"] for a, o in zip(at[1:], objects[1:], strict=True)
    )
    if same_colour and same_shape:
        return "a same-colour and a same-shape distractor"
    if same_colour:
        return "a same-colour distractor"
    if same_shape:
        return "a same-shape distractor"
    return "another distractor" if any(at[1:]) else "no object"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    _, dataset, _, _, step = load_run(args.run_dir)
    data = dataset.split(args.split)
    rows = [json.loads(line) for line in (args.run_dir / predictions_file(args.split)).open()]
    rows = [r for r in rows if r["category"] == "position"]
    kinds = Counter(classify(data[r["index"]], r["prediction"], r["correct"]) for r in rows)
    wrong = len(rows) - kinds[RIGHT]
    print(f"{args.run_dir} (step {step}): {len(rows)} position items, {wrong} wrong")
    print("| answer names the quadrant of | items | share of errors |")
    print("|---|---|---|")
    for kind, n in kinds.most_common():
        share = "" if kind == RIGHT else f"{n / max(wrong, 1):.1%}"
        print(f"| {kind} | {n} | {share} |")


if __name__ == "__main__":
    main()
