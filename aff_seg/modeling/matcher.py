"""Hungarian matching of predicted masks to ground-truth masks (Mask2Former's, unchanged maths)."""
import torch
from torch import nn
from scipy.optimize import linear_sum_assignment

from detectron2.projects.point_rend.point_features import point_sample

from .image_rng import image_rand

__all__ = ["HungarianMatcher", "batch_dice_loss", "batch_sigmoid_ce_loss"]


def batch_dice_loss(inputs, targets):
    """Pairwise dice loss: inputs ``Q x P`` logits, targets ``T x P`` in {0,1} -> ``Q x T``."""
    inputs = inputs.sigmoid()
    numerator = 2 * torch.einsum("nc,mc->nm", inputs, targets)
    denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_loss(inputs, targets):
    """Pairwise mean sigmoid cross-entropy: inputs ``Q x P`` logits, targets ``T x P`` -> ``Q x T``."""
    p = inputs.shape[1]
    pos = nn.functional.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = nn.functional.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    loss = torch.einsum("nc,mc->nm", pos, targets) + torch.einsum("nc,mc->nm", neg, 1 - targets)
    return loss / p


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising
    ``cost_class * (-p(class)) + cost_mask * BCE + cost_dice * dice`` on ``num_points`` random
    points shared by all masks of an image (drawn from the image's generator, ``image_rand``;
    scipy's ``linear_sum_assignment``)."""

    def __init__(self, cost_class=1.0, cost_mask=1.0, cost_dice=1.0, num_points=0):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_mask and cost_dice cannot all be 0")
        if num_points <= 0:
            raise ValueError(f"HungarianMatcher: num_points must be positive, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def forward(self, outputs, targets):
        """
        Args:
            outputs: ``pred_logits`` ``b x Q x (K+1)``, ``pred_masks`` ``b x Q x h x w`` (logits).
            targets: list of b dicts with ``labels`` ``T`` (int64) and ``masks`` ``T x H x W``.
        Returns:
            list of b ``(query_idx, target_idx)`` int64 pairs of length ``min(Q, T)``.
        """
        indices = []
        for b, target in enumerate(targets):
            tgt_ids = target["labels"]
            out_logits = outputs["pred_logits"][b].float()
            if tgt_ids.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost_class = -out_logits.softmax(-1)[:, tgt_ids]  # Q x T

            out_mask = outputs["pred_masks"][b][:, None].float()  # Q x 1 x h x w
            tgt_mask = target["masks"][:, None].to(out_mask)  # T x 1 x H x W
            coords = image_rand(b, 1, self.num_points, 2, device=out_mask.device)
            tgt_pts = point_sample(tgt_mask, coords.repeat(tgt_mask.shape[0], 1, 1), align_corners=False).squeeze(1)
            out_pts = point_sample(out_mask, coords.repeat(out_mask.shape[0], 1, 1), align_corners=False).squeeze(1)
            with torch.autocast(device_type=out_pts.device.type, enabled=False):
                cost_mask = batch_sigmoid_ce_loss(out_pts, tgt_pts)
                cost_dice = batch_dice_loss(out_pts, tgt_pts)
            cost = self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice
            # a diverging run gives NaN/inf costs; matched anyway, so that its NaN loss reaches
            # detectron2's "Loss became infinite or NaN" check instead of a scipy error
            q_idx, t_idx = linear_sum_assignment(torch.nan_to_num(cost).cpu())
            indices.append((torch.as_tensor(q_idx, dtype=torch.int64), torch.as_tensor(t_idx, dtype=torch.int64)))
        return indices

    def extra_repr(self):
        return (f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
                f"num_points={self.num_points}")
