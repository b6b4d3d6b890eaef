"""FASeg's decoder pieces (schedule, DFPQ, complement pooling, top cells) and its point-cloud
variant on AFF tokens."""
import pytest
import torch

from .heads_helpers import tiny_cfg  # noqa: I100  (registers the fake backbone first)
from .test_heads_training import toy_batch

from detectron2.modeling import build_model

from aff_seg.modeling.transformer_decoder.faseg import (
    HR,
    layer_schedule,
    pooled_positional_queries,
    positional_queries,
    top_cells,
)


def faseg_cfg(dec_layers=6, **faseg):
    cfg = tiny_cfg(dec_layers=dec_layers)
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoderFASeg"
    for key, value in faseg.items():
        cfg.MODEL.MASK_FORMER.FASEG[key] = value
    return cfg


def test_layer_schedule():
    assert layer_schedule(13, 4) == [0, 1, 2, HR, 0, 1, 2, HR, 0, 1, 2, HR, 0]
    assert layer_schedule(9, 0) == [0, 1, 2] * 3  # no HR layer: Mask2Former's round robin
    assert layer_schedule(7, 3) == [0, 1, HR, 2, 0, HR, 1]


def test_dfpq_batched_equals_broadcast_form():
    torch.manual_seed(0)
    b, q, n, c = 2, 5, 7, 6
    adapt = torch.nn.Sequential(torch.nn.Linear(c, c), torch.nn.ReLU(), torch.nn.Linear(c, c))
    static = torch.randn(q, b, c)
    weights = torch.rand(b, q, n).softmax(-1)
    pos = torch.randn(n, b, c)  # the original's layout of the key encodings
    # the original: (Q x n x b x 1) * (1 x n x b x c), summed over n
    broadcast = (weights.permute(1, 2, 0).unsqueeze(-1) * pos.unsqueeze(0)).sum(1)
    expected = adapt(static + broadcast)
    torch.testing.assert_close(positional_queries(adapt, static, weights, pos.transpose(0, 1)), expected)


@pytest.mark.parametrize("complement", [True, False])
def test_first_queries_pool_the_complement_of_the_mask(complement):
    b, q, n, c = 1, 3, 4, 2
    prob = torch.tensor([[[0.9, 0.2, 0.6, 0.1], [0.7, 0.8, 0.9, 0.95], [0.1, 0.2, 0.3, 0.4]]])
    pos = torch.arange(n * c, dtype=torch.float32).reshape(1, n, c)
    out = pooled_positional_queries(torch.nn.Identity(), torch.zeros(q, b, c), prob, pos, 0.5, complement)
    region = (prob < 0.5) if complement else (prob >= 0.5)
    for i in range(q):
        chosen = pos[0, region[0, i]]
        mean = chosen.sum(0) / (len(chosen) + 1e-6)  # an empty region gives 0
        torch.testing.assert_close(out[i, 0], mean)


def test_top_cells_at_least_one():
    weights = torch.zeros(2, 3, 70)
    weights[0, :, 5] = 1.0
    weights[0, 1, 9] = 0.5
    weights[1, :, 60] = 2.0
    top = top_cells(weights, 32)
    assert top.shape == (2, 2) and top[0].tolist() == [5, 9] and top[1, 0] == 60
    assert top_cells(weights[:, :, :20], 32).shape == (2, 1)  # the original takes 20 // 32 = 0 cells


def test_point_cloud_decoder_trains_with_hr_layers(monkeypatch):
    torch.manual_seed(0)
    model = build_model(faseg_cfg(dec_layers=6, OMEGA_RATE=2)).train()
    predictor = model.sem_seg_head.predictor
    assert predictor.schedule == [0, 1, 2, HR, 0]
    assert predictor.level_embed.weight.shape[0] == 4 and predictor.attn_mask_threshold == 0.15
    calls = []
    attend = type(predictor.transformer_cross_attention_layers[0]).attend

    def spy(layer, tgt, memory, memory_mask, pos, query_pos, need_weights=True):
        calls.append((memory.shape[0], memory_mask is None, query_pos))
        return attend(layer, tgt, memory, memory_mask, pos, query_pos, need_weights)

    monkeypatch.setattr(type(predictor.transformer_cross_attention_layers[0]), "attend", spy)
    batch = toy_batch()  # 64 x 96: 384 res2 tokens, 6 res5 tokens (fake backbone, quarter each level)
    losses = model(batch)
    assert len(losses) == 3 * 6
    static = predictor.query_embed.weight
    # HR layer: 6 // 2 = 3 cells of 64 res2 tokens, no mask, the static queries
    assert calls[3][:2] == (3 * 64, True) and torch.equal(calls[3][2][:, 0], static)
    assert all(not c[1] and not torch.equal(c[2][:, 0], static) for i, c in enumerate(calls) if i != 3)
    assert [c[0] for c in calls if not c[1]] == [6, 24, 96, 6]
    sum(losses.values()).backward()
    assert predictor.adapt_pos2d[0].weight.grad.abs().sum() > 0
    assert predictor.level_embed.weight.grad[HR].abs().sum() > 0


def test_point_cloud_decoder_bad_settings():
    cfg = faseg_cfg()
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 32
    with pytest.raises(ValueError, match="MASK_DIM"):
        build_model(cfg)
    with pytest.raises(ValueError, match="FASEG.HR_EVERY"):
        build_model(faseg_cfg(HR_EVERY=1))
    with pytest.raises(ValueError, match="FASEG.ATTN_MASK_THRESHOLD"):
        build_model(faseg_cfg(ATTN_MASK_THRESHOLD=1.5))
