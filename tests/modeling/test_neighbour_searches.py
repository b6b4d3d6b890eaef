"""Each distinct nearest-neighbour search runs once per forward.

The decoders read several quantities off the same two point sets (the transformer decoder's
attention masks of one level in every third layer, the pixel decoder's sampling lookup and its
FPN interpolation); the search between two point sets is done once and reused.
"""
import os

import pytest
import torch

import aff_seg
import clusten
from detectron2.config import get_cfg
from detectron2.modeling import build_model

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "synthetic", "ade20k_semantic.yaml")


def _point_set(points):
    """A point set as a hashable value: its sorted rows (a permutation is the same set)."""
    rows = sorted(map(tuple, points.reshape(-1, points.shape[-1]).tolist()))
    return tuple(rows)


@pytest.fixture
def searches(monkeypatch):
    """Records (query set, database set) of every ``clusten.knn`` call."""
    calls = []
    knn = clusten.knn

    def counting_knn(query, database, k, *args, **kwargs):
        calls.append((_point_set(query[0]), _point_set(database[0])))
        return knn(query, database, k, *args, **kwargs)

    monkeypatch.setattr(clusten, "knn", counting_knn)
    return calls


def test_each_point_set_pair_searched_once(searches):
    cfg = get_cfg()
    aff_seg.add_maskformer2_config(cfg)
    cfg.merge_from_file(CONFIG)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model([{"image": torch.randint(0, 255, (3, 256, 224), dtype=torch.uint8), "height": 256, "width": 224}])

    assert searches, "the model ran no neighbour search"
    repeated = len(searches) - len(set(searches))
    assert repeated == 0, f"{repeated} of {len(searches)} searches repeat an earlier (query, database) pair"
    # backbone: 4 cluster neighbourhoods + 2 token spacings; pixel decoder: 3 sampling lookups
    # + the PointConv neighbourhood; transformer decoder: one per level, whatever its depth
    # (with the published 9 decoder layers this was 21 searches)
    assert len(searches) == 13
