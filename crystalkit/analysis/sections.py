"""The analysis of one run: a causal-mediation reading of input X -> latents Z -> answer Y.

1. **Rescue** — on the corrupted image, the answer with its own latents, the intact image's
   latents copied in (what training's corrupted path reads) and image-free ``no_copy`` latents:
   accuracy, option-distribution KL to the intact answer, and the share of the loss won back;
   accuracy and rescue per area bucket of the evidence (:mod:`crystalkit.evaluation.buckets`).
2. **X -> Z** — how far the latent states move when the image changes (corrupted, another
   sample's image, a blank image, the same scene re-rendered with only the answer changed),
   relative to how far apart two instances' states are; the image tokens' own move for scale.
3. **Z -> Y** — how far the answer distribution moves when the latents are replaced (the probes
   zero, mean, shuffle, swap): KL, flip rate, accuracy drop; for ``swap``, how often the answer
   follows the donor image.
4. **Collapse** — centred cosine of latent states across instances (same index) and across
   indexes (same instance), and their effective rank.
5. **Probing** — linear probes from states to the answer and to image attributes the question
   does not name, with majority and random-label floors, and the question's tokens after a blank
   image as the floor of what is readable without the image.

Everything is computed from option log-likelihoods (:mod:`crystalkit.evaluation.options`) and
per-layer keys/values (:mod:`crystalkit.analysis.states`) of the run's own forward; bootstrap
intervals resample the evaluated samples.

A measure is one function of the :class:`Collected` outputs and its entry in :data:`SECTIONS`
(report key, whether it needs a latent block, the headline numbers it contributes): the report,
its headline and the comparison tables are built from that list alone
(:mod:`crystalkit.analysis.report`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from joblib import Parallel, delayed, parallel_config
from threadpoolctl import threadpool_limits

from crystalkit.analysis.measures import (
    bootstrap_ci,
    centred_cosine,
    effective_rank,
    flip_rate,
    instance_spread,
    kl_divergence,
    mean_pairwise_cosine,
    option_distribution,
    relative_change,
    rescue,
)
from crystalkit.analysis.probing import probe
from crystalkit.analysis.states import States, prompt_states
from crystalkit.crystal.method import Method
from crystalkit.data.sample import LETTERS, Sample
from crystalkit.evaluation.buckets import area_bucket, bucket_labels, evidence_area
from crystalkit.evaluation.options import option_logprobs
from crystalkit.evaluation.replacement import BUILTIN, dataset_mean_kv, mean_replacement
from crystalkit.models.backbone import Backbone
from crystalkit.seeding import derived_seed

#: latent-block views of the answer on the corrupted image, then the intact reference
VIEWS = ("intact", "own", "copied", "no_copy")
PROBES = ("zero", "mean", "shuffle", "swap")
INTERVENTIONS = ("corrupted", "other_image", "blank_image", "answer_changed")


@dataclass
class Collected:
    """Per-sample outputs gathered batch by batch, the seed they were gathered with (it drew
    the corrupted views; bootstrap intervals and probes derive theirs from it) and the edges of
    the area buckets the rescue section reports accuracy per (``eval.area_buckets``)."""

    seed: int = 0
    area_buckets: tuple[float, ...] = ()
    answers: list[int] = field(default_factory=list)
    options: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    states: dict[str, list[States]] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)

    def add(self, key: str, value: torch.Tensor, into: str = "options") -> None:
        getattr(self, into).setdefault(key, []).append(value)

    def logp(self, key: str) -> torch.Tensor:
        return option_distribution(torch.cat(self.options[key]))

    def latents(self, key: str) -> torch.Tensor:
        return torch.cat([s.latents for s in self.states[key]], dim=1)  # [L, N, K, D]

    def image(self, key: str) -> torch.Tensor:
        return torch.cat([s.image for s in self.states[key]], dim=1)  # [L, N, D]


def _blank(layout: Any, backbone: Backbone) -> Any:
    grey = torch.full((len(layout), 3, 8, 8), 0.5)
    return replace(layout, pixel_values=backbone.preprocess_images(grey).to(layout.pixel_values))


def collect(
    backbone: Backbone,
    method: Method,
    samples: Sequence[Sample],
    batch_size: int,
    seed: int,
    counterfactual: Callable[[Sample], Sample] | None,
    area_buckets: Sequence[float] = (),
) -> Collected:
    """Run every view, probe and intervention on ``samples`` (in batches); ``area_buckets``:
    the edges the rescue section's per-bucket accuracy cuts at (none: no buckets)."""
    device = next(backbone.parameters()).device
    backbone.eval()
    batches = [list(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
    prompts = [method.prompt_layout(batch).to(device) for batch in batches]
    has_latents = method.final_k > 0
    mean = mean_replacement(dataset_mean_kv(backbone, prompts)) if has_latents else None
    out = Collected(seed, tuple(area_buckets))
    for start, batch, prompt in zip(
        range(0, len(samples), batch_size), batches, prompts, strict=True
    ):
        corrupt_seed = derived_seed(seed, -1 - start)  # what eval --corrupted shows
        out.samples.extend(batch)
        out.answers.extend(LETTERS.index(s.answer) for s in batch)

        def scores(
            layout: Any, probe_fn: Any = None, view: str = "intact", batch: list = batch
        ) -> torch.Tensor:
            return option_logprobs(backbone, method, layout, batch, probe_fn, view).cpu()

        corrupted = method.prompt_layout(batch, corrupt_seed=corrupt_seed).to(device)
        other = replace(prompt, pixel_values=prompt.pixel_values.roll(1, dims=0))
        out.add("intact", scores(prompt))
        out.add("own", scores(corrupted))
        out.add("donor", scores(other))
        if has_latents:
            for view, blank in (("copied", False), ("no_copy", True)):
                layout = method.control_layout(batch, corrupt_seed, blank=blank).to(device)
                out.add(view, scores(layout, view=view))
            for name in PROBES:
                out.add(name, scores(prompt, mean if name == "mean" else BUILTIN[name]))
            layouts = {
                "base": prompt,
                "corrupted": corrupted,
                "other_image": other,
                "blank_image": _blank(prompt, backbone),
            }
            if counterfactual is not None:
                changed = [counterfactual(s) for s in batch]
                layouts["answer_changed"] = method.prompt_layout(changed).to(device)
            for key, layout in layouts.items():
                out.add(key, _cpu(prompt_states(backbone, layout)), into="states")
    return out


def _cpu(states: States) -> States:
    return States(
        *(t.cpu() for t in (states.latents, states.image, states.question, states.tokens))
    )


def _ci(statistic: Callable[[torch.Tensor], float], rows: int, seed: int) -> list[float]:
    return list(bootstrap_ci(statistic, rows, draws=500, seed=seed))


def _bucket_rows(data: Collected) -> dict[str, torch.Tensor]:
    """The row indexes of each area bucket that holds samples, smallest evidence first."""
    labels = [area_bucket(evidence_area(s), data.area_buckets) for s in data.samples]
    return {
        bucket: torch.tensor([i for i, label in enumerate(labels) if label == bucket])
        for bucket in bucket_labels(data.area_buckets)
        if bucket in labels
    }


def rescue_section(data: Collected) -> dict[str, Any]:
    """Rescue: accuracy and KL to the intact answer of each latent view on the corrupted image,
    and the share of the loss the copied latents win back; per area bucket, the number of
    samples, each view's accuracy and the two rescues (whether small evidence is rescued too)."""
    seed = data.seed
    answers = torch.tensor(data.answers)
    intact = data.logp("intact")
    views = {v: data.logp(v) for v in VIEWS if v in data.options}
    correct = {v: (p.argmax(-1) == answers).double() for v, p in views.items()}
    kl = {v: kl_divergence(intact, p).double() for v, p in views.items() if v != "intact"}
    section: dict[str, Any] = {
        "accuracy": {v: float(c.mean()) for v, c in correct.items()},
        "accuracy_ci": {
            v: _ci(lambda i, c=c: float(c[i].mean()), len(c), seed) for v, c in correct.items()
        },
        "kl_to_intact": {v: float(k.mean()) for v, k in kl.items()},
        "kl_to_intact_ci": {
            v: _ci(lambda i, k=k: float(k[i].mean()), len(k), seed) for v, k in kl.items()
        },
    }
    buckets = _bucket_rows(data)
    section["per_bucket"] = {
        bucket: {"n": len(rows), "accuracy": {v: float(c[rows].mean()) for v, c in correct.items()}}
        for bucket, rows in buckets.items()
    }
    if "copied" in views:

        def won_back(i: torch.Tensor) -> float:
            acc = {v: float(correct[v][i].mean()) for v in ("own", "copied", "intact")}
            return rescue(acc["own"], acc["copied"], acc["intact"])

        def kl_won_back(i: torch.Tensor) -> float:
            own, copied = float(kl["own"][i].mean()), float(kl["copied"][i].mean())
            return (own - copied) / own if own > 1e-12 else math.nan

        rows = len(answers)
        section["rescue"] = won_back(torch.arange(rows))
        section["rescue_ci"] = _ci(won_back, rows, seed)
        section["kl_rescue"] = kl_won_back(torch.arange(rows))
        section["kl_rescue_ci"] = _ci(kl_won_back, rows, seed)
        for bucket, indexes in buckets.items():
            section["per_bucket"][bucket] |= {
                "rescue": won_back(indexes),
                "kl_rescue": kl_won_back(indexes),
            }
    return section


def mediation_section(data: Collected) -> dict[str, Any]:
    """Z -> Y: each probe's effect on the answer distribution."""
    seed = data.seed
    answers = torch.tensor(data.answers)
    intact = data.logp("intact")
    base_correct = (intact.argmax(-1) == answers).double()
    section: dict[str, Any] = {}
    for name in PROBES:
        if name not in data.options:
            continue
        moved = data.logp(name)
        kl = kl_divergence(intact, moved).double()
        flips = flip_rate(intact, moved).double()
        drop = base_correct - (moved.argmax(-1) == answers).double()
        section[name] = {
            "kl": float(kl.mean()),
            "kl_ci": _ci(lambda i, k=kl: float(k[i].mean()), len(kl), seed),
            "flip_rate": float(flips.mean()),
            "flip_rate_ci": _ci(lambda i, f=flips: float(f[i].mean()), len(flips), seed),
            "accuracy_drop": float(drop.mean()),
            "accuracy_drop_ci": _ci(lambda i, d=drop: float(d[i].mean()), len(drop), seed),
        }
    if "swap" in section:
        donor = data.logp("donor").argmax(-1)
        follows = (data.logp("swap").argmax(-1) == donor).double()
        agree = (intact.argmax(-1) == donor).double()  # how often the two answers coincide anyway
        section["swap"]["follows_donor"] = float(follows.mean())
        section["swap"]["follows_donor_ci"] = _ci(
            lambda i: float(follows[i].mean()), len(follows), seed
        )
        section["swap"]["agrees_with_donor_anyway"] = float(agree.mean())
    return section


def intervention_section(data: Collected) -> dict[str, Any]:
    """X -> Z: per intervention, per layer (averaged over the latent indexes) relative change
    and centred cosine of the latent states; the image tokens' relative change for scale."""
    base = data.latents("base")  # [L, N, K, D]
    tokens = torch.cat([s.tokens for s in data.states["base"]], dim=1).mean(1)  # [L, D]
    spread = instance_spread(base.transpose(0, 1))  # [L, K]
    image = data.image("base")  # [L, N, D]
    image_spread = instance_spread(image.transpose(0, 1))  # [L]
    section: dict[str, Any] = {}
    for name in INTERVENTIONS:
        if name not in data.states:
            continue
        moved = data.latents(name)
        change = relative_change(base, moved, spread[:, None])  # [L, N, K]
        cosine = centred_cosine(base, moved, tokens[:, None, None])
        image_change = relative_change(image, data.image(name), image_spread[:, None])
        section[name] = {
            "latent_change": change.mean((1, 2)).tolist(),
            "latent_cosine": cosine.mean((1, 2)).tolist(),
            "image_change": image_change.mean(1).tolist(),
        }
    return section


def collapse_section(data: Collected) -> dict[str, Any]:
    """Collapse: per layer, how alike the latent states are across instances and across indexes,
    and their effective rank."""
    base = data.latents("base")  # [L, N, K, D]
    tokens = torch.cat([s.tokens for s in data.states["base"]], dim=1).mean(1)  # [L, D]
    across_instances, across_indexes, rank = [], [], []
    for layer in range(base.shape[0]):
        states, mean = base[layer], tokens[layer]
        across_instances.append(float(mean_pairwise_cosine(states, mean).mean()))
        across_indexes.append(float(mean_pairwise_cosine(states.transpose(0, 1), mean).mean()))
        rank.append(effective_rank(states.flatten(0, 1)))
    return {
        "cosine_across_instances": across_instances,
        "cosine_across_indexes": across_indexes,
        "effective_rank": rank,
        "dimensions": int(base.shape[-1]),
    }


def _labels(samples: Sequence[Sample]) -> dict[str, list]:
    """Probe targets: the answer, and (with scene metadata) image attributes the question does
    not name: how many objects there are, and the first distractor's colour and shape."""
    labels: dict[str, list] = {"answer": [s.answer_text for s in samples]}
    if not all(s.meta.get("objects") for s in samples):
        return labels  # benchmark files: no scene to read attributes from
    labels["objects"] = [len(s.meta["objects"]) for s in samples]
    first = [_first_distractor(s) for s in samples]
    if all(first):
        labels["distractor_colour"] = [d["colour"] for d in first]
        labels["distractor_shape"] = [d["shape"] for d in first]
    return labels


def _first_distractor(sample: Sample) -> dict | None:
    objects, targets = sample.meta["objects"], sample.meta["targets"]
    return objects[len(targets)] if len(objects) > len(targets) else None


def probing_section(data: Collected) -> dict[str, Any]:
    """Probes per target, feature set and layer: hundreds of small independent fits, spread over
    ``torch.get_num_threads()`` worker processes with one BLAS thread each (BLAS threads inside
    one small fit only wait for each other: 40x slower on a busy 2-core machine)."""
    states, blank = data.states["base"], data.states["blank_image"]
    features = {
        "latents": torch.cat([s.latents for s in states], dim=1).mean(2),  # [L, N, D]
        "image": torch.cat([s.image for s in states], dim=1),
        # the question's text follows the image in the prompt, so its states can read the image;
        # the same tokens after a blank image carry only what the question says: the floor
        "question": torch.cat([s.question for s in states], dim=1),
        "question_blank": torch.cat([s.question for s in blank], dim=1),
    }
    jobs = [
        (target, name, layer, values[layer], labels)
        for target, labels in _labels(data.samples).items()
        for name, values in features.items()
        for layer in range(len(values))
    ]
    workers = Parallel(n_jobs=max(1, torch.get_num_threads()))
    with threadpool_limits(1), parallel_config("loky", inner_max_num_threads=1):  # 1 job: here
        results = workers(delayed(probe)(x, labels, seed=data.seed) for *_, x, labels in jobs)
    section: dict[str, Any] = {}
    for (target, name, *_), result in zip(jobs, results, strict=True):
        layers = section.setdefault(target, {}).setdefault(name, [])
        layers.append(result.summary() if result is not None else None)
    return section


#: reads a headline number from a section's output
Reader = Callable[[dict[str, Any]], float]


@dataclass(frozen=True)
class Headline:
    """A number of the comparison table: its key in ``headline``, its column label, what a
    higher value means, and how to read it from its section's output."""

    key: str
    label: str
    meaning: str
    read: Reader


@dataclass(frozen=True)
class Section:
    """A measure of the analysis: ``measure(collected)`` is stored in the report under ``key``;
    with ``needs_latents`` only for runs with a latent block (K > 0)."""

    key: str
    measure: Callable[[Collected], dict[str, Any]]
    needs_latents: bool
    headline: tuple[Headline, ...] = ()


def _at(*keys: str) -> Reader:
    """``section[keys[0]][keys[1]]...``; NaN where a key is absent (that part did not apply)."""

    def read(section: dict[str, Any]) -> float:
        value: Any = section
        for key in keys:
            value = value.get(key, math.nan) if isinstance(value, dict) else math.nan
        return value

    return read


#: the headline key of an area bucket's intact accuracy: this prefix, then the bucket's label
BUCKET_KEY = "accuracy_intact/"


def bucket_headline(bucket: str) -> Headline:
    """The headline number of one area bucket: its intact accuracy (the rescue section's)."""
    return Headline(
        BUCKET_KEY + bucket,
        f"acc {bucket}",
        f"... on samples whose smallest evidence box covers {bucket} of the image",
        _at("per_bucket", bucket, "accuracy", "intact"),
    )


def _last(values: list[float] | None) -> float:
    return values[-1] if values else math.nan


def _last_layer(key: str) -> Reader:
    """A per-layer list's last layer."""
    return lambda section: _last(section.get(key))


def _moved(key: str) -> Reader:
    """The last layer's change under ``answer_changed``, the sharpest intervention (else under
    ``other_image``: no re-rendered scenes)."""
    return lambda section: _last(
        (section.get("answer_changed") or section.get("other_image") or {}).get(key)
    )


def _probe_gain(section: dict[str, Any]) -> float:
    """The best layer's answer-probe accuracy above the majority class."""
    probes = section.get("answer", {}).get("latents") or []
    gains = [p["accuracy"] - p["majority"] for p in probes if p is not None]
    return max(gains) if gains else math.nan


#: every measure, in the order of the report and of the comparison table's rows
SECTIONS: tuple[Section, ...] = (
    Section(
        "rescue",
        rescue_section,
        needs_latents=False,
        headline=(
            Headline("accuracy_intact", "acc intact", "the answer", _at("accuracy", "intact")),
            Headline(
                "rescue",
                "rescue",
                "intact latents win back the accuracy the corruption cost",
                _at("rescue"),
            ),
            Headline(
                "kl_rescue",
                "KL rescue",
                "... the answer distribution the corruption moved",
                _at("kl_rescue"),
            ),
            Headline(
                "kl_own",
                "KL own",
                "corrupted answer far from intact with its own latents",
                _at("kl_to_intact", "own"),
            ),
            Headline(
                "kl_copied",
                "KL copied",
                "... with the intact latents copied in",
                _at("kl_to_intact", "copied"),
            ),
        ),
    ),
    Section(
        "x_to_z",
        intervention_section,
        needs_latents=True,
        headline=(
            Headline(
                "x_to_z",
                "X→Z",
                "latents move when only the answer's evidence changes",
                _moved("latent_change"),
            ),
            Headline(
                "x_to_z_image",
                "X→Z img",
                "the image tokens' own move (scale)",
                _moved("image_change"),
            ),
        ),
    ),
    Section(
        "z_to_y",
        mediation_section,
        needs_latents=True,
        headline=(
            Headline(
                "z_to_y_swap_kl",
                "Z→Y swap KL",
                "the answer moves with another image's latents",
                _at("swap", "kl"),
            ),
            Headline(
                "follows_donor",
                "follows donor",
                "the answer follows the donor image under swap",
                _at("swap", "follows_donor"),
            ),
        ),
    ),
    Section(
        "collapse",
        collapse_section,
        needs_latents=True,
        headline=(
            Headline(
                "collapse",
                "cos inst",
                "latents alike across instances (after removing the mean)",
                _last_layer("cosine_across_instances"),
            ),
            Headline(
                "rank",
                "eff rank",
                "latent states span many directions",
                _last_layer("effective_rank"),
            ),
        ),
    ),
    Section(
        "probing",
        probing_section,
        needs_latents=True,
        headline=(
            Headline(
                "probe_answer",
                "probe ans",
                "the answer is linearly readable from the latents (- majority)",
                _probe_gain,
            ),
        ),
    ),
)
