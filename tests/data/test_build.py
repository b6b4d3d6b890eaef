"""The training stream with aspect-ratio grouping: batches of one orientation that a loader
started at any iteration reproduces exactly (nothing buffered has to be checkpointed)."""
import random

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from aff_seg import load_config
from aff_seg.data.build import build_train_loader

NAME = "orientation_stream_train"
# (width, height): landscape, portrait and square images in an irregular order
SIZES = [(64, 32), (32, 64), (48, 48), (80, 40), (40, 80), (64, 32), (30, 60), (90, 45), (50, 50),
         (70, 35), (36, 72)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("orientation")
    records = []
    for index, (width, height) in enumerate(SIZES):
        record = {"index": index, "file_name": str(folder / f"{index}.png")}
        if index % 3:  # the others' size comes from the file header, as for ADE20K records
            record.update(width=width, height=height)
        Image.new("RGB", (width, height)).save(record["file_name"])
        records.append(record)
    DatasetCatalog.register(NAME, lambda: [dict(r) for r in records])
    yield
    DatasetCatalog.remove(NAME)


def _mapper(record):
    """A stand-in for a training mapper: the image's index and size plus a random draw (which
    the stream seeds by position)."""
    width, height = SIZES[record["index"]]
    return {"index": record["index"], "width": width, "height": height,
            "draw": (random.random(), float(np.random.rand()))}


def _batches(dataset_fixture, start_iter, count, workers=0, grouping=True):
    cfg = load_config(None, ["DATASETS.TRAIN", f"('{NAME}',)", "SOLVER.IMS_PER_BATCH", "3", "SEED", "7",
                             "DATALOADER.NUM_WORKERS", str(workers), "DATALOADER.ASPECT_RATIO_GROUPING", str(grouping)])
    loader = iter(build_train_loader(cfg, start_iter=start_iter, mapper=_mapper))
    return [[(d["index"], d["draw"]) for d in next(loader)] for _ in range(count)]


def test_batches_have_one_orientation(dataset):
    batches = _batches(dataset, 0, 12)
    for batch in batches:
        assert len({SIZES[i][0] > SIZES[i][1] for i, _ in batch}) == 1, batch
    # grouping held images back: the order differs from the ungrouped stream's
    assert batches != _batches(dataset, 0, 12, grouping=False)


@pytest.mark.parametrize("start_iter", [1, 2, 5, 9])
def test_a_loader_started_at_any_iteration_continues_the_stream(dataset, start_iter):
    uninterrupted = _batches(dataset, 0, start_iter + 3)
    assert _batches(dataset, start_iter, 3) == uninterrupted[start_iter:]


def test_loader_workers_do_not_change_the_batches(dataset):
    assert _batches(dataset, 3, 4, workers=2) == _batches(dataset, 3, 4)


@pytest.mark.parametrize("grouping", [True, False])
def test_processes_split_the_global_batch_without_changing_it(dataset, monkeypatch, grouping):
    """Two processes with 2 images each get, per iteration, the two halves of the batch of 4 of
    one process: the same images, augmentation draws and model seeds (``seed``)."""
    from detectron2.utils import comm

    def batches(world_size, rank, start_iter):
        monkeypatch.setattr(comm, "get_world_size", lambda: world_size)
        monkeypatch.setattr(comm, "get_rank", lambda: rank)
        cfg = load_config(None, ["DATASETS.TRAIN", f"('{NAME}',)", "SOLVER.IMS_PER_BATCH", "4", "SEED", "7",
                                 "DATALOADER.NUM_WORKERS", "0", "DATALOADER.ASPECT_RATIO_GROUPING", str(grouping)])
        loader = iter(build_train_loader(cfg, start_iter=start_iter, mapper=_mapper))
        return [[(d["index"], d["draw"], d["seed"]) for d in next(loader)] for _ in range(6)]

    for start_iter in (0, 3):
        one = batches(1, 0, start_iter)
        halves = [batches(2, rank, start_iter) for rank in (0, 1)]
        assert [first + second for first, second in zip(*halves)] == one
        assert len({seed for batch in one for _, _, seed in batch}) == 4 * 6  # a seed per sample
