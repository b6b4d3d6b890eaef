"""Training and evaluation harness: detectron2's ``DefaultTrainer`` for AFF / Mask2Former.

What it adds to ``DefaultTrainer``:

* the Mask2Former training mappers (``INPUT.DATASET_MAPPER_NAME``), the optimizer and
  schedules of ``aff_seg.solver``, bf16/fp16 autocast (``SOLVER.AMP``), and an evaluator per
  dataset ``evaluator_type`` (``build_evaluator``);
* CPU training, alone or as several processes (gloo): ``MODEL.DEVICE cpu`` builds DDP without
  device ids, and ``launch`` starts gloo or NCCL process groups;
* exact resumption: with ``SEED >= 0`` a run killed between checkpoints and restarted with
  ``--resume`` ends with the same weights as an uninterrupted run.  The training stream is a
  pure function of (seed, position): sample ``p`` of the stream is image ``perm_e[p mod N]``
  (``e = p div N``, one seeded permutation per epoch) and is augmented under an RNG seeded by
  ``(seed, p)``; each iteration's model randomness (drop path, point sampling) is seeded by
  ``(seed, iteration, rank)``; a resumed run starts the stream at ``start_iter x batch``.
  This holds for any number of loader workers, as long as aspect-ratio grouping cannot hold
  samples back (every shipped training pipeline crops to a fixed size).
"""
import contextlib
import datetime
import logging
import operator
import os
import random
import weakref
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.data import MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.build import worker_init_reset_seed
from detectron2.data.common import AspectRatioGroupedDataset, ToIterableDataset
from detectron2.engine import DefaultTrainer, HookBase, SimpleTrainer, TrainerBase, create_ddp_model
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
    LVISEvaluator,
    SemSegEvaluator,
)
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.utils.data import DataLoader, Dataset, Sampler

from .data.dataset_mappers import build_train_mapper
from .evaluation import SemanticSegmentorWithTTA
from .modeling.backbone import AFFCheckpointer
from .solver import MixedPrecisionTrainer, build_lr_scheduler, build_optimizer

__all__ = [
    "Trainer",
    "build_evaluator",
    "build_train_loader",
    "IterationSeed",
    "launch",
    "resolve_dist_backend",
    "setup_run",
]

_SEED_MODULUS = 2**31


def _mix_seed(*values):
    """A 31-bit seed from integers, different for different tuples (no Python hash salt)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(v) % 2**63 for v in values]))
    return int(rng.integers(_SEED_MODULUS))


@contextlib.contextmanager
def _seeded_rngs(seed):
    """Run a block with python/numpy/torch(CPU) RNGs seeded by ``seed``; restore them after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# ---------------------------------------------------------------------------------------------
# data


class _StreamPositions(Sampler):
    """Positions ``start + rank, start + rank + world, ...`` of an endless training stream."""

    def __init__(self, start, rank, world_size):
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self):
        position = self.start + self.rank
        while True:
            yield position
            position += self.world_size


class _AugmentedStream(Dataset):
    """Stream position -> mapped dataset dict, deterministic in (seed, position).

    Position p is image ``perm_e[p mod N]`` of a shuffled epoch e = p div N (``shuffle``) or
    image ``p mod N``, mapped with every RNG seeded by (seed, p).
    """

    def __init__(self, dataset_dicts, mapper, seed, shuffle=True):
        if len(dataset_dicts) == 0:
            raise ValueError("the training set is empty (check DATASETS.TRAIN)")
        self.dataset_dicts = dataset_dicts
        self.mapper = mapper
        self.seed = seed
        self.shuffle = shuffle
        self._epoch, self._order = None, None

    def _image_index(self, position):
        n = len(self.dataset_dicts)
        epoch, offset = divmod(position, n)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
            self._epoch, self._order = epoch, torch.randperm(n, generator=generator).tolist()
        return self._order[offset]

    def __len__(self):
        return len(self.dataset_dicts)

    def __getitem__(self, position):
        record = self.dataset_dicts[self._image_index(position)]
        with _seeded_rngs(_mix_seed(self.seed, position, 1)):
            mapped = self.mapper(record)
        if mapped is None:
            raise RuntimeError(f"the training mapper returned None for {record.get('file_name')}")
        return mapped


def build_train_loader(cfg, start_iter=0, mapper=None, seed=None):
    """The training loader of ``cfg``, positioned at iteration ``start_iter``.

    Args:
        cfg: the config (DATASETS.TRAIN, SOLVER.IMS_PER_BATCH, DATALOADER.*).
        start_iter: first iteration the loader serves (a resumed run passes its next iteration).
        mapper: dataset dict -> model input; default: ``INPUT.DATASET_MAPPER_NAME``'s mapper.
        seed: stream seed; default ``cfg.SEED`` (or a seed shared by all ranks if it is < 0).

    Returns:
        an endless iterable of per-rank batches (lists of mapped dicts).
    """
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN!r}: only 'TrainingSampler' is supported"
        )
    if mapper is None:
        mapper = build_train_mapper(cfg)
    if seed is None:
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    dataset_dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    )
    stream = _AugmentedStream(dataset_dicts, mapper, seed)
    world_size = comm.get_world_size()
    total_batch = cfg.SOLVER.IMS_PER_BATCH
    if total_batch % world_size:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={total_batch} is not divisible by the {world_size} processes")
    positions = _StreamPositions(start_iter * total_batch, comm.get_rank(), world_size)
    # detectron2's build_batch_data_loader, plus a generator of the loader's own: otherwise
    # starting the loader draws from the global torch RNG (the step's seeded RNG on a resume)
    loader = DataLoader(
        ToIterableDataset(stream, positions),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=operator.itemgetter(0),  # single dicts; batched below
        worker_init_fn=worker_init_reset_seed,
        generator=torch.Generator().manual_seed(_mix_seed(seed, comm.get_rank(), 3)),
    )
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        return AspectRatioGroupedDataset(loader, total_batch // world_size)
    return _batched(loader, total_batch // world_size)


def _batched(iterable, batch_size):
    """Endless lists of ``batch_size`` consecutive items."""
    iterator = iter(iterable)
    while True:
        yield [next(iterator) for _ in range(batch_size)]


class IterationSeed(HookBase):
    """Seed python/numpy/torch RNGs before each step from (seed, iteration, rank), so the model's
    randomness in a step does not depend on how the run got there (fresh or resumed)."""

    def __init__(self, seed):
        self.seed = seed

    def before_step(self):
        step_seed = _mix_seed(self.seed, self.trainer.iter, comm.get_rank(), 2)
        random.seed(step_seed)
        np.random.seed(step_seed)
        torch.manual_seed(step_seed)


# ---------------------------------------------------------------------------------------------
# evaluation


def build_evaluator(cfg, dataset_name, output_folder=None):
    """The evaluator(s) for ``dataset_name``, chosen by its metadata ``evaluator_type``.

    sem_seg -> SemSegEvaluator; coco -> COCOEvaluator (segm, pure-Python COCOeval); lvis ->
    LVISEvaluator (segm); coco_panoptic_seg / cityscapes_panoptic_seg -> the panoptic evaluator
    plus instance and semantic ones for each ``MODEL.MASK_FORMER.TEST.*_ON`` that is set;
    cityscapes_instance / cityscapes_sem_seg -> cityscapesscripts' evaluators.
    Instance masks are scored as ``segm`` only: the model's boxes are placeholders.
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    test = cfg.MODEL.MASK_FORMER.TEST
    evaluator_type = MetadataCatalog.get(dataset_name).evaluator_type

    def coco_instances():
        return COCOEvaluator(dataset_name, tasks=("segm",), output_dir=output_folder, use_fast_impl=False)

    evaluators = []
    if evaluator_type == "sem_seg":
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    elif evaluator_type == "coco":
        evaluators.append(coco_instances())
    elif evaluator_type == "lvis":
        evaluators.append(LVISEvaluator(dataset_name, tasks=("segm",), output_dir=output_folder))
    elif evaluator_type == "cityscapes_instance":
        evaluators.append(CityscapesInstanceEvaluator(dataset_name))
    elif evaluator_type == "cityscapes_sem_seg":
        evaluators.append(CityscapesSemSegEvaluator(dataset_name))
    elif evaluator_type == "coco_panoptic_seg":
        if test.PANOPTIC_ON:
            evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
        if test.INSTANCE_ON:
            evaluators.append(coco_instances())
        if test.SEMANTIC_ON:
            evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    elif evaluator_type == "cityscapes_panoptic_seg":
        if test.PANOPTIC_ON:
            evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
        if test.SEMANTIC_ON:
            evaluators.append(CityscapesSemSegEvaluator(dataset_name))
        if test.INSTANCE_ON:
            evaluators.append(CityscapesInstanceEvaluator(dataset_name))
    if not evaluators:
        raise NotImplementedError(
            f"no evaluator for dataset {dataset_name!r} of evaluator_type {evaluator_type!r} "
            f"with MODEL.MASK_FORMER.TEST flags {dict(test)}"
        )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


# ---------------------------------------------------------------------------------------------
# trainer


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with the Mask2Former data, solver, AMP and evaluators (see module doc)."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__ with two changes: DDP gets device ids only on CUDA (CPU
        # processes use gloo), and the step runs in the precision of SOLVER.AMP.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cuda = torch.device(cfg.MODEL.DEVICE).type == "cuda"
        model = create_ddp_model(
            model, broadcast_buffers=False, device_ids=[comm.get_local_rank()] if on_cuda else None
        )
        if cfg.SOLVER.AMP.ENABLED:
            self._trainer = MixedPrecisionTrainer.from_config(cfg, model, data_loader, optimizer)
        else:
            self._trainer = SimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AFFCheckpointer(
            model, cfg.OUTPUT_DIR, strict=cfg.MODEL.WEIGHTS_STRICT, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if self.start_iter > 0:
            # continue the training stream where the checkpointed run left it
            loader = self.build_train_loader(self.cfg, start_iter=self.start_iter)
            self._trainer.data_loader = loader
            self._trainer._data_loader_iter = iter(loader)

    def state_dict(self):
        # detectron2 0.6 checkpoints only the iteration and hook states; the optimizer (AdamW
        # moments, current learning rates) and the fp16 grad scaler live in the step trainer
        state = super().state_dict()
        state["_trainer"] = self._trainer.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    def build_hooks(self):
        hooks = super().build_hooks()
        if self.cfg.SEED >= 0:
            hooks.insert(0, IterationSeed(self.cfg.SEED))
        return hooks

    @classmethod
    def build_train_loader(cls, cfg, start_iter=0):
        return build_train_loader(cfg, start_iter=start_iter)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate ``model`` wrapped in ``SemanticSegmentorWithTTA``; keys get a ``_TTA`` suffix."""
        logging.getLogger("detectron2.trainer").info("Running inference with test-time augmentation ...")
        tta_model = SemanticSegmentorWithTTA(cfg, model)
        evaluators = [
            cls.build_evaluator(cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA"))
            for name in cfg.DATASETS.TEST
        ]
        results = cls.test(cfg, tta_model, evaluators)
        return OrderedDict((name + "_TTA", value) for name, value in results.items())


# ---------------------------------------------------------------------------------------------
# processes


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

    It differs in one point: the environment summary does not come from detectron2's
    ``collect_env_info``, which needs the C++ extension this installation lacks.
    """
    from detectron2.utils.env import seed_all_rng

    output_dir = cfg.OUTPUT_DIR
    if comm.is_main_process() and output_dir:
        os.makedirs(output_dir, exist_ok=True)
    rank = comm.get_rank()
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    setup_logger(output_dir, distributed_rank=rank, name="aff_seg")
    logger = setup_logger(output_dir, distributed_rank=rank)
    logger.info(f"Rank of current process: {rank}. World size: {comm.get_world_size()}")
    logger.info(f"Environment: {_environment_summary()}")
    logger.info(f"Command line arguments: {args}")
    if comm.is_main_process() and output_dir:
        path = os.path.join(output_dir, "config.yaml")
        with open(path, "w") as f:
            f.write(cfg.dump())
        logger.info(f"Running with full config:\n{cfg.dump()}\nsaved to {path}")
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK

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

    Args:
        num_processes_per_machine: processes started on this machine (GPUs for NCCL).
        dist_url: rendezvous URL, e.g. "tcp://127.0.0.1:50152"; "auto" picks a free local port
            (single machine only).
    """
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
    dist.init_process_group(
        backend=backend, init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout
    )
    # detectron2's comm.get_local_rank/size read the group of this machine's processes
    for machine in range(world_size // num_processes_per_machine):
        ranks = list(range(machine * num_processes_per_machine, (machine + 1) * num_processes_per_machine))
        group = dist.new_group(ranks)
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()
