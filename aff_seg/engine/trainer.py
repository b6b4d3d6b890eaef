"""Training and evaluation harness: detectron2's ``DefaultTrainer`` for AFF / Mask2Former.

What it adds to ``DefaultTrainer``:

* the Mask2Former training mappers (``INPUT.DATASET_MAPPER_NAME``) in a seeded, resumable stream
  (``aff_seg.data.build``), the optimizer and schedules of ``aff_seg.solver``, bf16/fp16
  autocast (``SOLVER.AMP``), and an evaluator per dataset ``evaluator_type``
  (``aff_seg.evaluation.build``);
* CPU training, alone or as several processes (gloo): ``MODEL.DEVICE cpu`` builds DDP without
  device ids (processes are started by ``aff_seg.engine.launch``);
* exact resumption: with ``SEED >= 0`` a run killed between checkpoints and restarted with
  ``--resume`` ends with the same weights as an uninterrupted run: the training stream is a
  pure function of (seed, position), each iteration's model randomness (drop path, point
  sampling) is seeded by ``(seed, iteration, rank)`` (``IterationSeed``), and the checkpoint
  holds the optimizer and grad-scaler state.
"""
import logging
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import AFFCheckpointer
from ..data.build import build_train_loader
from ..evaluation import SemanticSegmentorWithTTA, SlidingWindowInference, build_evaluator
from ..solver import MixedPrecisionTrainer, build_lr_scheduler, build_optimizer
from ..predictor import AutocastInference
from .hooks import IterationSeed
from .launch import plain_numbers

__all__ = ["Trainer"]


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
        # the optimizer first: the LR scheduler (a hook) then sets the rates of its schedule,
        # which may be longer than the saved run's (SOLVER.MAX_ITER raised on --resume)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        super().load_state_dict(state_dict)

    def build_hooks(self):
        hooks = super().build_hooks()
        if self.cfg.SEED >= 0:
            hooks.insert(0, IterationSeed(self.cfg.SEED))
        return hooks

    @classmethod
    def build_model(cls, cfg):
        """detectron2's ``build_model``; its repr goes to the log file (DEBUG), not the console."""
        model = build_model(cfg)
        logging.getLogger(__name__).debug(f"Model:\n{model}")
        return model

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
    def test(cls, cfg, model, evaluators=None):
        """``DefaultTrainer.test``; with ``TEST.AMP.ENABLED`` the model runs under bf16/fp16
        autocast (outputs handed to the evaluators in float32); with ``TEST.SLIDING_WINDOW.ENABLED``
        it runs on sliding windows (test-time augmentation, ``test_with_TTA``, stays whole-image);
        metrics as plain numbers."""
        if cfg.TEST.SLIDING_WINDOW.ENABLED and not isinstance(model, SemanticSegmentorWithTTA):
            model = SlidingWindowInference.from_config(cfg, model)
        if cfg.TEST.AMP.ENABLED:
            model = AutocastInference(cfg, model)
        return plain_numbers(super().test(cfg, model, evaluators))

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
