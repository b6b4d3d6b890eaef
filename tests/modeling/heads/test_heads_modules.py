"""Unit tests of the pixel decoder, the transformer decoder, the matcher and the criterion."""
import math

import pytest
import torch

from .heads_helpers import FakeTokenBackbone  # noqa: I100  (registers the fake backbone first)

from aff_seg.modeling.criterion import SetCriterion
from aff_seg.modeling.matcher import HungarianMatcher
from aff_seg.modeling.pixel_decoder.msdeformattn_pc import MSDeformAttnPc, MSDeformAttnPixelDecoderPc
from aff_seg.modeling import point_utils
from aff_seg.modeling.point_utils import grid_positions
from aff_seg.modeling.point_utils import points_to_canvas, shepard_neighbours
from aff_seg.modeling.transformer_decoder import MultiScaleMaskedTransformerDecoderPc, PointPositionEmbeddingSine


def test_position_encoding_layout():
    pos = torch.tensor([[[3.0, 1.0], [6.0, 4.0]], [[0.0, 8.0], [2.0, 0.0]]])  # image 1: max x 2, y 8
    pe = PointPositionEmbeddingSine(16)(pos)
    assert pe.shape == (2, 2, 32)
    x, y = 2.0 / (2 + 1e-6) * 2 * math.pi, 8.0 / (8 + 1e-6) * 2 * math.pi  # token (1, 1): x=2 / y=0; (1, 0) y=8
    # each image by its own maxima: the same encoding alone as in the batch
    torch.testing.assert_close(PointPositionEmbeddingSine(16)(pos[1:]), pe[1:], rtol=0, atol=0)
    freq = torch.tensor([10000 ** (-2 * j / 16) for j in range(8)], dtype=torch.float64)
    torch.testing.assert_close(pe[1, 1, :8].double(), (x * freq).sin(), atol=1e-5, rtol=0)  # sin x first
    torch.testing.assert_close(pe[1, 1, 8:16].double(), (x * freq).cos(), atol=1e-5, rtol=0)  # then cos x
    torch.testing.assert_close(pe[1, 0, 16:24].double(), (y * freq).sin(), atol=1e-5, rtol=0)  # then y
    torch.testing.assert_close(pe[1, 0, 24:].double(), (y * freq).cos(), atol=1e-5, rtol=0)


def test_sampling_offset_init():
    attn = MSDeformAttnPc(d_model=32, n_levels=3, n_heads=8, n_points=4)
    bias = attn.sampling_offsets.bias.view(8, 3, 4, 2)
    assert torch.equal(bias[0, 1, 2], torch.tensor([3.0, 0.0]))  # head 0 points along +x, point 2 -> 3 units
    assert torch.allclose(bias[1, 0, 0], torch.tensor([1.0, 1.0]))  # 45 degrees onto the unit square
    assert torch.allclose(bias[6, 2, 1], torch.tensor([0.0, -2.0]), atol=1e-6)
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.sampling_offsets.weight.abs().sum() == 0


def reference_deform_attn(attn, queries, poss, values, grid_hw):
    """MSDeformAttnPc written out per query, head, level and point (batch 1, float64)."""
    h, w = grid_hw
    nh, nl, nk = attn.n_heads, attn.n_levels, attn.n_points
    c = queries[0].shape[-1]
    value = attn.value_proj(torch.cat(values, 1))[0].view(-1, nh, c // nh)
    starts = [0, values[0].shape[1], values[0].shape[1] + values[1].shape[1]]
    grid = grid_positions(h, w, 1, "cpu")[0]
    outs = []
    for q, pos in zip(queries, poss):
        off = attn.sampling_offsets(q)[0].view(-1, nh, nl, nk, 2)
        a = attn.attention_weights(q)[0].view(-1, nh, nl * nk).softmax(-1).view(-1, nh, nl, nk)
        out = torch.zeros(q.shape[1], nh, c // nh, dtype=q.dtype)
        for i in range(q.shape[1]):
            for hd in range(nh):
                for lv in range(nl):
                    lvl_pos = poss[lv][0].double()
                    for k in range(nk):
                        loc = pos[0, i].double() + off[i, hd, lv, k]
                        px = min(max(int(torch.round(loc[0])), 0), w - 1)
                        py = min(max(int(torch.round(loc[1])), 0), h - 1)
                        d2 = (lvl_pos - grid[py * w + px].double()).pow(2).sum(-1)
                        cand = torch.sort(d2, stable=True)[1][:4]
                        u = 1.0 / ((loc - lvl_pos[cand]).pow(2).sum(-1).pow(float(attn.shepard_power)) + 1e-11)
                        sample = (u / u.sum()) @ value[starts[lv] + cand, hd]
                        out[i, hd] += a[i, hd, lv, k] * sample
        outs.append(attn.output_proj(out.reshape(1, -1, c)))
    return outs


def test_deformable_attention_matches_reference():
    torch.manual_seed(0)
    h, w = 6, 7
    attn = MSDeformAttnPc(d_model=8, n_levels=3, n_heads=2, n_points=2, shepard_power=3.0,
                          shepard_power_learnable=False).double()
    with torch.no_grad():  # random offsets and attention, so the test is not the init pattern
        attn.sampling_offsets.weight.normal_(0, 1.0)
        attn.attention_weights.weight.normal_(0, 1.0)
    perm = torch.randperm(h * w)
    poss = [grid_positions(h, w, 1, "cpu")[:, perm[:n]].double() for n in (3, 6, 11)]
    queries = [torch.randn(1, p.shape[1], 8, dtype=torch.float64) for p in poss]
    values = [torch.randn(1, p.shape[1], 8, dtype=torch.float64) for p in poss]
    grid = grid_positions(h, w, 1, "cpu").double()
    nb_idx = [torch.cdist(grid, p).sort(dim=-1, stable=True)[1][..., :4] for p in poss]
    table = MSDeformAttnPc.candidate_table(poss, nb_idx)
    got = attn(torch.cat(queries, 1), poss, torch.cat(values, 1), table, (h, w)).split([p.shape[1] for p in poss], 1)
    want = reference_deform_attn(attn, queries, poss, values, (h, w))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r.to(g.dtype), atol=1e-6, rtol=1e-6)


def test_deformable_attention_query_pos_added_per_chunk(monkeypatch):
    """``query_pos`` (added a chunk of queries at a time in inference) gives exactly the
    attention of the summed queries."""
    monkeypatch.setattr(point_utils, "INFERENCE_CHUNK", 5)
    torch.manual_seed(0)
    h, w = 6, 7
    attn = MSDeformAttnPc(d_model=8, n_levels=3, n_heads=2, n_points=2)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 1.0)
        attn.attention_weights.weight.normal_(0, 1.0)
    poss = [grid_positions(h, w, 1, "cpu")[:, torch.randperm(h * w)[:n]] for n in (3, 6, 11)]
    nb_idx = [torch.cdist(grid_positions(h, w, 1, "cpu"), p).sort(dim=-1, stable=True)[1][..., :4] for p in poss]
    table = MSDeformAttnPc.candidate_table(poss, nb_idx)
    query, query_pos, value = torch.randn(3, 1, 20, 8).unbind()
    with torch.no_grad():
        assert len(point_utils.inference_chunks(20)) == 4
        got = attn(query, poss, value, table, (h, w), query_pos=query_pos)
        want = attn(query + query_pos, poss, value, table, (h, w))
    assert torch.equal(got, want)


def test_deformable_attention_gradients_reach_offsets_and_power():
    torch.manual_seed(0)
    h, w = 5, 5
    attn = MSDeformAttnPc(d_model=8, n_levels=3, n_heads=2, n_points=2, shepard_power=3.0)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.5)
    poss = [grid_positions(h, w, 1, "cpu")[:, torch.randperm(h * w)[:n]] for n in (2, 5, 9)]
    feats = [torch.randn(1, p.shape[1], 8) for p in poss]
    nb_idx = [torch.cdist(grid_positions(h, w, 1, "cpu"), p).sort(dim=-1, stable=True)[1][..., :4] for p in poss]
    feats = torch.cat(feats, 1)
    attn(feats, poss, feats, MSDeformAttnPc.candidate_table(poss, nb_idx), (h, w)).square().sum().backward()
    assert attn.shepard_power.grad is not None and attn.shepard_power.grad.abs() > 0
    assert attn.sampling_offsets.weight.grad.abs().sum() > 0


def small_decoder(num_classes=3, queries=5, dim=32, layers=4):
    return MultiScaleMaskedTransformerDecoderPc(
        dim, num_classes=num_classes, hidden_dim=dim, num_queries=queries, nheads=4, dim_feedforward=64,
        dec_layers=layers, pre_norm=False, mask_dim=dim, enforce_input_project=False)


def fake_features(b=2, hw=(24, 40), channels=(16, 24, 32, 40)):
    backbone = FakeTokenBackbone(channels)
    return backbone(torch.rand(b, 3, 4 * hw[0], 4 * hw[1]))


def test_pixel_decoder_outputs():
    torch.manual_seed(0)
    feats = fake_features()
    shapes = FakeTokenBackbone().output_shape()
    decoder = MSDeformAttnPixelDecoderPc(
        shapes, transformer_dropout=0.0, transformer_nheads=4, transformer_dim_feedforward=64,
        transformer_enc_layers=2, conv_dim=32, mask_dim=24, transformer_in_features=["res3", "res4", "res5"],
        common_stride=4, shepard_power=3.0, shepard_power_learnable=True)
    mask_features, mf_pos, res5_out, ms_feats, ms_poss = decoder.forward_features(feats)
    assert mask_features.shape == (2, 24 * 40, 24)
    assert torch.equal(mf_pos, feats["res2_pos"])
    assert [f.shape[1] for f in ms_feats] == [feats[f"res{i}"].shape[1] for i in (5, 4, 3)]
    assert res5_out is ms_feats[0]
    assert all(torch.equal(p, feats[f"res{i}_pos"]) for p, i in zip(ms_poss, (5, 4, 3)))

    # release_features: the same outputs; the feature tensors leave the dict, positions stay
    given = dict(feats)
    released = decoder.forward_features(given, release_features=True)
    assert not any(f"res{i}" in given for i in (2, 3, 4, 5))
    assert all(f"res{i}_pos" in given for i in (2, 3, 4, 5))
    assert torch.equal(released[0], mask_features)
    assert all(torch.equal(a, b) for a, b in zip(released[3], ms_feats))


def test_transformer_decoder_outputs_and_point_sampled_attention_mask():
    torch.manual_seed(0)
    b, (h, w), dim = 2, (6, 10), 32
    feats = fake_features(b, (h, w), channels=(dim, dim, dim, dim))
    levels = [feats[f"res{i}"] for i in (5, 4, 3)]
    poss = [feats[f"res{i}_pos"] for i in (5, 4, 3)]
    decoder = small_decoder(dim=dim)
    mask_features = torch.randn(b, h * w, dim)
    out = decoder(levels, poss, mask_features, feats["res2_pos"], (h, w))
    assert out["pred_logits"].shape == (b, 5, 4)
    assert out["pred_masks"].shape == (b, 5, h, w)
    assert len(out["aux_outputs"]) == 4
    assert all(a["pred_masks"].shape == (b, 5, h, w) for a in out["aux_outputs"])
    # inference needs the last prediction only: no auxiliary canvases, the same final outputs
    eval_out = decoder.eval()(levels, poss, mask_features, feats["res2_pos"], (h, w))
    decoder.train()
    assert eval_out["aux_outputs"] == []
    assert torch.equal(eval_out["pred_masks"], out["pred_masks"])
    assert torch.equal(eval_out["pred_logits"], out["pred_logits"])

    # the masks are the token logits scattered onto the canvas, and a level token's attention
    # mask is its own pixel's logit < 0 (the level tokens are res2 tokens)
    output = decoder.query_feat.weight.unsqueeze(1).repeat(1, b, 1)
    neighbours = shepard_neighbours(poss[1], feats["res2_pos"], k=4, power=3.0)
    cls, masks, level_prob = decoder.forward_prediction_heads(output, mask_features, feats["res2_pos"], neighbours,
                                                              (h, w))
    attn_mask = decoder.attention_mask(level_prob)
    tokens = decoder.mask_embed(decoder.decoder_norm(output).transpose(0, 1)) @ mask_features.transpose(1, 2)
    pos2 = feats["res2_pos"].long()
    torch.testing.assert_close(masks[0, :, pos2[0, 7, 1], pos2[0, 7, 0]], tokens[0, :, 7])
    level_pos = poss[1].long()
    dense = masks[torch.arange(b)[:, None], :, level_pos[..., 1], level_pos[..., 0]]  # b x n_l x Q
    expected = (dense.transpose(1, 2) < 0).repeat_interleave(4, dim=0)
    assert torch.equal(attn_mask, expected)


def test_one_image_attention_mask_is_shared_by_the_heads(monkeypatch):
    """With one image the attention mask is ``Q x n_l`` (applied to every head): the same outputs
    as the ``heads x Q x n_l`` mask, bit for bit, in the decoder and in ``attend`` (weights too)."""
    torch.manual_seed(0)
    (h, w), dim = (6, 10), 32
    feats = fake_features(1, (h, w), channels=(dim,) * 4)
    args = ([feats[f"res{i}"] for i in (5, 4, 3)], [feats[f"res{i}_pos"] for i in (5, 4, 3)],
            torch.randn(1, h * w, dim), feats["res2_pos"], (h, w))
    decoder = small_decoder(dim=dim).eval()
    level_prob = torch.rand(1, 5, 17)
    assert torch.equal(decoder.attention_mask(level_prob), level_prob[0] < 0.5)
    with torch.no_grad():
        got = decoder(*args)
        monkeypatch.setattr(type(decoder), "attention_mask",
                            lambda self, prob: (prob < 0.5).repeat_interleave(self.num_heads, dim=0))
        want = decoder(*args)
    assert torch.equal(got["pred_logits"], want["pred_logits"]) and torch.equal(got["pred_masks"], want["pred_masks"])

    layer = decoder.transformer_cross_attention_layers[0]
    tgt, query_pos, memory, pos = torch.randn(5, 1, dim), torch.randn(5, 1, dim), torch.randn(17, 1, dim), torch.randn(
        17, 1, dim)
    mask = level_prob[0] < 0.5
    shared = layer.attend(tgt, memory, mask, pos, query_pos)
    per_head = layer.attend(tgt, memory, mask.repeat(4, 1, 1), pos, query_pos)
    assert torch.equal(shared[0], per_head[0]) and torch.equal(shared[1], per_head[1])


def test_transformer_decoder_rejects_partial_canvas():
    feats = fake_features(1, (4, 4), channels=(32,) * 4)
    with pytest.raises(ValueError, match="cover the stride-4 grid"):
        small_decoder()([feats[f"res{i}"] for i in (5, 4, 3)], [feats[f"res{i}_pos"] for i in (5, 4, 3)],
                        feats["res3"], feats["res3_pos"], feats["res2_spatial_shape"])


def test_points_to_canvas_places_values():
    pos = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]])
    canvas = points_to_canvas(torch.arange(4.0).view(1, 4, 1), pos, 2, 2)
    assert torch.equal(canvas[0, 0], torch.tensor([[3.0, 0.0], [1.0, 2.0]]))


def perfect_outputs(masks, labels, num_classes, queries):
    """Logits of a prediction that is the target, placed at queries 2, 0, 3, ..."""
    t = masks.shape[0]
    slots = [2, 0, 3, 1, 4][:t]
    logits = torch.full((1, queries, num_classes + 1), -10.0)
    logits[0, :, -1] = 10.0
    pred = torch.full((1, queries) + masks.shape[-2:], -10.0)
    for s, m, c in zip(slots, masks, labels):
        logits[0, s, c], logits[0, s, -1] = 10.0, -10.0
        pred[0, s] = torch.where(m, 10.0, -10.0)
    return {"pred_logits": logits, "pred_masks": pred}, slots


def test_matcher_finds_the_perfect_assignment():
    torch.manual_seed(0)
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, :8], masks[1, 8:, :8], masks[2, 8:, 8:] = True, True, True
    labels = torch.tensor([1, 0, 1])
    outputs, slots = perfect_outputs(masks, labels, 3, 6)
    matcher = HungarianMatcher(cost_class=2, cost_mask=5, cost_dice=5, num_points=64)
    (q_idx, t_idx), = matcher(outputs, [{"labels": labels, "masks": masks}])
    assert dict(zip(t_idx.tolist(), q_idx.tolist())) == {0: slots[0], 1: slots[1], 2: slots[2]}


def make_criterion(num_classes=3, importance_sample_ratio=0.75):
    matcher = HungarianMatcher(cost_class=2, cost_mask=5, cost_dice=5, num_points=64)
    return SetCriterion(num_classes, matcher, {"loss_ce": 2}, eos_coef=0.1, losses=["labels", "masks"],
                        num_points=256, oversample_ratio=3.0, importance_sample_ratio=importance_sample_ratio)


def test_criterion_losses_small_for_perfect_prediction_and_deep_supervision():
    torch.manual_seed(0)
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, :8], masks[1, 8:] = True, True
    labels = torch.tensor([2, 0])
    good, _ = perfect_outputs(masks, labels, 3, 6)
    bad = {"pred_logits": torch.zeros(1, 6, 4), "pred_masks": torch.zeros(1, 6, 16, 16)}
    criterion = make_criterion(importance_sample_ratio=0.0)  # uniform points: few on the boundary
    targets = [{"labels": labels, "masks": masks}]
    low = criterion(dict(good, aux_outputs=[bad]), targets)
    assert set(low) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}
    assert all(v.dtype == torch.float32 for v in low.values())
    assert low["loss_ce"] < 1e-3 and low["loss_mask"] < 0.3 and low["loss_dice"] < 0.05
    assert low["loss_ce_0"] > 0.5 and low["loss_mask_0"] > 0.6 and low["loss_dice_0"] > 0.3


def test_criterion_handles_images_without_annotations():
    outputs = {"pred_logits": torch.randn(2, 6, 4, requires_grad=True),
               "pred_masks": torch.randn(2, 6, 16, 16, requires_grad=True)}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 16, 16)}
    losses = make_criterion()(outputs, [empty, empty])
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0 and losses["loss_ce"] > 0
    sum(losses.values()).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [3, -1])
def test_criterion_rejects_class_ids_out_of_range(bad):
    outputs = {"pred_logits": torch.randn(1, 6, 4), "pred_masks": torch.randn(1, 6, 8, 8)}
    target = {"labels": torch.tensor([0, bad]), "masks": torch.zeros(2, 8, 8)}
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        make_criterion()(outputs, [target])
