"""Training hooks."""
import random

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.build import mix_seed

__all__ = ["IterationSeed"]


class IterationSeed(HookBase):
    """Seed python/numpy/torch RNGs before each step from (seed, iteration, rank), so the model's
    randomness in a step does not depend on how the run got there (fresh or resumed)."""

    def __init__(self, seed):
        self.seed = seed

    def before_step(self):
        step_seed = mix_seed(self.seed, self.trainer.iter, comm.get_rank(), 2)
        random.seed(step_seed)
        np.random.seed(step_seed)
        torch.manual_seed(step_seed)
