"""The clusten custom ops as plain PyTorch, for graphs that must not contain them.

``decompositions()`` is a decomposition table for ``ExportedProgram.run_decompositions``: it
replaces ``clusten::gather_dot``, ``clusten::gather_sum``, ``clusten::knn`` and
``clusten::cluster_attention_fwd`` and ``clusten::ms_deform_attn`` by their PyTorch references (one chunk for
symbolic sizes; the neighbour search a ``scan`` over fixed-size query chunks),
so that an exported program runs with torch alone and converts to ONNX with standard operators.
"""
import torch

from . import reference
from .attention import reference_forward
from .knn_search import brute_force_knn
from .ms_deform_attn import _sample_and_mix

__all__ = ["decompositions"]


def _cluster_attention_fwd(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v):
    out, lse = reference_forward(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v)
    return out.to(query.dtype), lse.float() if query.dtype != torch.float64 else lse


def _knn(query, database, k):
    return brute_force_knn(query, database, k, return_dist=True)


def decompositions():
    """``torch.export.default_decompositions()`` plus the clusten ops' PyTorch references."""
    table = torch.export.default_decompositions()
    table[torch.ops.clusten.gather_dot.default] = reference.gather_dot
    table[torch.ops.clusten.gather_sum.default] = reference.gather_sum
    table[torch.ops.clusten.knn.default] = _knn
    table[torch.ops.clusten.cluster_attention_fwd.default] = _cluster_attention_fwd
    table[torch.ops.clusten.ms_deform_attn.default] = _sample_and_mix
    return table
