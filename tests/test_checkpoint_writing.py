"""AFFCheckpointer writes atomically and resumes past a truncated or corrupted last checkpoint."""
import logging
import os

import pytest
import torch
from torch import nn

from aff_seg.checkpoint import AFFCheckpointer


def _checkpointer(folder, value):
    model = nn.Linear(2, 2)
    nn.init.constant_(model.weight, value)
    return AFFCheckpointer(model, save_dir=str(folder))


def _saved_run(folder):
    """Checkpoints of iterations 1, 3 and 5 (weights 1, 3, 5); last_checkpoint names iteration 5."""
    for iteration in (1, 3, 5):
        _checkpointer(folder, iteration).save(f"model_{iteration:07d}")
    assert (folder / "last_checkpoint").read_text() == "model_0000005.pth"


def _resumed_weight(folder):
    checkpointer = _checkpointer(folder, 0)
    checkpointer.resume_or_load("", resume=True)
    return checkpointer.model.weight[0, 0].item()


def test_resume_takes_the_last_checkpoint(tmp_path):
    _saved_run(tmp_path)
    assert _resumed_weight(tmp_path) == 5


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    _saved_run(tmp_path)
    last = tmp_path / "model_0000005.pth"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\0" * len(data))
    with caplog.at_level(logging.WARNING, logger="aff_seg.checkpoint"):
        assert _resumed_weight(tmp_path) == 3
    assert f"{last} is truncated or corrupted; resuming from {tmp_path / 'model_0000003.pth'}" in caplog.text


def test_no_complete_checkpoint_stops_naming_the_file(tmp_path):
    _saved_run(tmp_path)
    for iteration in (1, 3, 5):
        path = tmp_path / f"model_{iteration:07d}.pth"
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=f"checkpoint {tmp_path / 'model_0000005.pth'} .*truncated"):
        _resumed_weight(tmp_path)


def test_a_save_killed_midway_leaves_the_previous_state(tmp_path, monkeypatch):
    _saved_run(tmp_path)

    def killed_while_writing(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        _checkpointer(tmp_path, 7).save("model_0000007")
    assert not (tmp_path / "model_0000007.pth").exists()
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth", "model_0000003.pth",
                                            "model_0000005.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000005.pth"
