"""Process-group backend choice and the single-process path of launch."""
import pytest
import torch

from aff_seg.engine import launch, resolve_dist_backend


def test_backend_choice():
    assert resolve_dist_backend("auto", "cpu") == "gloo"
    assert resolve_dist_backend("auto", "cuda") == ("nccl" if torch.cuda.is_available() else "gloo")
    assert resolve_dist_backend("nccl", "cpu") == "nccl"  # explicit choice wins
    with pytest.raises(ValueError, match="dist backend"):
        resolve_dist_backend("mpi", "cpu")


def test_one_process_runs_in_place_without_a_process_group():
    seen = []
    launch(lambda x: seen.append((x, torch.distributed.is_initialized())), 1, args=(7,), backend="gloo")
    assert seen == [(7, False)]


def test_nccl_without_enough_gpus_is_refused():
    if torch.cuda.device_count() >= 2:
        pytest.skip("has 2 GPUs")
    with pytest.raises(ValueError, match="GPUs"):
        launch(print, 2, dist_url="auto", backend="nccl")
