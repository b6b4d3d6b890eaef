"""clusten: AFF's neighbourhood ops (device kernels with pure-PyTorch references); needs torch alone.

Public ops (argument order of the original autograd functions):

- ``clusten_qk(query, key, nbhd_idx)``: ``b x h x n x c``, ``b x h x n_ x c``, ``b x n x m`` -> ``b x h x n x m``
- ``clusten_av(attn, value, nbhd_idx)``: ``b x h x n x m``, ``b x h x n_ x c``, ``b x n x m`` -> ``b x h x n x c``
- ``clusten_wf(weights, feat, nbhd_idx)``: ``b x n x m x ic``, ``b x n_ x c``, ``b x n x m`` -> ``b x n x ic x c``
- ``weighted_gather(nbhd_idx, weights, feat)``: ``b x n x k``, ``b x n x k``, ``b x n_ x c`` -> ``b x n x c``
- ``msdetrpc(nn_idx, nn_weight, attn, value)``: ``b x n x m x k`` (x2), ``b x n x m``, ``b x n_ x c`` -> ``b x n x c``
- ``knn(query, database, k, return_dist=False)``: ``b x n x d``, ``b x n_ x d`` -> ``b x n x k`` int64
  (``brute_force_knn`` and the 2-D ``grid_knn`` give the same results; ``set_knn_method``)
- ``cluster_attention(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v)``: the fused
  cluster attention (Triton on CUDA), see :mod:`clusten.attention`; its reference, the chain of
  ops of the original, is ``cluster_attention_reference``.
- ``ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights)``: multi-scale
  deformable attention on dense maps (``b x s x heads x d`` -> ``b x q x heads*d``), PyTorch on
  every device, see :mod:`clusten.ms_deform_attn`

Backends (:mod:`clusten.backends`): CUDA tensors use the device kernels (built on first use) and
everything else the PyTorch references; ``set_backend("torch")`` / ``with backend("cuda"):``
force either path, ``can_run`` says whether (and why not) a backend runs on a device. FLOP
counting rules for fvcore: :mod:`clusten.flops`. ``decompositions()`` replaces the custom ops by
their PyTorch references in an exported program (:mod:`clusten.decompositions`). Benchmark: ``python -m clusten.benchmark``.
"""
from .attention import cluster_attention
from .backends import backend, can_run, get_backend, set_backend
from .decompositions import decompositions
from .knn_grid import grid_knn
from .knn_search import brute_force_knn, get_knn_method, knn, knn_method, set_knn_method
from .ms_deform_attn import ms_deform_attn, ms_deform_attn_flop
from .ops import cluster_attention_reference, clusten_av, clusten_qk, clusten_wf, msdetrpc, weighted_gather

__all__ = [
    "clusten_qk", "clusten_av", "clusten_wf", "weighted_gather", "msdetrpc", "knn",
    "brute_force_knn", "grid_knn", "cluster_attention", "cluster_attention_reference", "ms_deform_attn",
    "ms_deform_attn_flop", "backend", "can_run", "get_backend", "set_backend", "get_knn_method", "knn_method",
    "set_knn_method", "decompositions",
]
