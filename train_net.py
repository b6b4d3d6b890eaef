#!/usr/bin/env python
"""Train or evaluate an AFF (or R50-token) Mask2Former model with detectron2.

    python train_net.py --config-file configs/ade20k/semantic-segmentation/aff/maskformer2_aff_mini_bs32_80k.yaml \
        --num-gpus 8 [KEY VALUE ...]
    python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --config-file CFG --resume            # continue from OUTPUT_DIR/last_checkpoint
    python train_net.py --config-file CFG --num-gpus 2 MODEL.DEVICE cpu   # two CPU processes (gloo)

``--num-gpus`` is the number of processes per machine; with ``--dist-backend auto`` (default)
they use NCCL when the model runs on CUDA and gloo otherwise. A single process (GPU or CPU)
creates no process group and waits on no barrier.
"""
import aff_seg  # noqa: F401  (compat fixes and registrations first)

import logging
import sys

from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from aff_seg import load_config
from aff_seg.config import ConfigError
from aff_seg.checkpoint import AFFCheckpointer
from aff_seg.engine import Trainer, check_run_inputs, launch, resolve_dist_backend, setup_run


def build_cfg(args):
    """The frozen config of ``--config-file`` plus the trailing ``KEY VALUE`` overrides."""
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    return cfg


def setup(args):
    cfg = build_cfg(args)
    setup_run(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = AFFCheckpointer(model, save_dir=cfg.OUTPUT_DIR, strict=cfg.MODEL.WEIGHTS_STRICT)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            results.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--verbose", action="store_true",
        help="also print the full config and the model's structure (always in OUTPUT_DIR/log.txt)",
    )
    parser.add_argument(
        "--dist-backend",
        default="auto",
        choices=("auto", "nccl", "gloo"),
        help="process-group backend when --num-gpus x --num-machines > 1; "
        "auto: nccl for a CUDA model, gloo for MODEL.DEVICE cpu (or without CUDA)",
    )
    return parser


def cli(argv=None):
    args = argument_parser().parse_args(argv)
    logging.getLogger(__name__).info(f"Command line arguments: {args}")
    try:  # a bad config, missing weights or data: one line, before any process or model starts
        cfg = build_cfg(args)
        check_run_inputs(cfg, train=not args.eval_only, resume=args.resume)
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"train_net.py: error: {e}")
    backend = resolve_dist_backend(args.dist_backend, cfg.MODEL.DEVICE)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        backend=backend,
    )


if __name__ == "__main__":
    cli()
