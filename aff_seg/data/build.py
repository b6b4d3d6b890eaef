"""The training data stream: an endless, seeded, resumable sequence of mapped batches.

The stream is a pure function of (seed, position): sample ``p`` of the stream is image
``perm_e[p mod N]`` (``e = p div N``, one seeded permutation per epoch) and is augmented under an
RNG seeded by ``(seed, p)``.

Aspect-ratio grouping (``DATALOADER.ASPECT_RATIO_GROUPING``) groups as detectron2's
``AspectRatioGroupedDataset`` does (a landscape and a portrait bucket per process; a batch is
whichever bucket fills first), but decides it in the sampler, from each image's size before
mapping, instead of buffering mapped samples.  The batches are then a pure function of (seed,
iteration, rank) too: a resumed run replays the grouping (image sizes only, nothing is mapped)
up to its first iteration and starts there, and no buffer has to be in the checkpoint.  This
holds for any number of loader workers.  Together with ``IterationSeed``
(``aff_seg.engine.hooks``) it makes a run killed at any iteration and restarted with
``--resume`` end with the same weights as an uninterrupted one.
"""
import contextlib
import itertools
import operator
import random

import numpy as np
import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.data.build import worker_init_reset_seed
from detectron2.data.common import ToIterableDataset
from detectron2.utils import comm
from PIL import Image
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


class _GroupedStreamPositions(Sampler):
    """This process's stream positions (``rank, rank + world, ...``) reordered into batches of
    ``batch_size`` images of one orientation, as ``AspectRatioGroupedDataset`` forms them; the
    first ``start_batch`` batches are skipped (replayed from the image sizes alone)."""

    def __init__(self, stream, batch_size, start_batch, rank, world_size):
        self.stream, self.batch_size, self.start_batch = stream, batch_size, start_batch
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        buckets = ([], [])  # landscape (width > height), other
        batches = 0
        for position in itertools.count(self.rank, self.world_size):
            bucket = buckets[self.stream.orientation(position)]
            bucket.append(position)
            if len(bucket) == self.batch_size:
                if batches >= self.start_batch:
                    yield from bucket
                batches += 1
                bucket.clear()


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
        self._orders = {}  # epoch -> image order, for the last few epochs
        self._orientations = {}  # image index -> 0 (landscape) or 1

    def _image_index(self, position):
        n = len(self.dataset_dicts)
        epoch, offset = divmod(position, n)
        if not self.shuffle:
            return offset
        if epoch not in self._orders:
            if len(self._orders) >= 4:  # grouped batches straddle at most two epochs
                del self._orders[min(self._orders)]
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._orders[epoch] = torch.randperm(n, generator=generator).tolist()
        return self._orders[epoch][offset]

    def orientation(self, position):
        """The bucket of ``AspectRatioGroupedDataset`` for the image at ``position``: 0 when it
        is wider than high, else 1; from the record's ``width``/``height`` or the file's header
        (EXIF rotation applied, as ``detection_utils.read_image`` does)."""
        index = self._image_index(position)
        if index not in self._orientations:
            record = self.dataset_dicts[index]
            if "width" in record and "height" in record:
                width, height = record["width"], record["height"]
            else:
                with Image.open(record["file_name"]) as image:
                    width, height = image.size
                    if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                        width, height = height, width
            self._orientations[index] = 0 if width > height else 1
        return self._orientations[index]

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
    batch_size = total_batch // world_size
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        positions = _GroupedStreamPositions(stream, batch_size, start_iter, comm.get_rank(), world_size)
    else:
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
    return _batched(loader, batch_size)


def _batched(iterable, batch_size):
    """Endless lists of ``batch_size`` consecutive items."""
    iterator = iter(iterable)
    while True:
        yield [next(iterator) for _ in range(batch_size)]
