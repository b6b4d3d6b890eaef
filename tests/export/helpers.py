"""Assertions shared by the export tests."""
import torch


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
