"""SemanticSegmentorWithTTA: averages resized/flipped predictions, flips undone."""
import torch
import torch.nn.functional as F
from torch import nn

from aff_seg import add_maskformer2_config
from aff_seg.evaluation import SemanticSegmentorWithTTA


class EchoSegmentor(nn.Module):
    """'Scores' = the image's first channel, resized back to the input's height x width."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, batched_inputs):
        outputs = []
        for x in batched_inputs:
            self.calls.append(tuple(x["image"].shape[-2:]))
            scores = F.interpolate(x["image"][None, :1].float(), size=(x["height"], x["width"]), mode="nearest")[0]
            outputs.append({"sem_seg": scores})
        return outputs


def test_tta_undoes_the_flip_and_averages():
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_maskformer2_config(cfg)
    cfg.merge_from_list(["TEST.AUG.MIN_SIZES", "(8, 16)", "TEST.AUG.MAX_SIZE", "64", "TEST.AUG.FLIP", "True"])
    model = EchoSegmentor()
    tta = SemanticSegmentorWithTTA(cfg, model, batch_size=3)
    image = torch.arange(8, dtype=torch.uint8).repeat(3, 8, 1)  # a left-to-right ramp, 8 x 8
    (out,) = tta([{"image": image, "height": 8, "width": 8}])
    assert len(model.calls) == 4  # 2 sizes x (plain, flipped)
    assert sorted(set(model.calls)) == [(8, 8), (16, 16)]
    # a flipped copy that was not flipped back would average the ramp to a constant
    assert torch.equal(out["sem_seg"], image[:1].float())
