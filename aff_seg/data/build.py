"""The training data stream: an endless, seeded, resumable sequence of mapped batches.

The stream is a pure function of (seed, position): sample ``p`` of the stream is image
``perm_e[p mod N]`` (``e = p div N``, one seeded permutation per epoch) and is augmented under an
RNG seeded by ``(seed, p)``; a resumed run starts the stream at ``start_iter x batch``.  This
holds for any number of loader workers, as long as aspect-ratio grouping cannot hold samples back
(every shipped training pipeline crops to a fixed size).  Together with ``IterationSeed``
(``aff_seg.engine.hooks``) it makes a run killed between checkpoints and restarted with
``--resume`` end with the same weights as an uninterrupted one.
"""
import contextlib
import operator
import random

import numpy as np
import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.data.build import worker_init_reset_seed
from detectron2.data.common import AspectRatioGroupedDataset, ToIterableDataset
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset, Sampler

from .dataset_mappers import build_train_mapper

__all__ = ["build_train_loader", "mix_seed"]

_SEED_MODULUS = 2**31


def mix_seed(*values):
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
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._epoch, self._order = epoch, torch.randperm(n, generator=generator).tolist()
        return self._order[offset]

    def __len__(self):
        return len(self.dataset_dicts)

    def __getitem__(self, position):
        record = self.dataset_dicts[self._image_index(position)]
        with _seeded_rngs(mix_seed(self.seed, position, 1)):
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
        generator=torch.Generator().manual_seed(mix_seed(seed, comm.get_rank(), 3)),
    )
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        return AspectRatioGroupedDataset(loader, total_batch // world_size)
    return _batched(loader, total_batch // world_size)


def _batched(iterable, batch_size):
    """Endless lists of ``batch_size`` consecutive items."""
    iterator = iter(iterable)
    while True:
        yield [next(iterator) for _ in range(batch_size)]
