"""Inference runs token-wise work a chunk of tokens at a time (bounded memory), with the same result."""
import os

import pytest
import torch

import aff_seg
from aff_seg.modeling import point_utils
from aff_seg.modeling.point_utils import inference_chunks, over_token_chunks
from detectron2.config import get_cfg
from detectron2.modeling import build_model

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "synthetic", "ade20k_semantic.yaml")


def test_chunks_only_without_autograd(monkeypatch):
    monkeypatch.setattr(point_utils, "INFERENCE_CHUNK", 4)
    x = torch.randn(2, 10, 3, requires_grad=True)
    assert inference_chunks(10) == [slice(0, 10)]  # autograd on: one piece
    with torch.no_grad():
        assert inference_chunks(10) == [slice(0, 4), slice(4, 8), slice(8, 10)]
        assert inference_chunks(4) == [slice(0, 4)]
        calls = []

        def row_sum(a, b):
            calls.append(a.shape[1])
            return a.cumsum(-1) + (0 if b is None else b)

        out = over_token_chunks(row_sum, 10, x, None)
        assert calls == [4, 4, 2]
        assert torch.equal(out, x.cumsum(-1))


def _semantic_model():
    cfg = get_cfg()
    aff_seg.add_maskformer2_config(cfg)
    cfg.merge_from_file(CONFIG)
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_chunked_inference_equals_whole(monkeypatch):
    """The whole model (backbone blocks and neighbourhood features, deformable encoder, pixel
    decoder's res2 level, PointConv, the transformer decoder's mask logits) in chunks of 100
    tokens gives bit-identical scores."""
    torch.manual_seed(1)
    image = torch.randint(0, 255, (3, 256, 224), dtype=torch.uint8)
    model = _semantic_model()
    with torch.no_grad():
        whole = model([{"image": image}])[0]["sem_seg"]

    chunked_sizes = []
    chunks = point_utils.inference_chunks

    def recording_chunks(n):
        pieces = chunks(n)
        if len(pieces) > 1:
            chunked_sizes.append(n)
        return pieces

    monkeypatch.setattr(point_utils, "INFERENCE_CHUNK", 100)
    monkeypatch.setattr(point_utils, "inference_chunks", recording_chunks)
    with torch.no_grad():
        chunked = model([{"image": image}])[0]["sem_seg"]
    n_grid = (256 // 4) * (224 // 4)  # stage-1 tokens = res2 tokens
    # stage 1's neighbourhood features and blocks, the res2 level (adapter + mask features) and
    # the stage-1 merging PointConv, the encoder's queries and feed-forward, and the mask logits
    # of each of the decoder's 4 predictions (before the first layer and after each of its 3)
    assert chunked_sizes.count(n_grid) >= 8, chunked_sizes
    assert len(set(chunked_sizes)) >= 4, chunked_sizes
    assert torch.equal(chunked, whole)
