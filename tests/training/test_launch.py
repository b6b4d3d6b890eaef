"""Process-group backend choice and the single-process path of launch."""
import pytest
import torch

from aff_seg.engine import launch, launcher_environment, resolve_dist_backend


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


def test_torchrun_environment():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "node7", "MASTER_PORT": "29500"}
    assert launcher_environment(env) == dict(rank=3, local_rank=1, world_size=4, local_world_size=2,
                                             dist_url="env://", source="torchrun")


@pytest.mark.parametrize("nodelist, host", [("gpu[003-005,9]", "gpu003"), ("a17,b2", "a17"),
                                            ("n[12-13]-ib", "n12-ib"), ("single", "single")])
def test_slurm_environment(nodelist, host):
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_ID": "123456"}
    assert launcher_environment(env) == dict(rank=5, local_rank=1, world_size=8, local_world_size=4,
                                             dist_url=f"tcp://{host}:{20000 + 123456 % 20000}", source="slurm")
    env["MASTER_PORT"] = "1234"
    assert launcher_environment(env)["dist_url"] == f"tcp://{host}:1234"


def test_single_process_environments_launch_by_hand():
    assert launcher_environment({}) is None
    assert launcher_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # sbatch + plain python
    assert launcher_environment({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}) is None
    with pytest.raises(ValueError, match="do not split"):
        launcher_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "3", "SLURM_NTASKS_PER_NODE": "2"})
