"""A diverging run stops with detectron2's own NaN-loss message, not an error from the model."""
import pytest
from detectron2.utils.env import seed_all_rng

from aff_seg.engine import Trainer

from .conftest import tiny_cfg


@pytest.mark.slow
def test_diverging_run_stops_with_detectron2s_nan_loss_message(registered_root, tmp_path):
    cfg = tiny_cfg("ade20k_semantic", tmp_path, "SOLVER.BASE_LR", "1e4", "SOLVER.MAX_ITER", "30",
                   "SOLVER.CHECKPOINT_PERIOD", "1000")
    seed_all_rng(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError, match="Loss became infinite or NaN"):
        trainer.train()
    assert trainer.iter < 29
