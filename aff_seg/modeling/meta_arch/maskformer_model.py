"""The MaskFormer meta-architecture: AFF backbone + MaskFormerHead, set losses in training and
semantic / panoptic / instance post-processing in inference (upstream Mask2Former's)."""
from typing import Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.modeling.backbone import Backbone
from detectron2.structures import ImageList
from detectron2.utils.memory import retry_if_cuda_oom

from ...data.dataset_mappers import label_classes
from ...export.runtime import instance_inference, panoptic_inference, postprocess, semantic_inference
from ..criterion import SetCriterion
from ..image_rng import image_generators
from ..matcher import HungarianMatcher
from .validation import check_batched_inputs, check_model_config

__all__ = ["MaskFormer", "check_num_classes"]


def check_num_classes(num_classes, metadata, mapper_name):
    """Raise if the dataset's metadata lists a different number of classes than the config.

    Which list the mapper's targets index is the mapper's own ``label_classes``; a dataset without
    that list is not checked.
    """
    key = label_classes(mapper_name)
    classes = metadata.get(key, None)
    if classes is not None and len(classes) != num_classes:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes} but dataset {metadata.name!r} has {len(classes)} "
            f"{key} (INPUT.DATASET_MAPPER_NAME={mapper_name!r})"
        )


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    """Mask classification model (Mask2Former) on a token backbone (AFF) or a dense-map backbone
    (ResNet, Swin, ...); the head takes the matching decoders."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        criterion: nn.Module,
        object_mask_threshold: float,
        overlap_threshold: float,
        metadata,
        size_divisibility: int,
        sem_seg_postprocess_before_inference: bool,
        pixel_mean: Tuple[float],
        pixel_std: Tuple[float],
        semantic_on: bool,
        panoptic_on: bool,
        instance_on: bool,
        test_topk_per_image: int,
        semantic_labels_only: bool = False,
    ):
        """
        Args:
            backbone: detectron2 Backbone returning tokens (AFF's dict) or dense maps.
            sem_seg_head: MaskFormerHead; criterion: SetCriterion.
            object_mask_threshold: panoptic: minimum class score of a kept query.
            overlap_threshold: panoptic: minimum visible / predicted area of a kept segment.
            metadata: the dataset's metadata (thing ids for panoptic / instance inference).
            size_divisibility: pad the input to a multiple of this (< 0: the backbone's; it must be
                a multiple of the backbone's ``size_divisibility``).
            sem_seg_postprocess_before_inference: resize the masks to the output size first.
            pixel_mean, pixel_std: per-channel normalisation of the input.
            semantic_on, panoptic_on, instance_on: which outputs inference produces.
            test_topk_per_image: instance inference keeps this many (query, class) pairs.
            semantic_labels_only: inference returns ``sem_seg_labels`` (the ``H x W`` argmax of
                semantic inference) computed a few rows at a time, instead of ``K x H x W``
                scores: bounded memory for large images (the evaluators need the scores).
        """
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.overlap_threshold = overlap_threshold
        self.object_mask_threshold = object_mask_threshold
        self.metadata = metadata
        required = getattr(backbone, "size_divisibility", 0)  # detectron2 Backbones have it
        if size_divisibility < 0:
            size_divisibility = required
        elif required > 0 and (size_divisibility == 0 or size_divisibility % required):
            raise ValueError(
                f"MODEL.MASK_FORMER.SIZE_DIVISIBILITY={size_divisibility}: the backbone {type(backbone).__name__} "
                f"needs inputs padded to a multiple of {required} (set a multiple of {required}, or -1 for the "
                "backbone's own)"
            )
        self.size_divisibility = size_divisibility
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.semantic_on = semantic_on
        self.instance_on = instance_on
        self.panoptic_on = panoptic_on
        self.test_topk_per_image = test_topk_per_image
        self.semantic_labels_only = semantic_labels_only
        if semantic_labels_only and (panoptic_on or instance_on or not semantic_on):
            raise ValueError(
                "MODEL.MASK_FORMER.TEST.SEMANTIC_LABELS_ONLY needs SEMANTIC_ON True and PANOPTIC_ON, INSTANCE_ON False"
            )
        if not self.semantic_on and not self.sem_seg_postprocess_before_inference:
            raise ValueError("sem_seg_postprocess_before_inference must be True when semantic inference is off")
        if panoptic_on and metadata.get("thing_dataset_id_to_contiguous_id", None) is None:
            raise ValueError(
                f"panoptic inference needs thing_dataset_id_to_contiguous_id in the metadata of "
                f"{metadata.name!r}"
            )

    @classmethod
    def from_config(cls, cfg):
        check_model_config(cfg)
        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        mf = cfg.MODEL.MASK_FORMER

        matcher = HungarianMatcher(
            cost_class=mf.CLASS_WEIGHT, cost_mask=mf.MASK_WEIGHT, cost_dice=mf.DICE_WEIGHT,
            num_points=mf.TRAIN_NUM_POINTS,
        )
        base_weights = {"loss_ce": mf.CLASS_WEIGHT, "loss_mask": mf.MASK_WEIGHT, "loss_dice": mf.DICE_WEIGHT}
        weight_dict = dict(base_weights)
        if mf.DEEP_SUPERVISION:  # one auxiliary prediction per decoder layer (DEC_LAYERS - 1)
            for i in range(mf.DEC_LAYERS - 1):
                weight_dict.update({f"{k}_{i}": v for k, v in base_weights.items()})
        criterion = SetCriterion(
            sem_seg_head.num_classes,
            matcher=matcher,
            weight_dict=weight_dict,
            eos_coef=mf.NO_OBJECT_WEIGHT,
            losses=["labels", "masks"],
            num_points=mf.TRAIN_NUM_POINTS,
            oversample_ratio=mf.OVERSAMPLE_RATIO,
            importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
        )

        datasets = tuple(cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST)
        metadata = MetadataCatalog.get(datasets[0] if datasets else "__aff_seg_no_dataset__")
        check_num_classes(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, metadata, cfg.INPUT.DATASET_MAPPER_NAME)
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": criterion,
            "object_mask_threshold": mf.TEST.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": mf.TEST.OVERLAP_THRESHOLD,
            "metadata": metadata,
            "size_divisibility": mf.SIZE_DIVISIBILITY,
            "sem_seg_postprocess_before_inference": (
                mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE or mf.TEST.PANOPTIC_ON or mf.TEST.INSTANCE_ON
            ),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "semantic_on": mf.TEST.SEMANTIC_ON,
            "instance_on": mf.TEST.INSTANCE_ON,
            "panoptic_on": mf.TEST.PANOPTIC_ON,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "semantic_labels_only": mf.TEST.SEMANTIC_LABELS_ONLY,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs):
        """Check the inputs (``check_batched_inputs``), normalise the images in float32 and pad them
        into an ImageList (zeros, i.e. the mean colour, right and bottom).

        The padding has no mask: the backbone tokenises it like image content, so the result of
        an image batched with larger ones differs from its result alone (docs/safety.md).
        """
        check_batched_inputs(batched_inputs, self.pixel_mean.shape[0], type(self).__name__)
        images = [(x["image"].to(self.device, torch.float32) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def forward(self, batched_inputs):
        """
        Args:
            batched_inputs: list of dataset-mapper dicts: ``image`` (C x H x W), in training
                ``instances`` (``gt_classes``, ``gt_masks``), optionally ``height``/``width``.
        Returns:
            training: dict of weighted losses.  Inference: one dict per image with ``sem_seg``
            (K x H x W; or ``sem_seg_labels``, H x W, with ``semantic_labels_only``), ``panoptic_seg`` ((H x W int32 ids, segments_info)) and/or ``instances``
            (``pred_masks``, ``scores``, ``pred_classes``, ``pred_boxes``) at ``height x width``.
        """
        images = self.preprocess_image(batched_inputs)
        padded_hw, image_sizes = images.tensor.shape[-2:], images.image_sizes
        # training inputs carry a seed each (aff_seg.data.build): drop path and the sampled points
        # of an image draw from its own generator
        with image_generators(batched_inputs):
            features = self.backbone(images.tensor)
            del images  # the normalised batch (4 bytes per pixel and channel) is not needed any more
            outputs = self.sem_seg_head(features, release_features=True)
            if self.training:
                if any("instances" not in x for x in batched_inputs):
                    raise ValueError("MaskFormer: every training input needs 'instances' (gt_classes, gt_masks)")
                targets = self.prepare_targets([x["instances"].to(self.device) for x in batched_inputs], padded_hw)
                for target, x in zip(targets, batched_inputs):  # named in the criterion's label checks
                    target["file_name"] = x.get("file_name")
                losses = self.criterion(outputs, targets)
        if self.training:
            return {k: v * self.criterion.weight_dict[k] for k, v in losses.items() if k in self.criterion.weight_dict}

        if self.semantic_labels_only:
            return [
                {"sem_seg_labels": semantic_labels(
                    mask_cls.float(), mask_pred.float(), padded_hw, image_size,
                    (x.get("height", image_size[0]), x.get("width", image_size[1])),
                    self.sem_seg_postprocess_before_inference)}
                for mask_cls, mask_pred, x, image_size in zip(
                    outputs["pred_logits"], outputs["pred_masks"], batched_inputs, image_sizes)
            ]
        mask_cls_results = outputs["pred_logits"].float()
        mask_pred_results = F.interpolate(
            outputs["pred_masks"].float(), size=padded_hw, mode="bilinear", align_corners=False)
        del outputs

        settings = self.postprocess_settings()
        processed_results = []
        for mask_cls, mask_pred, input_per_image, image_size in zip(
            mask_cls_results, mask_pred_results, batched_inputs, image_sizes
        ):
            height = input_per_image.get("height", image_size[0])
            width = input_per_image.get("width", image_size[1])
            processed_results.append(
                postprocess(mask_cls, mask_pred, image_size, height, width, settings, retry=retry_if_cuda_oom))
        return processed_results

    def prepare_targets(self, targets, padded_hw):
        """Instances -> list of {"labels": T, "masks": T x H_pad x W_pad} (zero-padded to ``padded_hw``)."""
        h_pad, w_pad = padded_hw
        new_targets = []
        for t in targets:
            gt_masks = t.gt_masks.tensor if hasattr(t.gt_masks, "tensor") else t.gt_masks
            padded = torch.zeros((gt_masks.shape[0], h_pad, w_pad), dtype=gt_masks.dtype, device=gt_masks.device)
            padded[:, : gt_masks.shape[1], : gt_masks.shape[2]] = gt_masks
            new_targets.append({"labels": t.gt_classes, "masks": padded})
        return new_targets

    def postprocess_settings(self):
        """The settings of the inference post-processing (``aff_seg.export.runtime.postprocess``;
        exported models store them in their ``model.json``)."""
        thing_map = self.metadata.get("thing_dataset_id_to_contiguous_id", None) or {}
        return {
            "num_classes": self.sem_seg_head.num_classes,
            "semantic_on": self.semantic_on,
            "panoptic_on": self.panoptic_on,
            "instance_on": self.instance_on,
            "sem_seg_postprocess_before_inference": self.sem_seg_postprocess_before_inference,
            "object_mask_threshold": self.object_mask_threshold,
            "overlap_threshold": self.overlap_threshold,
            "test_topk_per_image": self.test_topk_per_image,
            "thing_ids": sorted(set(thing_map.values())),
        }

    def semantic_inference(self, mask_cls, mask_pred):
        """``Q x (K+1)``, ``Q x H x W`` -> ``K x H x W`` class scores."""
        return semantic_inference(mask_cls, mask_pred)

    def panoptic_inference(self, mask_cls, mask_pred):
        """``Q x (K+1)``, ``Q x H x W`` -> (``H x W`` int32 segment ids, segments_info)."""
        return panoptic_inference(mask_cls, mask_pred, self.postprocess_settings())

    def instance_inference(self, mask_cls, mask_pred):
        """Top (query, class) pairs by a stable descending sort of the class score -> Instances."""
        return instance_inference(mask_cls, mask_pred, self.postprocess_settings())


SEMANTIC_LABEL_ROWS = 32  # output rows per step of ``semantic_labels``


def _resize_matrix(n_in, n_out, device):
    """``n_out x n_in`` matrix of 1-D linear resizing as ``F.interpolate(mode="bilinear",
    align_corners=False)`` does it along one axis (its weights, read off the identity)."""
    eye = torch.eye(n_in, device=device).unsqueeze(0)  # 1 x n_in (channels) x n_in (length)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T


def _resize_rows(x, matrix):
    """``C x n_in x w`` resized along its rows by the ``r x n_in`` rows of a resize matrix."""
    used = matrix.ne(0).any(0).nonzero()
    lo, hi = int(used.min()), int(used.max()) + 1  # the input rows these output rows read
    return torch.einsum("rh,chw->crw", matrix[:, lo:hi], x[:, lo:hi])


def _resize_columns(x, width):
    """``C x r x w`` resized to ``C x r x width`` exactly as ``F.interpolate`` resizes the columns
    of the whole map (rows keep their size, so their weights are 1 and 0)."""
    if x.shape[-1] == width:
        return x
    return F.interpolate(x[None], size=(x.shape[1], width), mode="bilinear", align_corners=False)[0]


def semantic_labels(mask_cls, mask_pred, padded_hw, image_size, output_hw, postprocess_before_inference):
    """The label map of Mask2Former's semantic inference without its ``K x H x W`` scores.

    The same maths as ``MaskFormer.forward``: mask logits resized to the padded input, cropped
    to the image; then either (``postprocess_before_inference``) resized to the output, sigmoid,
    class-weighted sum; or sigmoid, class-weighted sum, and the scores resized to the output.
    Computed ``SEMANTIC_LABEL_ROWS`` output rows at a time (rows by the resize weights of the few
    input rows they read, columns by ``F.interpolate``), so memory grows with the image width,
    not its area. Equal to the argmax of the full computation up to float rounding.

    Args:
        mask_cls: ``Q x (K+1)`` class logits; mask_pred: ``Q x h x w`` mask logits (stride 4).
        padded_hw: (H_pad, W_pad) of the padded input; image_size: (H, W) of the image in it.
        output_hw: (height, width) of the result.
    Returns:
        ``height x width`` int64 class indices.
    """
    probs = F.softmax(mask_cls, dim=-1)[:, :-1]  # Q x K
    to_image = _resize_matrix(mask_pred.shape[-2], padded_hw[0], mask_pred.device)[: image_size[0]]
    to_output = _resize_matrix(image_size[0], output_hw[0], mask_pred.device)

    def image_logits(rows):  # Q x r x W for these image rows
        logits = _resize_rows(mask_pred, rows)
        return _resize_columns(logits, padded_hw[1])[..., : image_size[1]]

    labels = []
    for start in range(0, output_hw[0], SEMANTIC_LABEL_ROWS):
        rows = slice(start, start + SEMANTIC_LABEL_ROWS)
        if postprocess_before_inference:
            logits = _resize_columns(image_logits(to_output[rows] @ to_image), output_hw[1])
            scores = torch.einsum("qk,qhw->khw", probs, logits.sigmoid())
        elif image_size[0] == output_hw[0]:  # no row resizing after the crop
            scores = torch.einsum("qk,qhw->khw", probs, image_logits(to_image[rows]).sigmoid())
            scores = _resize_columns(scores, output_hw[1])
        else:
            used = to_output[rows].ne(0).any(0).nonzero()
            lo, hi = int(used.min()), int(used.max()) + 1  # the image rows these output rows read
            image_scores = torch.einsum("qk,qhw->khw", probs, image_logits(to_image[lo:hi]).sigmoid())
            scores = _resize_columns(torch.einsum("rh,khw->krw", to_output[rows, lo:hi], image_scores), output_hw[1])
        labels.append(scores.argmax(0))
    return torch.cat(labels)
