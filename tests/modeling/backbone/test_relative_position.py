"""The relative-position bias and PointConv weights: exact for any offset, identical to the
original's table inside its range, and computed only for the offsets in use, once per stage."""
import pytest
import torch

import aff_seg  # noqa: F401
from aff_seg.modeling import point_utils
from aff_seg.modeling.backbone import AFF, AFF_SIZES, aff as aff_module

R = 2048 // 4 - 1  # the original's table: offsets in [-511, 511]^2, 1023^2 rows
T = 2 * R + 1


@pytest.fixture(scope="module")
def original_table():
    """The original's module-global lookup table, built as it builds it (row index (dy+R)*T + dx+R)."""
    hs = torch.arange(T).float() - R
    ys, xs = torch.meshgrid(hs, hs, indexing="ij")
    dist = (ys ** 2 + xs ** 2) ** 0.5
    table = torch.stack([xs, ys, dist, ys / dist, xs / dist], dim=2)
    table[table.isnan() | table.isinf()] = 0
    return table.reshape(-1, 5)


def original_index(offset):
    rel = (offset + R).clamp(0, T - 1).long()
    return rel[..., 1] * T + rel[..., 0]


def test_features_equal_the_original_table_inside_its_range(original_table):
    g = torch.Generator().manual_seed(0)
    offset = torch.randint(-R, R + 1, (20000, 2), generator=g).float()
    offset[:5] = torch.tensor([[0, 0], [R, R], [-R, -R], [R, -R], [0, 7]]).float()
    assert torch.equal(point_utils.relative_position_features(offset), original_table[original_index(offset)])


def test_bias_is_exact_beyond_the_original_2048_pixel_limit(original_table):
    offset = torch.tensor([[600.0, 0.0], [-3000.0, 4000.0]])
    feats = point_utils.relative_position_features(offset)
    torch.testing.assert_close(feats[1], torch.tensor([-3000.0, 4000.0, 5000.0, 0.8, -0.6]))
    assert feats[0, 0] == 600  # the original clamps this offset to 511
    assert original_table[original_index(offset)][0, 0] == R


def test_stage_bias_equals_the_original_table_lookup(original_table):
    """A real stage's per-block bias equals pos_embed(table)[pe_idx], the original's computation."""
    torch.manual_seed(0)
    model = AFF(**AFF_SIZES["mini"]).eval()
    stage = model.layers[0]
    ys, xs = torch.meshgrid(torch.arange(20), torch.arange(24), indexing="ij")
    pos = torch.stack([xs, ys], -1).reshape(1, -1, 2).float()
    order, nbhd_idx, valid, rel_features = stage.neighbourhoods(pos, 20, 24, on_grid=True)
    pos = pos[:, order[0]]
    offset = point_utils.gather_points(pos, nbhd_idx) - pos.unsqueeze(2)
    pe_idx = original_index(offset)
    for block in stage.blocks:
        with torch.no_grad():
            ours = block.attn.pos_embed(rel_features)
            theirs = block.attn.pos_embed(original_table)[pe_idx]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_no_whole_table_evaluation_and_features_once_per_stage(monkeypatch):
    """Position MLPs see only the used offsets; offset features are computed once per stage."""
    model = AFF(**AFF_SIZES["mini"]).eval()
    rows = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.in_features == 5:  # pos_embed, weight_net.0
            module.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].numel() // 5))
    calls = []
    original = aff_module.relative_position_features

    def counting(offset):
        calls.append(offset.shape)
        return original(offset)

    monkeypatch.setattr(aff_module, "relative_position_features", counting)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert len(calls) == 4  # one per stage, shared by its 2/2/6/2 blocks
    assert calls[0] == (1, 256, 48, 2)  # stage 1: the grid, computed for one image
    assert len(rows) == 12 + 3  # 12 blocks' pos_embed + 3 merges' weight_net
    assert max(rows) <= 2 * 256 * 48 < T * T
