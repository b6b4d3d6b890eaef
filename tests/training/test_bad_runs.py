"""Runs that cannot go on stop with a clear message: a diverging run with detectron2's own
NaN-loss message, a resume into another architecture before any optimizer state is touched."""
import pytest
from detectron2.utils.env import seed_all_rng

from aff_seg.checkpoint import CheckpointMismatchError, load_weights_file
from aff_seg.engine import Trainer

from .conftest import tiny_cfg

pytestmark = pytest.mark.slow


def test_diverging_run_stops_with_detectron2s_nan_loss_message(registered_root, tmp_path):
    cfg = tiny_cfg("ade20k_semantic", tmp_path, "SOLVER.BASE_LR", "1e4", "SOLVER.MAX_ITER", "30",
                   "SOLVER.CHECKPOINT_PERIOD", "1000")
    seed_all_rng(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError, match="Loss became infinite or NaN"):
        trainer.train()
    assert trainer.iter < 29


def test_resume_into_another_architecture_is_refused(registered_root, tmp_path):
    trainer = Trainer(tiny_cfg("ade20k_semantic", tmp_path, "SOLVER.MAX_ITER", "1", "SOLVER.CHECKPOINT_PERIOD", "1"))
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert "tensor_checksum" in load_weights_file(str(tmp_path / "model_final.pth"))  # written by the trainer
    for strict in ("True", "False"):  # the optimizer state cannot fit either way
        other = Trainer(tiny_cfg("ade20k_semantic", tmp_path, "MODEL.AFF.EMBED_DIM", "[16, 32, 32, 48]",
                                 "MODEL.AFF.NUM_HEADS", "[1, 2, 2, 3]", "MODEL.WEIGHTS_STRICT", strict))
        with pytest.raises(CheckpointMismatchError, match="cannot resume from .*model_final.pth.*trainer"):
            other.resume_or_load(resume=True)
