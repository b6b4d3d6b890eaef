"""MaskFormer inference: output formats, post-processing checked with detectron2's evaluators
(ground truth given as the model's raw output scores 100), stable top-k, clear errors."""
import contextlib
import io

import pytest
import torch
from torch import nn

from .heads_helpers import (  # noqa: I100  (registers the fake backbone first)
    instance_segments,
    panoptic_segments,
    semantic_segments,
    tiny_cfg,
)

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, SemSegEvaluator
from detectron2.modeling import build_model

from aff_seg.data.datasets import register_standard_datasets
from aff_seg.data.synthetic import make_synthetic_datasets
from aff_seg.modeling.meta_arch import MaskFormer

TINY_DATASET = "aff_seg_heads_test_tiny"
if TINY_DATASET not in MetadataCatalog.list():
    MetadataCatalog.get(TINY_DATASET).set(
        stuff_classes=["a", "b", "c", "d"], thing_classes=["a", "b", "c", "d"],
        thing_dataset_id_to_contiguous_id={3: 2, 4: 3}, stuff_dataset_id_to_contiguous_id={1: 0, 2: 1})


class ScriptedHead(nn.Module):
    """Stands in for MaskFormerHead: returns the outputs it was given."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.outputs = None

    def forward(self, features, release_features=False):
        return self.outputs


class NoBackbone(nn.Module):
    def forward(self, x):
        return {}


def scripted_model(metadata, num_classes, semantic=False, panoptic=False, instance=False, topk=100):
    return MaskFormer(
        backbone=NoBackbone(), sem_seg_head=ScriptedHead(num_classes), criterion=nn.Identity(),
        object_mask_threshold=0.8, overlap_threshold=0.8, metadata=metadata, size_divisibility=32,
        sem_seg_postprocess_before_inference=panoptic or instance, pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0], semantic_on=semantic, panoptic_on=panoptic, instance_on=instance,
        test_topk_per_image=topk).eval()


def outputs_from_segments(masks, classes, num_classes, extra_queries=3):
    """Raw outputs predicting exactly ``masks`` (``T x H x W`` bool) with ``classes``, at the
    padded input size (multiple of 32), plus a few "no object" queries."""
    t, h, w = masks.shape
    hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
    q = t + extra_queries
    logits = torch.full((1, q, num_classes + 1), -20.0)
    logits[0, t:, -1] = 20.0
    logits[0, torch.arange(t), torch.as_tensor(classes, dtype=torch.int64)] = 20.0
    pred = torch.full((1, q, hp, wp), -20.0)
    pred[0, :t, :h, :w] = torch.where(masks, 20.0, -20.0)
    return {"pred_logits": logits, "pred_masks": pred}


def run(model, outputs):
    model.sem_seg_head.outputs = outputs
    h, w = outputs["size"]
    with torch.no_grad():
        return model([{"image": torch.zeros(3, h, w), "height": h, "width": w}])[0]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    make_synthetic_datasets(root, num_train=1, num_val=3, seed=0)
    register_standard_datasets(root)
    return root


def evaluate(evaluator, model, name, to_outputs):
    evaluator.reset()
    with contextlib.redirect_stdout(io.StringIO()):
        for record in DatasetCatalog.get(name):
            masks, classes = to_outputs(record)
            outputs = outputs_from_segments(masks, classes, model.sem_seg_head.num_classes)
            outputs["size"] = tuple(masks.shape[-2:])
            evaluator.process([record], [run(model, outputs)])
        return evaluator.evaluate()


def test_semantic_ground_truth_scores_100_miou(synthetic_root):
    name = "ade20k_sem_seg_val"
    metadata = MetadataCatalog.get(name)
    model = scripted_model(metadata, 150, semantic=True)

    def segments(record):
        return semantic_segments(record, metadata.ignore_label)

    results = evaluate(SemSegEvaluator(name, distributed=False), model, name, segments)
    assert results["sem_seg"]["mIoU"] == pytest.approx(100.0)


def test_instance_ground_truth_scores_100_ap(synthetic_root):
    name = "coco_2017_val"
    model = scripted_model(MetadataCatalog.get(name), 80, instance=True)

    evaluator = COCOEvaluator(name, tasks=("segm",), distributed=False, use_fast_impl=False)
    results = evaluate(evaluator, model, name, instance_segments)
    assert results["segm"]["AP"] == pytest.approx(100.0)


def test_panoptic_ground_truth_scores_100_pq(synthetic_root):
    name = "cityscapes_fine_panoptic_val"
    model = scripted_model(MetadataCatalog.get(name), 19, semantic=True, panoptic=True, instance=True)

    results = evaluate(COCOPanopticEvaluator(name), model, name, panoptic_segments)
    assert results["panoptic_seg"]["PQ"] == pytest.approx(100.0)


def test_instance_topk_is_a_stable_descending_sort():
    model = scripted_model(MetadataCatalog.get(TINY_DATASET), 4, instance=True, topk=6)
    mask_cls = torch.zeros(3, 5)  # every (query, class) pair ties
    mask_cls[2, 1] = 1.0  # except one winner
    mask_pred = torch.randn(3, 8, 8)
    result = model.instance_inference(mask_cls, mask_pred)
    # winner first, then the ties in (query, class) order
    assert result.pred_classes.tolist() == [1, 0, 1, 2, 3, 0]
    for i, query in enumerate([2, 0, 0, 0, 0, 1]):
        assert torch.equal(result.pred_masks[i], (mask_pred[query] > 0).float())
    assert len(result) == 6 and result.pred_boxes.tensor.shape == (6, 4)


def test_output_formats_at_the_requested_size():
    torch.manual_seed(0)
    cfg = tiny_cfg(num_classes=4)
    cfg.DATASETS.TEST = (TINY_DATASET,)
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    cfg.TEST.DETECTIONS_PER_IMAGE = 10
    model = build_model(cfg).eval()
    inputs = [{"image": torch.rand(3, 50, 70) * 255, "height": 100, "width": 140},
              {"image": torch.rand(3, 61, 33) * 255}]
    with torch.no_grad():
        outs = model(inputs)
    assert outs[0]["sem_seg"].shape == (4, 100, 140) and outs[1]["sem_seg"].shape == (4, 61, 33)
    ids, segments = outs[0]["panoptic_seg"]
    assert ids.shape == (100, 140) and ids.dtype == torch.int32 and isinstance(segments, list)
    assert set(ids.unique().tolist()) <= {0} | {s["id"] for s in segments}
    inst = outs[0]["instances"]
    assert inst.image_size == (100, 140)
    assert inst.pred_masks.shape[1:] == (100, 140)
    # panoptic models report things only (classes 2 and 3 here)
    assert set(inst.pred_classes.tolist()) <= {2, 3}
    assert inst.scores.shape == inst.pred_classes.shape == (len(inst),)
    assert inst.pred_boxes.tensor.shape == (len(inst), 4)


def test_empty_image_is_rejected():
    model = build_model(tiny_cfg()).eval()
    with pytest.raises(ValueError, match="non-empty 3 x H x W"):
        model([{"image": torch.zeros(3, 0, 32)}])
    with pytest.raises(ValueError, match="batched_inputs is empty"):
        model([])


def test_class_count_must_match_the_dataset():
    cfg = tiny_cfg(num_classes=4)
    cfg.DATASETS.TRAIN = ("ade20k_sem_seg_train",)
    with pytest.raises(ValueError, match="NUM_CLASSES=4 but dataset 'ade20k_sem_seg_train' has 150 stuff_classes"):
        build_model(cfg)
    cfg.DATASETS.TRAIN = ("coco_2017_train",)
    cfg.INPUT.DATASET_MAPPER_NAME = "coco_instance_lsj"
    with pytest.raises(ValueError, match="has 80 thing_classes"):
        build_model(cfg)
