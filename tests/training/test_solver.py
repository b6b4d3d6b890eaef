"""Optimizer groups, full-model clipping, schedules and the mixed-precision step."""
import pytest
import torch
from torch import nn

import aff_seg  # noqa: F401
from aff_seg import add_maskformer2_config
from aff_seg.solver import MixedPrecisionTrainer, build_lr_scheduler, build_optimizer


def solver_cfg(*opts):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_maskformer2_config(cfg)
    cfg.merge_from_list(["SOLVER.BASE_LR", "0.01", "SOLVER.WEIGHT_DECAY", "0.05", *opts])
    return cfg


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.backbone.blank_k = nn.Parameter(torch.randn(4))  # AFF-style free parameter
        self.backbone_attn = nn.Module()  # Focal-style bias table (a ParameterList entry)
        self.backbone_attn.relative_position_bias_table_to_windows = nn.ParameterList([nn.Parameter(torch.zeros(2, 9))])
        self.embed = nn.Embedding(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.backbone(x) + self.embed.weight.sum(0))


def hyperparams_of(optimizer, param):
    (group,) = [g for g in optimizer.param_groups if any(p is param for p in g["params"])]
    return group["lr"], group["weight_decay"]


def test_backbone_multiplier_and_weight_decay_rules():
    model = Toy()
    optimizer = build_optimizer(solver_cfg("SOLVER.BACKBONE_MULTIPLIER", "0.1"), model)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert hyperparams_of(optimizer, model.backbone[0].weight) == pytest.approx((0.001, 0.05))
    assert hyperparams_of(optimizer, model.backbone[1].weight) == pytest.approx((0.001, 0.0))  # norm
    assert hyperparams_of(optimizer, model.backbone.blank_k) == pytest.approx((0.001, 0.05))
    assert hyperparams_of(optimizer, model.embed.weight) == pytest.approx((0.01, 0.0))  # embedding
    table = model.backbone_attn.relative_position_bias_table_to_windows[0]
    assert hyperparams_of(optimizer, table) == pytest.approx((0.001, 0.0))  # position bias (Swin, Focal)
    assert hyperparams_of(optimizer, model.head.bias) == pytest.approx((0.01, 0.05))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(solver_cfg("SOLVER.OPTIMIZER", "LAMB"), Toy())


def test_full_model_clipping_bounds_the_total_gradient_norm():
    model = Toy()
    cfg = solver_cfg("SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", "0.0", "SOLVER.WEIGHT_DECAY", "0.0",
                     "SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
                     "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.01", "SOLVER.BACKBONE_MULTIPLIER", "1.0")
    optimizer = build_optimizer(cfg, model)
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.randn(5, 4)) * 1000).sum().backward()
    optimizer.step()
    # SGD without momentum moves every parameter by lr * clipped grad: total step norm = lr * 0.01
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert step.norm().item() == pytest.approx(0.01 * 0.01, rel=1e-3)


def test_poly_and_multistep_schedules():
    model = Toy()
    poly_cfg = solver_cfg("SOLVER.LR_SCHEDULER_NAME", "WarmupPolyLR", "SOLVER.MAX_ITER", "10",
                          "SOLVER.WARMUP_ITERS", "0", "SOLVER.POLY_LR_POWER", "0.9")
    optimizer = build_optimizer(poly_cfg, model)
    scheduler = build_lr_scheduler(poly_cfg, optimizer)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    head_lr = hyperparams_of(optimizer, model.head.bias)[0]
    assert head_lr == pytest.approx(0.01 * (1 - 5 / 10) ** 0.9)

    step_cfg = solver_cfg("SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "SOLVER.MAX_ITER", "10",
                          "SOLVER.STEPS", "(3, 6)", "SOLVER.WARMUP_ITERS", "0", "SOLVER.GAMMA", "0.1")
    optimizer = build_optimizer(step_cfg, model)
    scheduler = build_lr_scheduler(step_cfg, optimizer)
    lrs = []
    for _ in range(8):
        lrs.append(hyperparams_of(optimizer, model.head.bias)[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.01] * 3 + [0.001] * 3 + [0.0001] * 2)


def test_poly_schedule_resumed_with_a_larger_max_iter_continues_on_the_longer_curve():
    """A 10-iteration poly run saved at iteration 6, resumed with MAX_ITER 20: the rate at t is
    base * (1 - t / 20)^0.9, also past the old end (where the unchanged schedule took a
    negative number to a fractional power: math domain error)."""
    model = Toy()
    opts = ("SOLVER.LR_SCHEDULER_NAME", "WarmupPolyLR", "SOLVER.WARMUP_ITERS", "0", "SOLVER.POLY_LR_POWER", "0.9")
    short = solver_cfg(*opts, "SOLVER.MAX_ITER", "10")
    optimizer = build_optimizer(short, model)
    scheduler = build_lr_scheduler(short, optimizer)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    saved = scheduler.state_dict()

    longer = solver_cfg(*opts, "SOLVER.MAX_ITER", "20")
    optimizer = build_optimizer(longer, model)
    scheduler = build_lr_scheduler(longer, optimizer)
    scheduler.load_state_dict(saved)
    for t in range(6, 20):
        assert hyperparams_of(optimizer, model.head.bias)[0] == pytest.approx(0.01 * (1 - t / 20) ** 0.9), t
        optimizer.step()
        scheduler.step()
    optimizer.step()
    scheduler.step()  # one step past the end: 0, not an error
    assert hyperparams_of(optimizer, model.head.bias)[0] == 0.0


class LossModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, batch):
        out = self.linear(batch[0])
        self.seen_dtype = out.dtype
        return {"loss": out.float().pow(2).mean()}


@pytest.mark.parametrize("precision, dtype, scaled", [("bfloat16", torch.bfloat16, False), ("float16", torch.float16, True)])
def test_mixed_precision_step_runs_in_the_chosen_dtype(precision, dtype, scaled):
    from detectron2.utils.events import EventStorage

    model = LossModel()
    cfg = solver_cfg("SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", precision, "MODEL.DEVICE", "cpu")
    loader = [[torch.randn(4, 8)] for _ in range(3)]
    trainer = MixedPrecisionTrainer.from_config(cfg, model, loader, torch.optim.SGD(model.parameters(), lr=0.1))
    before = model.linear.weight.detach().clone()
    with EventStorage(0):
        trainer.run_step()
    assert model.seen_dtype == dtype
    assert (trainer.grad_scaler is not None) == scaled
    assert ("grad_scaler" in trainer.state_dict()) == scaled
    assert not torch.equal(before, model.linear.weight)


def test_unknown_amp_precision_is_named():
    cfg = solver_cfg("SOLVER.AMP.PRECISION", "float8")
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION"):
        MixedPrecisionTrainer.from_config(cfg, LossModel(), [[torch.zeros(1, 8)]], torch.optim.SGD(LossModel().parameters(), lr=0.1))
