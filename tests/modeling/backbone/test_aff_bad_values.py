"""Adaptive downsampling and the backbone under degenerate values: duplicate positions, tied or
NaN importance scores, and a batch in which one image is non-finite."""
import torch

import aff_seg  # noqa: F401
from aff_seg.modeling.backbone import AFF, AFF_SIZES
from aff_seg.modeling.backbone.merging import ClusterMerging, merge_count, reserve_count


def grid(h, w):
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([xs, ys], -1).reshape(1, h * w, 2).float()


def test_duplicate_positions_never_give_a_zero_stride():
    merging = ClusterMerging(8, 8)
    pos = grid(4, 8)[:, ::2]  # 16 tokens on even x
    pos = torch.cat([pos, pos], 1)  # every position twice: nearest other token at distance 0
    importance = torch.rand(1, 32, 1)
    idx = merging.select(pos, importance, stride=4, reserve_num=reserve_count(4, 8, 4))
    assert idx.shape == (1, merge_count(32, 0.25, reserve_count(4, 8, 4)))
    assert len(set(idx[0].tolist())) == idx.shape[1]


def test_all_equal_scores_keep_each_token_once_and_break_ties_by_index():
    merging = ClusterMerging(8, 8, alpha=4.0)
    h, w = 8, 8
    pos = grid(h, w)
    reserve_num = reserve_count(h, w, 2)
    idx = merging.select(pos, torch.full((1, h * w, 1), 0.5), stride=2, reserve_num=reserve_num)[0]
    assert len(set(idx.tolist())) == len(idx) == merge_count(h * w, 0.25, reserve_num)
    sampled, reserved = idx[: len(idx) - reserve_num], idx[len(idx) - reserve_num:]
    assert ((pos[0, reserved].long() % 4) == 0).all() and (reserved.diff() > 0).all()
    # equal importance: the grid-prior tokens (x, y even) first, each group in ascending index
    on_grid = ((pos[0, sampled].long() % 2) == 0).all(-1)
    assert on_grid.all() and (sampled.diff() > 0).all()


def test_nan_importance_ranks_last_and_reserved_tokens_are_kept_once():
    merging = ClusterMerging(8, 8)
    h, w = 8, 8
    pos = grid(h, w)
    importance = torch.rand(1, h * w, 1)
    importance[0, ::3] = float("nan")
    reserve_num = reserve_count(h, w, 2)
    idx = merging.select(pos, importance, stride=2, reserve_num=reserve_num)[0]
    assert len(set(idx.tolist())) == len(idx)
    sampled = idx[: len(idx) - reserve_num].tolist()
    finite_candidates = [i for i in range(h * w) if i % 3 and not ((pos[0, i].long() % 4) == 0).all()]
    assert all(i % 3 for i in sampled[: min(len(sampled), len(finite_candidates))])


def test_one_non_finite_image_does_not_take_its_batch_companion_down():
    torch.manual_seed(0)
    model = AFF(**AFF_SIZES["mini"]).eval()
    good = torch.randn(1, 3, 64, 96)
    bad = good.clone()
    bad[0, :, 10, 20] = float("nan")
    bad[0, 1, 40, 50] = float("inf")
    with torch.no_grad():
        together = model(torch.cat([good, bad]))
        alone = model(torch.cat([good, good]))
    for i in range(2, 6):
        assert torch.isfinite(together[f"res{i}"][0]).all()
        assert torch.equal(together[f"res{i}_pos"][0], alone[f"res{i}_pos"][0])
        torch.testing.assert_close(together[f"res{i}"][0], alone[f"res{i}"][0], rtol=1e-4, atol=1e-5)
        assert len(set(map(tuple, together[f"res{i}_pos"][1].tolist()))) == together[f"res{i}_pos"].shape[1]


def test_empty_batch_is_refused():
    model = AFF(**AFF_SIZES["mini"]).eval()
    try:
        model(torch.zeros(0, 3, 64, 64))
    except ValueError as e:
        assert "non-empty batch" in str(e)
    else:
        raise AssertionError("an empty batch was accepted")


def test_negative_alpha_is_refused_at_build_time():
    for alpha in (-1.0, float("nan"), float("inf")):
        try:
            AFF(**dict(AFF_SIZES["mini"], alpha=alpha))
        except ValueError as e:
            assert "MODEL.AFF.ALPHA" in str(e)
        else:
            raise AssertionError(f"alpha={alpha} was accepted")
