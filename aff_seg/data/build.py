"""The training data stream: an endless, seeded, resumable sequence of mapped batches.

The stream is a pure function of (seed, position): sample ``p`` of the stream is image
``perm_e[p mod N]`` (``e = p div N``, one seeded permutation per epoch), is augmented under an
RNG seeded by ``(seed, p)``, and carries ``seed``, the seed of its own generator for the model's
random draws (``aff_seg.modeling.image_rng``).  Iteration ``i`` trains on the global batch of
positions ``i * IMS_PER_BATCH ...``, split in consecutive parts over the processes: the samples,
their augmentation and their draws do not depend on the number of processes.

Aspect-ratio grouping (``DATALOADER.ASPECT_RATIO_GROUPING``) groups as detectron2's
``AspectRatioGroupedDataset`` does (a landscape and a portrait bucket; a batch is whichever
bucket fills first), but over the global batch instead of each process's, and decided in the
sampler, from each image's size before mapping, instead of buffering mapped samples.  The
batches are then a pure function of (seed, iteration, rank) too: a resumed run replays the
grouping (image sizes only, nothing is mapped) up to its first iteration and starts there, and
no buffer has to be in the checkpoint.  This holds for any number of loader workers.  Together
with ``IterationSeed`` (``aff_seg.engine.hooks``) it makes a run killed at any iteration and
restarted with ``--resume`` end with the same weights as an uninterrupted one.
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
    """This process's part (the ``rank``-th of ``world_size``) of the consecutive global batches
    of ``total_batch`` positions of an endless training stream, from batch ``start_batch``."""

    def __init__(self, total_batch, start_batch, rank, world_size):
        self.total_batch, self.start_batch = total_batch, start_batch
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        part = self.total_batch // self.world_size
        for batch in itertools.count(self.start_batch):
            first = batch * self.total_batch + self.rank * part
            yield from range(first, first + part)


class _GroupedStreamPositions(Sampler):
    """The stream positions reordered into global batches of ``total_batch`` images of one
    orientation, as ``AspectRatioGroupedDataset`` forms them; this process's part of each (the
    ``rank``-th of ``world_size``); the first ``start_batch`` batches are skipped (replayed from
    the image sizes alone)."""

    def __init__(self, stream, total_batch, start_batch, rank, world_size):
        self.stream, self.total_batch, self.start_batch = stream, total_batch, start_batch
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        part = self.total_batch // self.world_size
        buckets = ([], [])  # landscape (width > height), other
        batches = 0
        for position in itertools.count():
            bucket = buckets[self.stream.orientation(position)]
            bucket.append(position)
            if len(bucket) == self.total_batch:
                if batches >= self.start_batch:
                    yield from bucket[self.rank * part:(self.rank + 1) * part]
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
        mapped["seed"] = mix_seed(self.seed, position, 4)  # the sample's generator in the model
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
    positions = (_GroupedStreamPositions(stream, total_batch, start_iter, comm.get_rank(), world_size)
                 if cfg.DATALOADER.ASPECT_RATIO_GROUPING
                 else _StreamPositions(total_batch, start_iter, comm.get_rank(), world_size))
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
