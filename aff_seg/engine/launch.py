"""Processes of a run: input checks, setup (loggers, config dump, seeds) and the launcher (NCCL or gloo)."""
import datetime
import logging
import os
import re
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.data import MetadataCatalog
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import check_weights
from ..config import ConfigError
from ..data.datasets import check_dataset_exists

__all__ = ["check_run_inputs", "launch", "launcher_environment", "resolve_dist_backend", "setup_run"]

# evaluator types whose classes are the "thing" classes (the others: stuff_classes)
_INSTANCE_EVALUATORS = ("coco", "lvis", "cityscapes_instance")


def check_run_inputs(cfg, train=True, resume=False):
    """Stop, before anything is built, on a run input that is missing or does not fit:

    * ``MODEL.WEIGHTS`` names a local file that does not exist (not checked when ``resume``
      continues from ``OUTPUT_DIR/last_checkpoint``);
    * a dataset of ``DATASETS.TRAIN`` (when ``train``) or ``DATASETS.TEST`` is not registered
      or its files are missing (``check_dataset_exists`` says how to create them);
    * ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` differs from the dataset's class count.

    Raises:
        FileNotFoundError or ConfigError, with one message naming the file or key.
    """
    if not (resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))):
        check_weights(cfg.MODEL.WEIGHTS)
    for name in (list(cfg.DATASETS.TRAIN) if train else []) + list(cfg.DATASETS.TEST):
        try:
            check_dataset_exists(name)
        except KeyError as e:
            raise ConfigError(f"DATASETS: {e.args[0]}") from None
        check_num_classes(cfg, name)


def check_num_classes(cfg, dataset_name):
    """``ConfigError`` when ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` differs from the number of
    classes of ``dataset_name`` (its ``thing_classes`` for instance segmentation, else its
    ``stuff_classes``; not checked when the metadata has neither)."""
    metadata = MetadataCatalog.get(dataset_name)
    key = "thing_classes" if metadata.get("evaluator_type") in _INSTANCE_EVALUATORS else "stuff_classes"
    classes = metadata.get(key)
    if classes is not None and len(classes) != cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES:
        raise ConfigError(
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}, but dataset {dataset_name!r} "
            f"has {len(classes)} classes ({key}): set MODEL.SEM_SEG_HEAD.NUM_CLASSES {len(classes)}"
        )


def _environment_summary():
    import platform

    import detectron2

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, detectron2 {detectron2.__version__} "
        f"(without its C++ extension: {detectron2.__file__}), {device}, {torch.get_num_threads()} CPU threads"
    )


def setup_run(cfg, args):
    """detectron2's ``default_setup`` for this project: loggers (to ``OUTPUT_DIR/log.txt``, per
    rank), the arguments and full config logged, ``config.yaml`` saved, RNGs seeded with
    ``SEED + rank`` (``SEED < 0``: random).

    The console gets INFO and above; the full config, the model's repr (logged by the
    trainer) and the evaluators' per-class results are DEBUG lines, written to ``log.txt``
    only, or also to the console when ``args.verbose``.

    It differs in one point: the environment summary does not come from detectron2's
    ``collect_env_info``, which needs the C++ extension this installation lacks.
    """
    from detectron2.utils.env import seed_all_rng

    output_dir = cfg.OUTPUT_DIR
    if comm.is_main_process() and output_dir:
        os.makedirs(output_dir, exist_ok=True)
    rank = comm.get_rank()
    console_level = logging.DEBUG if getattr(args, "verbose", False) else logging.INFO
    for name in ("fvcore", "aff_seg", "detectron2"):
        for handler in setup_logger(output_dir, distributed_rank=rank, name=name).handlers:
            if getattr(handler, "stream", None) in (sys.stdout, sys.stderr):  # the console, not log.txt
                handler.setLevel(console_level)
    for name in _PER_CLASS_LOGGERS:
        per_class = logging.getLogger(name)
        if not any(isinstance(f, _PerClassToDebug) for f in per_class.filters):
            per_class.addFilter(_PerClassToDebug())
    logger = logging.getLogger("detectron2")
    logger.info(f"Rank of current process: {rank}. World size: {comm.get_world_size()}")
    logger.info(f"Environment: {_environment_summary()}")
    logger.info(f"Command line arguments: {args}")
    if comm.is_main_process() and output_dir:
        path = os.path.join(output_dir, "config.yaml")
        with open(path, "w") as f:
            f.write(cfg.dump())
        logger.info(f"Full config saved to {path}")
        logger.debug(f"Running with full config:\n{cfg.dump()}")
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK


# detectron2 evaluators that log per-class results at INFO
_PER_CLASS_LOGGERS = ("detectron2.evaluation.sem_seg_evaluation", "detectron2.evaluation.coco_evaluation",
                      "detectron2.evaluation.lvis_evaluation")


class _PerClassToDebug(logging.Filter):
    """Turns an evaluator's per-class output (``SemSegEvaluator``'s whole results dict, the
    per-category AP tables) into a DEBUG record, with numpy scalars written as plain numbers;
    the summary still reaches the console through detectron2's ``copypaste`` lines."""

    def filter(self, record):
        if isinstance(record.msg, dict) or str(record.msg).startswith("Per-category"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.msg = plain_numbers(record.msg)
        return True


def plain_numbers(value):
    """``value`` with numpy scalars (inside dicts, lists, tuples) as Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return type(value)((k, plain_numbers(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(plain_numbers(v) for v in value)
    return value


DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


def resolve_dist_backend(backend, device):
    """"nccl" or "gloo" for ``backend`` ("auto", "nccl", "gloo") and the model's ``device``.

    auto: NCCL when the model runs on CUDA and CUDA is available, gloo otherwise.
    """
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"dist backend must be 'auto', 'nccl' or 'gloo', got {backend!r}")
    if backend != "auto":
        return backend
    return "nccl" if torch.device(device).type == "cuda" and torch.cuda.is_available() else "gloo"


def _first_host(nodelist):
    """The first host of a Slurm node list: ``node[003-005,9]-ib,gpu1`` -> ``node003-ib``."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist)
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0] if ranges else ""
    return prefix + first + suffix


def launcher_environment(environ=None):
    """The process layout a cluster launcher gave this process, or None (started by hand).

    * torchrun (or ``torch.distributed.launch``): ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
      ``LOCAL_WORLD_SIZE``, rendezvous at ``MASTER_ADDR:MASTER_PORT`` (``env://``);
    * Slurm, ``srun`` with several tasks (one per process): ``SLURM_PROCID``, ``SLURM_LOCALID``,
      ``SLURM_NTASKS``, tasks per node from ``SLURM_NTASKS_PER_NODE`` (or
      ``SLURM_TASKS_PER_NODE``), rendezvous on the first host of ``SLURM_JOB_NODELIST`` (or
      ``MASTER_ADDR``) at ``MASTER_PORT`` (default: 20000 + job id mod 20000).

    Returns:
        dict with ``rank``, ``local_rank``, ``world_size``, ``local_world_size``, ``dist_url``
        and ``source`` ("torchrun" or "slurm"); None for a single process.
    """
    env = os.environ if environ is None else environ
    if all(k in env for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        layout = dict(rank=int(env["RANK"]), local_rank=int(env["LOCAL_RANK"]),
                      world_size=int(env["WORLD_SIZE"]),
                      local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
                      dist_url="env://", source="torchrun")
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        world_size = int(env["SLURM_NTASKS"])
        per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
        per_node = re.match(r"\d*", per_node).group()
        host = env.get("MASTER_ADDR") or _first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        layout = dict(rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", "0")),
                      world_size=world_size,
                      local_world_size=int(per_node) if per_node else world_size // int(env.get("SLURM_NNODES", "1")),
                      dist_url=f"tcp://{host}:{port}", source="slurm")
    else:
        return None
    if layout["world_size"] <= 1:
        return None
    if layout["world_size"] % layout["local_world_size"]:
        raise ValueError(f"{layout['source']}: {layout['world_size']} processes do not split into machines of "
                         f"{layout['local_world_size']} each")
    return layout


def launch(
    main_func,
    num_processes_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    backend="nccl",
    timeout=DEFAULT_TIMEOUT,
):
    """Run ``main_func(*args)`` in every process of a (possibly multi-machine) job.

    Like ``detectron2.engine.launch`` (which only knows NCCL on GPUs), with a ``backend``:
    "nccl" (one GPU per process) or "gloo" (CPU processes). With one process in all,
    ``main_func`` runs in this process and no process group is created; nothing then waits on
    a barrier.

    Under torchrun or Slurm (``launcher_environment``) this process is one of the job's: it
    joins the process group the environment describes and runs ``main_func`` itself; the
    machine/process arguments are then ignored.

    Args:
        num_processes_per_machine: processes started on this machine (GPUs for NCCL).
        dist_url: rendezvous URL, e.g. "tcp://127.0.0.1:50152"; "auto" picks a free local port
            (single machine only).
    """
    layout = launcher_environment()
    if layout is not None:
        logging.getLogger(__name__).info(
            f"{layout['source']}: process {layout['rank']} of {layout['world_size']} "
            f"({layout['local_world_size']} per machine), rendezvous {layout['dist_url']}"
        )
        _run_in_group(main_func, args, layout["rank"], layout["local_rank"], layout["world_size"],
                      layout["local_world_size"], layout["dist_url"], backend, timeout)
        return
    world_size = num_machines * num_processes_per_machine
    if world_size <= 1:
        main_func(*args)
        return
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url must be given explicitly for a multi-machine job")
        from detectron2.engine.launch import _find_free_port

        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if backend == "nccl" and num_processes_per_machine > torch.cuda.device_count():
        raise ValueError(
            f"{num_processes_per_machine} NCCL processes per machine need as many GPUs, "
            f"found {torch.cuda.device_count()}; use backend 'gloo' for CPU processes"
        )
    mp.spawn(
        _distributed_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args, backend, timeout),
        daemon=False,
    )


def _distributed_worker(
    local_rank, main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args, backend, timeout
):
    global_rank = machine_rank * num_processes_per_machine + local_rank
    _run_in_group(main_func, args, global_rank, local_rank, world_size, num_processes_per_machine, dist_url,
                  backend, timeout)


def _run_in_group(main_func, args, rank, local_rank, world_size, local_world_size, dist_url, backend, timeout):
    """Join the process group as ``rank`` (machines of ``local_world_size`` consecutive ranks),
    run ``main_func(*args)``, leave the group."""
    dist.init_process_group(
        backend=backend, init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout
    )
    # detectron2's comm.get_local_rank/size read the group of this machine's processes
    for machine in range(world_size // local_world_size):
        ranks = list(range(machine * local_world_size, (machine + 1) * local_world_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            comm._LOCAL_PROCESS_GROUP = group
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()
