#!/usr/bin/env python
"""The main job: train a small AFF on synthetic ADE20K-format data on CPU, in minutes.

    python tools/train_demo.py [--config-file CFG] [--output-dir output/demo] [--iters 300] [KEY VALUE ...]

1. writes the synthetic semantic dataset (``aff_seg.data.synthetic``) under
   ``<output-dir>/datasets`` and points the standard ``ade20k_sem_seg_*`` names at it;
2. trains ``configs/synthetic/ade20k_semantic.yaml`` or ``--config-file`` (progress, checkpoints and TensorBoard
   events in ``<output-dir>``);
3. evaluates with detectron2's ``SemSegEvaluator`` and prints the mIoU next to the mIoU of
   always predicting the most frequent training class;
4. writes visualised predictions of a few val images to ``<output-dir>/visualizations``.

Trailing ``KEY VALUE`` pairs override the config.
"""
import aff_seg  # noqa: F401  (compat fixes and registrations first)

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.evaluation import SemSegEvaluator
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from aff_seg import load_config
from aff_seg.data.datasets import register_standard_datasets
from aff_seg.data.synthetic import make_synthetic_datasets
from aff_seg.engine import Trainer

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "synthetic", "ade20k_semantic.yaml")
TRAIN, VAL = "ade20k_sem_seg_train", "ade20k_sem_seg_val"


def most_frequent_class(dataset_name):
    """The class with the most labelled pixels in ``dataset_name`` (ignore label excluded)."""
    ignore = MetadataCatalog.get(dataset_name).ignore_label
    counts = np.zeros(256, dtype=np.int64)
    for record in DatasetCatalog.get(dataset_name):
        counts += np.bincount(np.asarray(Image.open(record["sem_seg_file_name"])).ravel(), minlength=256)
    counts[ignore] = 0
    return int(counts.argmax())


def constant_prediction_miou(dataset_name, class_id):
    """mIoU (SemSegEvaluator) of predicting ``class_id`` at every pixel of ``dataset_name``."""
    num_classes = len(MetadataCatalog.get(dataset_name).stuff_classes)
    evaluator = SemSegEvaluator(dataset_name, distributed=False)
    evaluator.reset()
    for record in DatasetCatalog.get(dataset_name):
        width, height = Image.open(record["sem_seg_file_name"]).size
        scores = torch.zeros(num_classes, height, width)
        scores[class_id] = 1.0
        evaluator.process([record], [{"sem_seg": scores}])
    return evaluator.evaluate()["sem_seg"]["mIoU"]


def visualise(model, cfg, dataset_name, folder, count):
    """Save image | ground truth | prediction panels for the first ``count`` records."""
    os.makedirs(folder, exist_ok=True)
    metadata = MetadataCatalog.get(dataset_name)
    model.eval()
    paths = []
    for record in DatasetCatalog.get(dataset_name)[:count]:
        image = read_image(record["file_name"], format="RGB")
        with torch.no_grad():
            inputs = {"image": torch.as_tensor(image.transpose(2, 0, 1).copy())}
            prediction = model([inputs])[0]["sem_seg"].argmax(dim=0).cpu()
        truth = np.asarray(Image.open(record["sem_seg_file_name"]))
        panels = [image]
        for labels in (truth, prediction):
            panels.append(Visualizer(image, metadata).draw_sem_seg(labels, alpha=0.6).get_image())
        path = os.path.join(folder, os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png")
        Image.fromarray(np.concatenate(panels, axis=1)).save(path)
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=CONFIG, help="a config for the synthetic ADE20K data")
    parser.add_argument("--output-dir", default="output/demo")
    parser.add_argument("--iters", type=int, default=None, help="SOLVER.MAX_ITER (default: the config's)")
    parser.add_argument("--num-train", type=int, default=48)
    parser.add_argument("--num-val", type=int, default=16)
    parser.add_argument("--num-vis", type=int, default=4)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads; the model is so small that one thread is fastest, and far faster "
        "than several on a loaded machine",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    start = time.time()
    torch.set_num_threads(args.threads)

    root = os.path.join(args.output_dir, "datasets")
    make_synthetic_datasets(root, datasets=("ade20k",), num_train=args.num_train, num_val=args.num_val, seed=0)
    register_standard_datasets(root)

    cfg = load_config(args.config_file,
                      ["OUTPUT_DIR", args.output_dir] + (["SOLVER.MAX_ITER", args.iters] if args.iters else []))
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    setup_logger(output=cfg.OUTPUT_DIR)
    torch.manual_seed(cfg.SEED)

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    train_time = time.time() - start
    miou = trainer._last_eval_results["sem_seg"]["mIoU"]  # the final evaluation, on DATASETS.TEST = (VAL,)

    majority = most_frequent_class(TRAIN)
    baseline = constant_prediction_miou(VAL, majority)
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    panels = visualise(model, cfg, VAL, os.path.join(cfg.OUTPUT_DIR, "visualizations"), args.num_vis)
    summary = {
        "mIoU": round(float(miou), 2),
        "mIoU_most_frequent_class": round(float(baseline), 2),
        "most_frequent_class": MetadataCatalog.get(TRAIN).stuff_classes[majority],
        "iterations": cfg.SOLVER.MAX_ITER,
        "wall_time_s": round(time.time() - start, 1),
        "train_and_eval_time_s": round(train_time, 1),
        "visualizations": panels,
    }
    with open(os.path.join(cfg.OUTPUT_DIR, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nval mIoU {summary['mIoU']:.2f}   most-frequent-class ({summary['most_frequent_class']}) mIoU "
          f"{summary['mIoU_most_frequent_class']:.2f}   wall time {summary['wall_time_s']:.0f} s")
    print(f"visualised predictions (image | ground truth | prediction): {os.path.dirname(panels[0]) if panels else '-'}")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
