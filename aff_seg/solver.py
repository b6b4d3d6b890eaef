"""Optimizer, learning-rate schedule and mixed-precision training step (cfg.SOLVER.*).

* ``build_optimizer``: SGD or AdamW; the backbone's learning rate is scaled by
  ``BACKBONE_MULTIPLIER``; norm layers get ``WEIGHT_DECAY_NORM`` and embeddings
  ``WEIGHT_DECAY_EMBED`` (0 in every shipped config), as do relative position bias tables and
  absolute position embeddings (parameter names with ``POSITION_EMBED_NAMES``, as Mask2Former
  treats Swin's; Focal's three bias tables included); everything else, the AFF blank tokens,
  Shepard powers and position-embedding linears included, gets ``WEIGHT_DECAY``.
  ``CLIP_GRADIENTS`` with ``CLIP_TYPE: full_model`` clips the L2 norm of all gradients together
  (detectron2 itself clips per parameter only); other clip types go to detectron2.
* ``build_lr_scheduler``: ``WarmupPolyLR`` (the DeepLab project's, whose length always follows
  ``SOLVER.MAX_ITER``, see ``WarmupPolyLR``) or detectron2's multistep/cosine.
* ``MixedPrecisionTrainer``: detectron2's training step under ``torch.autocast`` with the
  dtype of ``SOLVER.AMP.PRECISION`` (bfloat16 or float16) on any device; a gradient scaler is
  used for float16 only (bfloat16 has float32's exponent range).
"""
import time

import torch
from detectron2.engine import SimpleTrainer
from detectron2.projects.deeplab import build_lr_scheduler as _build_deeplab_lr_scheduler
from detectron2.projects.deeplab.lr_scheduler import WarmupPolyLR as _DeepLabWarmupPolyLR
from detectron2.solver.build import maybe_add_gradient_clipping

__all__ = [
    "NORM_MODULE_TYPES",
    "AMP_DTYPES",
    "build_optimizer",
    "build_lr_scheduler",
    "MixedPrecisionTrainer",
    "WarmupPolyLR",
]

NORM_MODULE_TYPES = (
    torch.nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm, NaiveSyncBatchNorm
    torch.nn.GroupNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)

# parameters (by name) that decay like embeddings
POSITION_EMBED_NAMES = ("relative_position_bias_table", "absolute_pos_embed")

# SOLVER.AMP.PRECISION -> autocast dtype
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _param_groups(cfg, model):
    """One group per distinct (lr, weight_decay), in first-seen order; shared params once."""
    groups = {}
    seen = set()
    for module_name, module in model.named_modules():
        for name, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in seen:
                continue
            seen.add(value)
            lr = cfg.SOLVER.BASE_LR
            if "backbone" in module_name:
                lr = lr * cfg.SOLVER.BACKBONE_MULTIPLIER
            weight_decay = cfg.SOLVER.WEIGHT_DECAY
            if isinstance(module, NORM_MODULE_TYPES):
                weight_decay = cfg.SOLVER.WEIGHT_DECAY_NORM
            elif isinstance(module, torch.nn.Embedding) or any(k in f"{module_name}.{name}" for k in POSITION_EMBED_NAMES):
                weight_decay = cfg.SOLVER.WEIGHT_DECAY_EMBED
            groups.setdefault((lr, weight_decay), []).append(value)
    return [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]


def _with_full_model_clipping(optimizer_type, max_norm, norm_type):
    """Subclass of ``optimizer_type`` whose ``step`` first clips the norm of all gradients."""

    class FullModelGradientClipping(optimizer_type):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = f"FullModelGradientClipping{optimizer_type.__name__}"
    return FullModelGradientClipping


def build_optimizer(cfg, model):
    """The optimizer named by ``cfg.SOLVER.OPTIMIZER`` ("SGD" or "ADAMW") for ``model``."""
    groups = _param_groups(cfg, model)
    name = cfg.SOLVER.OPTIMIZER
    if name == "SGD":
        optimizer_type, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM}
    elif name == "ADAMW":
        optimizer_type, kwargs = torch.optim.AdamW, {}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER={name!r} is not one of 'SGD', 'ADAMW'")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        if clip.CLIP_VALUE > 0:
            optimizer_type = _with_full_model_clipping(optimizer_type, clip.CLIP_VALUE, clip.NORM_TYPE)
        return optimizer_type(groups, cfg.SOLVER.BASE_LR, **kwargs)
    return maybe_add_gradient_clipping(cfg, optimizer_type)(groups, cfg.SOLVER.BASE_LR, **kwargs)


class WarmupPolyLR(_DeepLabWarmupPolyLR):
    """The DeepLab project's warmup + poly schedule, ``lr(t) = base * (1 - t / max_iters)^power``,
    with two changes for resuming:

    * ``max_iters`` is the config's ``SOLVER.MAX_ITER`` also after loading a checkpoint (the
      checkpoint's value is ignored), so ``--resume`` with a larger ``MAX_ITER`` continues on the
      longer schedule: from the resumed iteration t the rate is ``base * (1 - t / MAX_ITER)^power``
      (higher than the shorter run had at t; warmup is not repeated);
    * past ``max_iters`` the rate is 0 instead of a math domain error.
    """

    def load_state_dict(self, state_dict):
        max_iters = self.max_iters
        super().load_state_dict(state_dict)
        self.max_iters = max_iters
        # the rate of the resumed iteration on this schedule, also in the optimizer (load the
        # optimizer's state first: it holds the rates of the run that saved it)
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def get_lr(self):
        if self.last_epoch >= self.max_iters:
            return [0.0 for _ in self.base_lrs]
        return super().get_lr()


def build_lr_scheduler(cfg, optimizer):
    """``WarmupPolyLR`` (power ``SOLVER.POLY_LR_POWER``) or detectron2's schedules."""
    if cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR":
        return WarmupPolyLR(
            optimizer,
            cfg.SOLVER.MAX_ITER,
            warmup_factor=cfg.SOLVER.WARMUP_FACTOR,
            warmup_iters=cfg.SOLVER.WARMUP_ITERS,
            warmup_method=cfg.SOLVER.WARMUP_METHOD,
            power=cfg.SOLVER.POLY_LR_POWER,
            constant_ending=cfg.SOLVER.POLY_LR_CONSTANT_ENDING,
        )
    return _build_deeplab_lr_scheduler(cfg, optimizer)


class MixedPrecisionTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose forward pass runs under ``torch.autocast(device, dtype)``.

    ``dtype`` is torch.bfloat16 or torch.float16; float16 scales the loss with a
    ``torch.amp.GradScaler`` (whose state is checkpointed), bfloat16 needs none.
    """

    def __init__(self, model, data_loader, optimizer, *, dtype, device_type):
        """
        Args:
            model, data_loader, optimizer: as for ``SimpleTrainer``.
            dtype: torch.bfloat16 or torch.float16.
            device_type: "cuda" or "cpu" (where autocast applies).
        """
        if dtype not in AMP_DTYPES.values():
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        super().__init__(model, data_loader, optimizer)
        self.dtype = dtype
        self.device_type = device_type
        self.grad_scaler = (
            torch.amp.GradScaler(device_type) if dtype == torch.float16 else None
        )

    @classmethod
    def from_config(cls, cfg, model, data_loader, optimizer):
        precision = cfg.SOLVER.AMP.PRECISION
        if precision not in AMP_DTYPES:
            raise ValueError(f"SOLVER.AMP.PRECISION={precision!r} is not one of {sorted(AMP_DTYPES)}")
        device_type = torch.device(cfg.MODEL.DEVICE).type
        return cls(model, data_loader, optimizer, dtype=AMP_DTYPES[precision], device_type=device_type)

    def run_step(self):
        assert self.model.training, "[MixedPrecisionTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                loss_dict = {"total_loss": loss_dict}
            losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        if self.grad_scaler is None:
            losses.backward()
            self._write_metrics(loss_dict, data_time)
            self.optimizer.step()
        else:
            self.grad_scaler.scale(losses).backward()
            self._write_metrics(loss_dict, data_time)
            # step() unscales first, so full-model clipping inside optimizer.step sees true grads
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
