"""FASeg's decoder pieces: dynamic focus-aware positional queries (DFPQ) and high-resolution
cross-attention (HRCA), after Zhang et al., "Dynamic Focus-aware Positional Queries for Semantic
Segmentation", CVPR 2023 (github.com/ziplab/FASeg).  See docs/faseg.md.

* The decoder layers cycle over res5, res4, res3 and, every ``HR_EVERY``-th layer, a
  high-resolution (HR) layer on res2 (``layer_schedule``).
* After each non-HR layer the positional queries become ``g(Q_s + A P)``: the static queries
  ``Q_s`` plus the layer's head-averaged cross-attention ``A`` (``b x Q x n``) applied to the
  keys' position encodings ``P`` (``b x n x c``), through the MLP ``g`` (``adapt_pos2d``).  The
  original forms the ``Q x n x b x c`` broadcast product; here it is one batched matmul.
* Before the first layer ``A`` is the (row-normalised) thresholded mask prediction at res5.
* An HR layer attends, without mask and with the static queries, to the res2 cells of the
  ``max(1, n_5 // OMEGA_RATE)`` res5 cells with the largest cross-attention summed over the
  queries at the last res5 layer.

This file holds the shared pieces and the grid decoder (the original's); ``faseg_pc`` the
point-cloud variant on AFF tokens.
"""
import torch

__all__ = [
    "HR",
    "layer_schedule",
    "faseg_options",
    "positional_queries",
    "pooled_positional_queries",
    "top_cells",
]

HR = 3  # schedule entry (and level-embedding row) of the high-resolution level


def layer_schedule(num_layers, hr_every, num_levels=3):
    """Level each decoder layer attends to: the non-HR layers cycle over 0..num_levels-1
    (res5, res4, res3); with ``hr_every`` > 0 every ``hr_every``-th layer is ``HR``.

    13 layers, hr_every 4 -> [0, 1, 2, HR, 0, 1, 2, HR, 0, 1, 2, HR, 0].
    """
    schedule, count = [], 0
    for i in range(num_layers):
        if hr_every > 0 and (i + 1) % hr_every == 0:
            schedule.append(HR)
        else:
            schedule.append(count % num_levels)
            count += 1
    return schedule


def faseg_options(cfg):
    """The ``MODEL.MASK_FORMER.FASEG`` keys as decoder arguments, checked."""
    fa = cfg.MODEL.MASK_FORMER.FASEG
    if fa.OMEGA_RATE < 1:
        raise ValueError(f"MODEL.MASK_FORMER.FASEG.OMEGA_RATE must be >= 1, got {fa.OMEGA_RATE}")
    for key in ("ATTN_MASK_THRESHOLD", "INIT_POOL_THRESHOLD"):
        if not 0.0 < fa[key] < 1.0:
            raise ValueError(f"MODEL.MASK_FORMER.FASEG.{key} must be in (0, 1), got {fa[key]}")
    if fa.HR_EVERY == 1 or fa.HR_EVERY < 0:
        raise ValueError(
            f"MODEL.MASK_FORMER.FASEG.HR_EVERY must be 0 (no high-resolution layer) or >= 2, got {fa.HR_EVERY}")
    return {
        "omega_rate": fa.OMEGA_RATE,
        "attn_mask_threshold": fa.ATTN_MASK_THRESHOLD,
        "init_pool_threshold": fa.INIT_POOL_THRESHOLD,
        "init_pool_complement": fa.INIT_POOL_COMPLEMENT,
        "hr_every": fa.HR_EVERY,
    }


def positional_queries(adapt, static_query, weights, pos):
    """DFPQ: ``g(Q_s + A P)``.

    Args:
        adapt: the MLP g; static_query: ``Q x b x c``.
        weights: ``b x Q x n`` attention weights (or normalised pooling weights).
        pos: ``b x n x c`` position encodings of the keys.
    Returns:
        ``Q x b x c``.
    """
    pooled = torch.bmm(weights, pos.to(weights.dtype))  # b x Q x c
    return adapt(static_query + pooled.transpose(0, 1).to(static_query.dtype))


def pooled_positional_queries(adapt, static_query, level_prob, pos, threshold, complement):
    """The first positional queries: the mean of the res5 encodings where the predicted mask
    probability ``level_prob`` (``b x Q x n``) is below ``threshold`` (``complement``, as the
    original) or at least it, then as ``positional_queries``; an empty set gives the mean 0."""
    region = (level_prob < threshold) if complement else (level_prob >= threshold)
    region = region.to(level_prob.dtype)
    weights = region / (region.sum(-1, keepdim=True) + 1e-6)
    return positional_queries(adapt, static_query, weights, pos)


def top_cells(coarse_weights, omega_rate):
    """Indices ``b x k`` of the ``k = max(1, n // omega_rate)`` res5 cells with the largest
    attention summed over the queries (``coarse_weights`` ``b x Q x n``), best first.

    The original takes ``n // omega_rate`` cells, i.e. none below 32 cells (inputs under about
    180 x 180 px), where its HR layer attends to an empty set; here at least one.
    """
    scores = coarse_weights.sum(1)  # b x n
    k = max(1, scores.shape[1] // omega_rate)
    return scores.topk(k, dim=1).indices
