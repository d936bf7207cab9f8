"""The packed two-path sequence: its mask and positions equal the two separate paths'."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crystalkit.crystal.packing import (
    CORRUPTED_PATH,
    INTACT_PATH,
    Segment,
    check_segments,
    packed_allowed,
    packed_positions,
)

S = Segment


def _row(pad, a, bc, d, ef):
    return (
        [S.PAD] * pad
        + [S.PREFIX] * a
        + [S.CORRUPTED] * bc
        + [S.INTACT] * bc
        + [S.LATENT] * d
        + [S.ANSWER_INTACT] * ef
        + [S.ANSWER_CORRUPTED] * ef
    )


lengths = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(0, 4), st.integers(1, 3))


@settings(max_examples=60, deadline=None)
@given(st.lists(lengths, min_size=1, max_size=3))
def test_packed_mask_and_positions_equal_the_separate_paths(rows):
    width = max(a + 2 * bc + d + 2 * ef for a, bc, d, ef in rows)
    segments = torch.tensor(
        [_row(width - (a + 2 * bc + d + 2 * ef), a, bc, d, ef) for a, bc, d, ef in rows]
    )
    check_segments(segments)
    allowed, positions = packed_allowed(segments), packed_positions(segments)
    for b, labels in enumerate(segments.tolist()):
        intact = [t for t, s in enumerate(labels) if s in INTACT_PATH]
        corrupted = [t for t, s in enumerate(labels) if s in CORRUPTED_PATH]
        for t, label in enumerate(labels):
            if label == S.PAD:
                assert allowed[b, t].nonzero().flatten().tolist() == [t]
                continue
            # A and D are computed once, on the intact side; B and F belong to the corrupted path
            path = corrupted if label in (S.CORRUPTED, S.ANSWER_CORRUPTED) else intact
            visible = path[: path.index(t) + 1]
            assert allowed[b, t].nonzero().flatten().tolist() == visible
            assert positions[b, t] == path.index(t)


def test_the_copy_is_that_f_reads_d_and_never_c():
    segments = torch.tensor([_row(0, 1, 2, 2, 1)])
    allowed = packed_allowed(segments)[0]
    f = segments[0].tolist().index(S.ANSWER_CORRUPTED)
    seen = {S(int(segments[0, k])) for k in allowed[f].nonzero().flatten()}
    assert seen == {S.PREFIX, S.CORRUPTED, S.LATENT, S.ANSWER_CORRUPTED}


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([S.PREFIX, S.INTACT, S.CORRUPTED, S.LATENT, S.ANSWER_INTACT, S.ANSWER_CORRUPTED], "order"),
        ([S.PREFIX, S.CORRUPTED, S.INTACT, S.INTACT, S.ANSWER_INTACT, S.ANSWER_CORRUPTED], "equal"),
        ([S.PREFIX, S.CORRUPTED, S.INTACT, S.PAD, S.INTACT, S.ANSWER_INTACT], "contiguous"),
        ([S.PREFIX, S.LATENT, S.ANSWER_INTACT, S.LATENT_BLANK, S.LATENT_BLANK], "equal lengths"),
    ],
)
def test_malformed_segments_are_rejected(labels, message):
    with pytest.raises(ValueError, match=message):
        check_segments(torch.tensor([labels]))


def _causal(n, dtype):
    from crystalkit.models.masks import additive, causal_allowed

    return additive(causal_allowed(torch.ones(1, n, dtype=torch.long)), dtype)


def test_packed_forward_equals_intact_pass_and_corrupted_pass_reusing_latent_kv(tiny_recipe):
    """The single packed forward vs the two-pass form: intact pass over A C D E, then a corrupted
    pass over A B with D's per-layer keys/values copied from the intact pass, then F."""
    from transformers import DynamicCache

    from crystalkit.models.masks import additive
    from crystalkit.runs.build import build_backbone, build_dataset

    torch.manual_seed(0)
    recipe = tiny_recipe()
    backbone = build_backbone(recipe, build_dataset(recipe)).eval()
    a, bc, d, ef = 2, 5, 3, 2
    labels = torch.tensor([_row(0, a, bc, d, ef)])
    width, dim = labels.shape[1], backbone.config.hidden_size
    embeds = torch.randn(1, width, dim)
    embeds[0, a + bc : a + 2 * bc] = torch.randn(bc, dim)  # C differs from B
    embeds[0, -ef:] = embeds[0, -2 * ef : -ef]  # F carries the same answer tokens as E
    pick = {s: (labels[0] == s).nonzero().flatten() for s in Segment if s != S.PAD}

    with torch.no_grad():
        mask = additive(packed_allowed(labels), embeds.dtype)
        packed = backbone(embeds, mask, packed_positions(labels)).logits[0]

        intact_order = torch.cat([pick[s] for s in INTACT_PATH])
        n = len(intact_order)
        cache = DynamicCache()
        intact = backbone(
            embeds[:, intact_order],
            _causal(n, embeds.dtype),
            torch.arange(n)[None],
            cache,
            use_cache=True,
        )
        latent_kv = [
            (layer.keys[:, :, -(d + ef) : -ef], layer.values[:, :, -(d + ef) : -ef])
            for layer in cache.layers
        ]

        prefix_order = torch.cat([pick[S.PREFIX], pick[S.CORRUPTED]])
        m = len(prefix_order)
        corrupted_cache = DynamicCache()
        backbone(
            embeds[:, prefix_order],
            _causal(m, embeds.dtype),
            torch.arange(m)[None],
            corrupted_cache,
            use_cache=True,
        )
        copied = DynamicCache()
        for i, layer in enumerate(corrupted_cache.layers):
            keys, values = latent_kv[i]
            copied.update(torch.cat([layer.keys, keys], 2), torch.cat([layer.values, values], 2), i)
        total = m + d + ef
        f_mask = additive(torch.ones(1, ef, total, dtype=torch.bool).tril(m + d), embeds.dtype)
        f_positions = torch.arange(m + d, total)[None]
        corrupted = backbone(
            embeds[:, pick[S.ANSWER_CORRUPTED]], f_mask, f_positions, copied, use_cache=True
        )

    torch.testing.assert_close(packed[intact_order], intact.logits[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        packed[pick[S.ANSWER_CORRUPTED]], corrupted.logits[0], atol=1e-5, rtol=1e-4
    )
    # and the copy matters: F's logits differ from the intact answer's because B differs from C
    assert not torch.allclose(
        packed[pick[S.ANSWER_CORRUPTED]], packed[pick[S.ANSWER_INTACT]], atol=1e-4
    )
