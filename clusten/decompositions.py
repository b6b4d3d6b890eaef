"""The clusten custom ops as plain PyTorch, for graphs that must not contain them.

``decompositions()`` is a decomposition table for ``ExportedProgram.run_decompositions``: it
replaces ``clusten::gather_dot``, ``clusten::gather_sum`` and ``clusten::cluster_attention_fwd``
by their PyTorch twins (one chunk for symbolic sizes), so an exported program runs with torch
alone and converts to ONNX with standard operators.
"""
import torch

from . import reference
from .fused import attention

__all__ = ["decompositions"]


def _cluster_attention_fwd(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v):
    out, lse = attention._twin_forward(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v)
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return out.to(query.dtype), lse.to(lse_dtype)


def decompositions():
    """``torch.export.default_decompositions()`` plus the clusten ops' PyTorch forms."""
    table = torch.export.default_decompositions()
    table[torch.ops.clusten.gather_dot.default] = reference.gather_dot
    table[torch.ops.clusten.gather_sum.default] = reference.gather_sum
    table[torch.ops.clusten.cluster_attention_fwd.default] = _cluster_attention_fwd
    return table
