"""MaskFormer training on a tiny AFF: gradients everywhere, images without annotations, and
overfitting one synthetic batch of each task."""
import time

import pytest
import torch

from .heads_helpers import (  # noqa: I100  (registers the fake backbone first)
    instance_segments,
    instances_from_masks,
    panoptic_segments,
    semantic_segments,
    load_cfg,
    tiny_cfg,
    training_input,
)

from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from aff_seg.data.datasets import register_standard_datasets
from aff_seg.data.synthetic import make_synthetic_datasets


def toy_batch(h=64, w=96):
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, : h // 2] = True
    masks[1, h // 2:, : w // 3] = True
    masks[2, h // 2:, w // 3:] = True
    empty = instances_from_masks(torch.zeros(0, h, w, dtype=torch.bool), [])
    return [
        {"image": torch.rand(3, h, w) * 255, "instances": instances_from_masks(masks, [1, 3, 0])},
        {"image": torch.rand(3, h, w) * 255, "instances": empty},  # an image without annotations
    ]


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(num_classes=4, backbone="aff")).train()
    batch = toy_batch()
    losses = model(batch)
    assert len(losses) == 3 * 4  # final + 3 auxiliary predictions (DEC_LAYERS 4)
    # the deformable attention's offset and weight projections start at 0, which blocks the
    # gradient to their input (level_embed) at initialisation only: take one step first
    sum(losses.values()).backward()
    torch.optim.SGD(model.parameters(), lr=1e-3).step()
    model.zero_grad()
    sum(model(batch).values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_end_to_end_ade_mini_config():
    """The shipped ADE20K AFF-Mini config (real backbone, full head) trains and infers on a tiny image."""
    torch.manual_seed(0)
    cfg = load_cfg("ade20k/semantic-segmentation/aff/maskformer2_aff_mini_bs32_80k.yaml",
                   "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "1024")
    model = build_model(cfg).train()
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, :, :40], masks[1, :, 40:] = True, True
    losses = model([{"image": torch.rand(3, 64, 64) * 255, "instances": instances_from_masks(masks, [7, 149])}])
    assert len(losses) == 30 and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.sem_seg_head.predictor.query_feat.weight.grad.abs().sum() > 0
    assert model.backbone.patch_embed.proj1.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 50, 60) * 255, "height": 25, "width": 30}])
    assert out[0]["sem_seg"].shape == (150, 25, 30)


def test_batch_without_any_annotation():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(num_classes=4)).train()
    batch = toy_batch()[1:] * 2
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0 and losses["loss_ce"] > 0
    sum(losses.values()).backward()  # only the "no object" classification is supervised


def test_training_needs_instances():
    model = build_model(tiny_cfg()).train()
    with pytest.raises(ValueError, match="needs 'instances'"):
        model([{"image": torch.rand(3, 32, 32)}])


def test_out_of_range_target_is_rejected():
    model = build_model(tiny_cfg(num_classes=4)).train()
    batch = toy_batch()
    batch[0]["instances"].gt_classes[1] = 4
    with pytest.raises(ValueError, match=r"class ids \[0, 1, 4\] outside \[0, 4\)"):
        model(batch)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    make_synthetic_datasets(root, num_train=2, num_val=0, seed=0)
    register_standard_datasets(root)
    return root


TASKS = {
    # task: (dataset, segments, classes)
    "semantic": ("ade20k_sem_seg_train", semantic_segments, 150),
    "instance": ("coco_2017_train", instance_segments, 80),
    "panoptic": ("cityscapes_fine_panoptic_train", panoptic_segments, 19),
}


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_overfit_one_batch(synthetic_root, task, capsys):
    name, segments, num_classes = TASKS[task]
    batch = [training_input(r, segments, size=(64, 96)) for r in DatasetCatalog.get(name)[:2]]
    assert all(len(x["instances"]) > 0 for x in batch)
    torch.manual_seed(0)
    cfg = tiny_cfg(num_classes=num_classes, backbone="aff", queries=16, dec_layers=3, enc_layers=1, points=512)
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start, loss, t0 = None, None, time.time()
    for step in range(100):
        loss = sum(model(batch).values())
        start = loss.item() if start is None else start
        if loss.item() < start / 3:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with capsys.disabled():
        print(f"\n[overfit {task}] loss {start:.2f} -> {loss.item():.2f} in {step} steps, {time.time() - t0:.1f} s")
    assert loss.item() < start / 3
