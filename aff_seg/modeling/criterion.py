"""Mask2Former's set criterion: class cross-entropy with a down-weighted "no object" class, and
point-sampled sigmoid BCE + dice on the matched masks with PointRend importance sampling, for the
final prediction and (deep supervision) every auxiliary one.  Losses are computed in float32."""
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.projects.point_rend.point_features import point_sample
from detectron2.utils.comm import get_world_size

from .image_rng import image_rand

__all__ = ["SetCriterion", "dice_loss", "sigmoid_ce_loss"]


def dice_loss(inputs, targets, num_masks):
    """Dice loss summed over masks / num_masks; inputs ``N x P`` logits, targets ``N x P``."""
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def sigmoid_ce_loss(inputs, targets, num_masks):
    """Per-mask mean sigmoid cross-entropy summed / num_masks; ``N x P`` logits and targets."""
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def calculate_uncertainty(logits):
    """Uncertainty of ``R x 1 x P`` mask logits: ``-|logit|`` (highest at the decision boundary)."""
    return -torch.abs(logits)


def sample_training_points(mask_logits, masks_per_image, num_points, oversample_ratio, importance_sample_ratio):
    """PointRend's training points (Kirillov et al. 2020; detectron2's
    ``get_uncertain_point_coords_with_randomness``), the random coordinates of the masks of image i
    drawn from image i's generator (``image_rand``), so that they do not depend on the batch.

    Of ``num_points`` points per mask, ``importance_sample_ratio`` are the most uncertain of
    ``oversample_ratio * num_points`` uniform candidates, the rest uniform.

    Args:
        mask_logits: ``N x 1 x h x w``, the masks of image 0, then image 1, ...
        masks_per_image: the number of masks of each image (summing to N).
    Returns:
        ``N x num_points x 2`` coordinates in [0, 1].
    """
    device = mask_logits.device

    def uniform(count):  # N x count x 2, image by image
        return torch.cat([image_rand(i, n, count, 2, device=device) for i, n in enumerate(masks_per_image)])

    candidates = uniform(int(num_points * oversample_ratio))
    uncertainty = calculate_uncertainty(point_sample(mask_logits, candidates, align_corners=False))[:, 0]
    num_uncertain = int(importance_sample_ratio * num_points)
    chosen = uncertainty.topk(num_uncertain, dim=1).indices  # N x num_uncertain
    coords = candidates.gather(1, chosen[..., None].expand(-1, -1, 2))
    if num_uncertain < num_points:
        coords = torch.cat([coords, uniform(num_points - num_uncertain)], dim=1)
    return coords


class SetCriterion(nn.Module):
    """
    Args:
        num_classes: K (targets' labels in [0, K); K is "no object").
        matcher: the HungarianMatcher.
        weight_dict: loss name -> weight (the meta-architecture applies it).
        eos_coef: cross-entropy weight of the "no object" class.
        losses: subset of ("labels", "masks").
        num_points, oversample_ratio, importance_sample_ratio: point sampling of the mask losses.
    """

    def __init__(self, num_classes, matcher, weight_dict, eos_coef, losses, num_points, oversample_ratio,
                 importance_sample_ratio):
        super().__init__()
        unknown = set(losses) - {"labels", "masks"}
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {sorted(unknown)}; use 'labels' and/or 'masks'")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = losses
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    def loss_labels(self, outputs, targets, indices, weight_share):
        """Weighted cross-entropy mean over all queries of the batch; ``weight_share`` (this
        process's share of the whole job's weight, times the number of processes; 1 alone)
        turns the mean over this process's queries into that job-wide mean once DDP averages."""
        logits = outputs["pred_logits"].float()  # b x Q x (K+1)
        batch_idx, src_idx = self._src_permutation_idx(indices)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, src_idx] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_ce": loss * weight_share}

    def loss_masks(self, outputs, targets, indices, num_masks):
        batch_idx, src_idx = self._src_permutation_idx(indices)
        src_masks = outputs["pred_masks"][batch_idx, src_idx].float()[:, None]  # N x 1 x h x w
        if src_masks.shape[0] == 0:  # no target in the whole batch: nothing to supervise
            zero = outputs["pred_masks"].float().sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        target_masks = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)])
        target_masks = target_masks.to(src_masks)[:, None]  # N x 1 x H x W
        with torch.no_grad():
            coords = sample_training_points(
                src_masks, [len(src) for src, _ in indices], self.num_points, self.oversample_ratio,
                self.importance_sample_ratio)
            point_labels = point_sample(target_masks, coords, align_corners=False).squeeze(1)
        point_logits = point_sample(src_masks, coords, align_corners=False).squeeze(1)
        return {
            "loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    @staticmethod
    def _src_permutation_idx(indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def _check_targets(self, outputs, targets):
        b = outputs["pred_logits"].shape[0]
        if len(targets) != b:
            raise ValueError(f"SetCriterion: {len(targets)} targets for a batch of {b}")
        for i, t in enumerate(targets):
            labels = t["labels"]
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"SetCriterion: target {i} ({t.get('file_name') or 'file not known'}) has class ids "
                    f"{labels.unique().tolist()} outside "
                    f"[0, {self.num_classes}) (MODEL.SEM_SEG_HEAD.NUM_CLASSES={self.num_classes})"
                )
            if t["masks"].shape[0] != labels.shape[0]:
                raise ValueError(
                    f"SetCriterion: target {i} has {t['masks'].shape[0]} masks but {labels.shape[0]} labels")

    def forward(self, outputs, targets):
        """
        Args:
            outputs: ``pred_logits`` ``b x Q x (K+1)``, ``pred_masks`` ``b x Q x h x w`` and
                optionally ``aux_outputs`` (a list of such dicts).
            targets: list of b dicts: ``labels`` ``T`` int64, ``masks`` ``T x H x W``.
        Returns:
            dict of unweighted float32 losses: ``loss_ce``, ``loss_mask``, ``loss_dice`` and the
            same with suffix ``_{i}`` for auxiliary output i.
        """
        self._check_targets(outputs, targets)
        # the normalisers of the whole job (all processes), so that the gradient DDP averages is
        # the one of a single process with the whole batch: the number of masks, and the summed
        # cross-entropy weight of the queries (each image's min(Q, T) matched ones weigh 1, the
        # others eos_coef)
        b, q = outputs["pred_logits"].shape[:2]
        matched = sum(min(q, len(t["labels"])) for t in targets)
        local = torch.as_tensor([float(sum(len(t["labels"]) for t in targets)),
                                 matched + (b * q - matched) * self.eos_coef], device=outputs["pred_logits"].device)
        totals = local.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        totals = totals / get_world_size()
        normalisers = {"masks": torch.clamp(totals[0], min=1).item(), "labels": (local[1] / totals[1]).item()}

        with torch.autocast(device_type=outputs["pred_logits"].device.type, enabled=False):
            losses = self._losses(outputs, targets, normalisers, suffix="")
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                losses.update(self._losses(aux, targets, normalisers, suffix=f"_{i}"))
        return losses

    def _losses(self, outputs, targets, normalisers, suffix):
        indices = self.matcher(outputs, targets)
        losses = {}
        for name in self.losses:
            fn = self.loss_labels if name == "labels" else self.loss_masks
            losses.update({k + suffix: v for k, v in fn(outputs, targets, indices, normalisers[name]).items()})
        return losses

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, "
                f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
                f"importance_sample_ratio={self.importance_sample_ratio}")
