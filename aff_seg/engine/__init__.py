"""Training engine: the trainer, its hooks, and the process launcher."""
from .hooks import IterationSeed
from .launch import check_run_inputs, launch, launcher_environment, resolve_dist_backend, setup_run
from .trainer import Trainer

__all__ = ["IterationSeed", "Trainer", "check_run_inputs", "launch", "launcher_environment", "resolve_dist_backend", "setup_run"]
