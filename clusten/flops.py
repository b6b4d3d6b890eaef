"""FLOP and activation counting rules of the clusten ops, for fvcore's jit-trace analyses.

fvcore (``FlopCountAnalysis``, ``ActivationCountAnalysis``) sees each clusten op as one node of
the traced graph and skips it unless a handle is registered for its name::

    analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle(**clusten.flops.FLOP_HANDLES)

A handle takes the node's jit input and output values and returns a count. The convention is
fvcore's: one multiply-add is one flop, elementwise work and sorting are not counted.

- ``clusten::gather_dot``: ``out.numel() * c`` (``x`` ``g x n x r x c``);
- ``clusten::gather_sum``: ``out.numel() * m`` (``w`` ``g x n x m x r``);
- ``clusten::scatter_sum``: ``w.numel() * c`` (``x`` ``g x n x r x c``);
  together these are every unfused neighbourhood op and their gradients;
- ``clusten::cluster_attention_fwd``: the logits and the weighted sum over the M neighbours and
  the blank token, ``2 * b * h * n * (M + 1) * c``;
- ``clusten::ms_deform_attn``: bilinear sampling and weighting, ``5 * b * q * heads * levels *
  points * d`` (:func:`clusten.ms_deform_attn_flop`);
- ``clusten::knn``: the brute-force distance computation ``b * n * n_ * d`` (query ``b x n x d``
  against database ``b x n_ x d``), whichever search runs; the selection of the k nearest is
  not counted.
"""
from math import prod

from .ms_deform_attn import ms_deform_attn_flop

__all__ = ["ACTIVATION_HANDLES", "FLOP_HANDLES"]


def _shape(value):
    """The sizes of a traced jit tensor value."""
    return value.type().sizes()


def gather_dot_flop(inputs, outputs):
    """``x`` g x n x r x c -> out g x n x m x r: one multiply-add per (out, c)."""
    return prod(_shape(outputs[0])) * _shape(inputs[0])[-1]


def gather_sum_flop(inputs, outputs):
    """``w`` g x n x m x r -> out g x n x r x c: one multiply-add per (out, m)."""
    return prod(_shape(outputs[0])) * _shape(inputs[0])[2]


def scatter_sum_flop(inputs, outputs):
    """``w`` g x n x m x r, ``x`` g x n x r x c: one multiply-add per (w, c)."""
    return prod(_shape(inputs[0])) * _shape(inputs[1])[-1]


def cluster_attention_flop(inputs, outputs):
    """``query`` b x h x n x c, ``nbhd_idx`` b x n x M: 2 * b * h * n * (M + 1) * c."""
    b, h, n, c = _shape(inputs[0])
    return 2 * b * h * n * (_shape(inputs[3])[-1] + 1) * c


def ms_deform_attn_op_flop(inputs, outputs):
    """``value`` b x s x heads x d, locations b x q x heads x levels x points x 2."""
    return ms_deform_attn_flop(_shape(inputs[0]), _shape(inputs[2]))


def knn_flop(inputs, outputs):
    """``query`` b x n x d, ``database`` b x n_ x d: b * n * n_ * d."""
    b, n, d = _shape(inputs[0])
    return b * n * _shape(inputs[1])[1] * d


def output_activations(inputs, outputs):
    """Activations of an op: the elements of its first output."""
    return prod(_shape(outputs[0]))


FLOP_HANDLES = {
    "clusten::gather_dot": gather_dot_flop,
    "clusten::gather_sum": gather_sum_flop,
    "clusten::scatter_sum": scatter_sum_flop,
    "clusten::cluster_attention_fwd": cluster_attention_flop,
    "clusten::ms_deform_attn": ms_deform_attn_op_flop,
    "clusten::knn": knn_flop,
}
#: the ops whose outputs are activations (the KNN's indices are not)
ACTIVATION_HANDLES = {
    "clusten::gather_dot": output_activations,
    "clusten::gather_sum": output_activations,
    "clusten::scatter_sum": output_activations,
    "clusten::cluster_attention_fwd": output_activations,
    "clusten::ms_deform_attn": output_activations,
    "clusten::knn": None,
}
