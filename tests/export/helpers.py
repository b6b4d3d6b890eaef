"""Assertions and models shared by the export tests."""
import torch

import clusten
from clusten import knn_search

from ..clusten.test_knn import permuted_grid


def assert_same_panoptic_and_instances(ours, eager):
    """The runtime's ``panoptic_seg`` and ``instances`` of one image equal the eager model's:
    identical segments, ids on >= 99.9 % of pixels, same classes, scores within 1e-4, masks on
    >= 99.9 % of pixels, and at least one instance."""
    (ids, segments), (eager_ids, eager_segments) = ours["panoptic_seg"], eager["panoptic_seg"]
    assert segments and segments == eager_segments
    assert (ids == eager_ids).float().mean() >= 0.999
    inst, eager_inst = ours["instances"], eager["instances"]
    assert len(inst) == len(eager_inst) > 0
    assert torch.equal(inst.pred_classes, eager_inst.pred_classes)
    torch.testing.assert_close(inst.scores, eager_inst.scores, atol=1e-4, rtol=0)
    assert (inst.pred_masks == eager_inst.pred_masks).float().mean() >= 0.999


class Searches(torch.nn.Module):
    """A whole search and a pixel-grid search, as the model runs them."""

    def forward(self, query, database, pixels):
        """pixels: ``1 x h x w x 2`` every pixel of an ``h x 8`` grid (h >= 7), any order."""
        h, w = pixels.shape[1:3]
        pixels = pixels.flatten(1, 2)
        on_grid = torch.cat([pixels, query.clamp(0, 6)], 1)
        return (*clusten.knn(query, database, 5, return_dist=True),
                *clusten.knn(on_grid, pixels, 9, return_dist=True, grid_hw=(h, w)))


def exported_searches(monkeypatch, queries_per_step=16):
    """``Searches`` exported with symbolic point counts (torch.export), searching
    ``queries_per_step`` queries per scan step."""
    monkeypatch.setattr(knn_search, "SCAN_QUERIES", queries_per_step)
    g = torch.Generator().manual_seed(6)
    example = (torch.rand(1, 40, 2, generator=g) * 9, torch.rand(1, 30, 2, generator=g) * 9,
               permuted_grid(8, 8, 1, g).view(1, 8, 8, 2))
    dims = {"query": {1: torch.export.Dim("n", min=2)}, "database": {1: torch.export.Dim("m", min=5)},
            "pixels": {1: torch.export.Dim("h", min=7)}}
    program = torch.export.export(Searches(), example, dynamic_shapes=dims, strict=False)
    return program.run_decompositions(clusten.decompositions())


def search_cases():
    """(query, database, pixels) of other sizes: one step, a partial last step, whole steps, duplicates."""
    g = torch.Generator().manual_seed(7)
    for n, m, h in [(3, 5, 7), (16, 40, 9), (61, 23, 12), (64, 64, 8)]:
        yield (torch.randint(0, 9, (1, n, 2), generator=g).float(), torch.randint(0, 9, (1, m, 2), generator=g).float(),
               permuted_grid(h, 8, 1, g).view(1, h, 8, 2))
