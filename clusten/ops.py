"""The public neighbourhood ops of AFF (argument order of the original autograd functions).

Every op validates its arguments (:mod:`clusten.validation`), casts floating inputs to one
dtype, and is then a composition of the gather primitives of :mod:`clusten.primitives`, which
run the CUDA kernels or the PyTorch twins (:mod:`clusten.build` decides). All floating inputs
get gradients, index inputs none. Indices may be int32 or int64.

Dtypes: as in the original, ``key`` is cast to ``query``'s dtype (qk), ``value`` to ``attn``'s
(av), ``feat`` to ``weights``' (wf), ``weights`` to ``feat``'s (weighted_gather); msdetrpc
requires all of its floating inputs to share ``attn``'s dtype. Inside an autocast region all
floating inputs are cast to the autocast dtype instead. float16/bfloat16 accumulate in float32.
"""
import torch

from . import primitives, reference
from .reference import MASK_LOGIT
from .validation import check, check_same_dtype


def _compute_dtype(device, default):
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


def clusten_qk(query, key, nbhd_idx):
    """Query-key dot products over each query's neighbourhood.

    out[b,h,i,j] = sum_c query[b,h,i,c] * key[b,h,nbhd_idx[b,i,j],c]

    Args:
        query: ``b x h x n x c`` float.
        key: ``b x h x n_ x c`` float (cast to query's dtype).
        nbhd_idx: ``b x n x m`` int32/int64, values in ``[0, n_)``.
    Returns:
        ``b x h x n x m`` attention logits in query's dtype.
    """
    s = check("clusten_qk", [("query", query, "b h n c", "float"), ("key", key, "b h n_ c", "float"),
                             ("nbhd_idx", nbhd_idx, "b n m", "index:n_")])
    dtype = _compute_dtype(query.device, query.dtype)
    g = s["b"] * s["h"]
    out = primitives.gather_dot(
        query.to(dtype).reshape(g, s["n"], 1, s["c"]).contiguous(),
        key.to(dtype).reshape(g, s["n_"], s["c"]).contiguous(),
        nbhd_idx.long().contiguous(),
    )
    return out.view(s["b"], s["h"], s["n"], s["m"])


def clusten_av(attn, value, nbhd_idx):
    """Attention-weighted sum of the neighbours' values.

    out[b,h,i,c] = sum_j attn[b,h,i,j] * value[b,h,nbhd_idx[b,i,j],c]

    Args:
        attn: ``b x h x n x m`` float.
        value: ``b x h x n_ x c`` float (cast to attn's dtype).
        nbhd_idx: ``b x n x m`` int32/int64, values in ``[0, n_)``.
    Returns:
        ``b x h x n x c`` in attn's dtype.
    """
    s = check("clusten_av", [("attn", attn, "b h n m", "float"), ("value", value, "b h n_ c", "float"),
                             ("nbhd_idx", nbhd_idx, "b n m", "index:n_")])
    dtype = _compute_dtype(attn.device, attn.dtype)
    g = s["b"] * s["h"]
    out = primitives.gather_sum(
        attn.to(dtype).reshape(g, s["n"], s["m"], 1).contiguous(),
        value.to(dtype).reshape(g, s["n_"], s["c"]).contiguous(),
        nbhd_idx.long().contiguous(),
    )
    return out.view(s["b"], s["h"], s["n"], s["c"])


def clusten_wf(weights, feat, nbhd_idx):
    """PointConv's weighted neighbour features (one weight column per inner channel).

    out[b,i,ic,c] = sum_j weights[b,i,j,ic] * feat[b,nbhd_idx[b,i,j],c]

    Args:
        weights: ``b x n x m x ic`` float.
        feat: ``b x n_ x c`` float (cast to weights' dtype).
        nbhd_idx: ``b x n x m`` int32/int64, values in ``[0, n_)``.
    Returns:
        ``b x n x ic x c`` in weights' dtype (flatten the last two dims ic-major, as the original).
    """
    check("clusten_wf", [("weights", weights, "b n m ic", "float"), ("feat", feat, "b n_ c", "float"),
                         ("nbhd_idx", nbhd_idx, "b n m", "index:n_")])
    dtype = _compute_dtype(weights.device, weights.dtype)
    return primitives.gather_sum(weights.to(dtype).contiguous(), feat.to(dtype).contiguous(),
                                 nbhd_idx.long().contiguous())


def weighted_gather(nbhd_idx, weights, feat):
    """Weighted sum of neighbour features (e.g. Shepard interpolation onto finer tokens).

    out[b,i,c] = sum_k weights[b,i,k] * feat[b,nbhd_idx[b,i,k],c]

    Args:
        nbhd_idx: ``b x n x k`` int32/int64, values in ``[0, n_)``.
        weights: ``b x n x k`` float (cast to feat's dtype).
        feat: ``b x n_ x c`` float.
    Returns:
        ``b x n x c`` in feat's dtype.
    """
    s = check("weighted_gather", [("nbhd_idx", nbhd_idx, "b n k", "index:n_"), ("weights", weights, "b n k", "float"),
                                  ("feat", feat, "b n_ c", "float")])
    dtype = _compute_dtype(feat.device, feat.dtype)
    out = primitives.gather_sum(weights.to(dtype).unsqueeze(-1).contiguous(), feat.to(dtype).contiguous(),
                                nbhd_idx.long().contiguous())
    return out.view(s["b"], s["n"], s["c"])


def msdetrpc(nn_idx, nn_weight, attn, value):
    """Multi-scale deformable attention on point clouds (the pixel decoder's sampling).

    Each of ``m`` sampling points of query i is interpolated from its ``k`` nearest tokens,
    then the points are mixed by the attention weights:
    out[b,i,c] = sum_m attn[b,i,m] * sum_k nn_weight[b,i,m,k] * value[b,nn_idx[b,i,m,k],c]

    Args:
        nn_idx: ``b x n x m x k`` int32/int64, values in ``[0, n_)``.
        nn_weight: ``b x n x m x k`` float, attn's dtype.
        attn: ``b x n x m`` float.
        value: ``b x n_ x c`` float, attn's dtype.
    Returns:
        ``b x n x c`` in attn's dtype.
    """
    s = check("msdetrpc", [("nn_idx", nn_idx, "b n m k", "index:n_"), ("nn_weight", nn_weight, "b n m k", "float"),
                           ("attn", attn, "b n m", "float"), ("value", value, "b n_ c", "float")])
    dtype = _compute_dtype(attn.device, None)
    if dtype is None:
        check_same_dtype("msdetrpc", "attn", attn, nn_weight=nn_weight, value=value)
        dtype = attn.dtype
    b, n, m, k = nn_idx.shape
    mixed = (attn.to(dtype).unsqueeze(-1) * nn_weight.to(dtype)).reshape(b, n, m * k, 1)
    out = primitives.gather_sum(mixed.contiguous(), value.to(dtype).contiguous(),
                                nn_idx.long().reshape(b, n, m * k).contiguous())
    return out.view(b, n, s["c"])


def attention_logits(query, key, nbhd_idx, bias, mask, blank_k):
    """AFF's attention logits over each query's neighbourhood and the blank token.

    ``a_ij = q_i . key[idx_ij] + bias_ij + (1 - mask_ij) * MASK_LOGIT`` (the mask term only with a
    mask) and the blank token's ``a_i0 = q_i . blank_k`` (no bias).

    Args:
        query: ``b x h x n x c``; key: ``b x h x n_ x c``.
        nbhd_idx: ``b x n x m`` int32/int64, or None for global attention (every query over all
            ``n_`` keys in order, m = n_).
        bias: broadcastable to ``b x h x n x m``.
        mask: ``b x n x m``, 1/True on real neighbours, 0/False on padded slots, or None.
        blank_k: ``h x c``.
    Returns:
        (``b x h x n x m`` neighbour logits, ``b x h x n x 1`` blank logits).
    """
    h, c = blank_k.shape
    logits = query @ key.transpose(-1, -2) if nbhd_idx is None else clusten_qk(query, key, nbhd_idx)
    logits = logits + bias
    if mask is not None:
        padded = ~mask if mask.dtype == torch.bool else 1 - mask
        logits = logits + padded.unsqueeze(1).to(logits.dtype) * MASK_LOGIT
    return logits, (query * blank_k.reshape(1, h, 1, c)).sum(-1, keepdim=True)


def _attention_scores(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, dropout_p):
    """(output ``b x h x n x c``, the ``b x h x n x (m + 1)`` logits it took the softmax of)."""
    h, c = blank_k.shape
    logits, blank = attention_logits(query, key, nbhd_idx, bias, mask, blank_k)
    acc = reference.accumulate_dtype(logits.dtype)
    scores = torch.cat([logits.to(acc), blank.to(acc)], dim=-1)
    attn = torch.nn.functional.dropout(scores.softmax(dim=-1), dropout_p, training=dropout_p > 0)
    nbhd_attn = attn[..., :-1].to(value.dtype)
    out = nbhd_attn @ value if nbhd_idx is None else clusten_av(nbhd_attn, value, nbhd_idx)
    return out + attn[..., -1:].to(value.dtype) * blank_v.reshape(1, h, 1, c).to(value.dtype), scores


def cluster_attention_reference(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, dropout_p=0.0):
    """AFF's cluster attention as the chain of ops of the original: the reference of
    :func:`clusten.cluster_attention`, and the model's unfused path.

    ``P = softmax([a_i1 .. a_im, a_i0])`` over the logits of :func:`attention_logits`, taken in
    float32 (float64 for float64 logits), with dropout ``dropout_p`` on ``P``;
    ``out_i = sum_j P_ij value[idx_ij] + P_i0 blank_v``.

    Args:
        query: ``b x h x n x c``, already multiplied by c^-0.5.
        key, value: ``b x h x n_ x c``.
        nbhd_idx: ``b x n x m`` int32/int64 in ``[0, n_)``, or None for global attention (m = n_).
        bias: ``b x h x n x m`` relative-position bias.
        mask: ``b x n x m`` (1/True = real neighbour, 0/False = padded slot) or None.
        blank_k, blank_v: ``h x c``, the blank token's key and value per head.
        dropout_p: attention dropout probability (training only).
    Returns:
        ``b x h x n x c`` in value's dtype.
    """
    _check_attention("cluster_attention_reference", query, key, value, nbhd_idx, bias, mask, blank_k, blank_v)
    return _attention_scores(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, dropout_p)[0]


def _check_attention(op, query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, index_kind="shape"):
    args = [("query", query, "b h n c", "float"), ("key", key, "b h n_ c", "float"),
            ("value", value, "b h n_ c", "float"), ("bias", bias, "b h n m", "float"),
            ("blank_k", blank_k, "h c", "float"), ("blank_v", blank_v, "h c", "float")]
    if nbhd_idx is not None:
        args.append(("nbhd_idx", nbhd_idx, "b n m", index_kind))
    if mask is not None:
        args.append(("mask", mask, "b n m", "shape"))
    s = check(op, args)
    if nbhd_idx is None and s["m"] != s["n_"]:
        raise ValueError(f"{op}: global attention (nbhd_idx None) needs bias over all n_={s['n_']} keys, "
                         f"got m={s['m']}")
    if nbhd_idx is not None and nbhd_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: nbhd_idx must be int32 or int64, got {nbhd_idx.dtype}")
