"""Fast paths of clusten: the fused cluster attention (Triton) and the grid-bucketed KNN.

Each has a pure-PyTorch twin that is the reference and the CPU path; see the modules.
"""
from .attention import cluster_attention, cluster_attention_reference
from .grid_knn import grid_knn

__all__ = ["cluster_attention", "cluster_attention_reference", "grid_knn"]
