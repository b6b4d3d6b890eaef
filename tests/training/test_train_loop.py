"""End to end on the synthetic datasets: train a few iterations, checkpoint, evaluate with the
real evaluators; resume exactly; two CPU processes (gloo); --eval-only reproduces the metrics."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from aff_seg.engine import Trainer

from .conftest import CONFIGS, REPO, TASKS, tiny_cfg, tiny_opts

pytestmark = pytest.mark.slow

# task -> (result group, metric) that the task's evaluators must report
EXPECTED_METRICS = {
    "ade20k_semantic": [("sem_seg", "mIoU")],
    "cityscapes_instance": [("segm", "AP")],
    "cityscapes_panoptic": [("panoptic_seg", "PQ"), ("sem_seg", "IoU"), ("segm", "AP")],
    "coco_instance": [("segm", "AP")],
    "coco_panoptic": [("panoptic_seg", "PQ"), ("sem_seg", "mIoU"), ("segm", "AP")],
}


def train(cfg, resume=False, extra_hooks=()):
    seed_all_rng(cfg.SEED)  # as train_net's default_setup does before building the model
    trainer = Trainer(cfg)
    trainer.register_hooks(list(extra_hooks))
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


@pytest.mark.parametrize("task", sorted(TASKS))
def test_quick_schedule_trains_checkpoints_and_evaluates(task, registered_root, tmp_path):
    cfg = tiny_cfg(task, tmp_path)
    trainer = train(cfg)

    assert os.path.isfile(tmp_path / "model_final.pth")
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"
    results = trainer._last_eval_results
    for group, metric in EXPECTED_METRICS[task]:
        assert math.isfinite(results[group][metric]), (group, metric, results[group])
    # progress and TensorBoard events, as detectron2 writes them
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
    metrics = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert any("total_loss" in m and math.isfinite(m["total_loss"]) for m in metrics)


class _Interrupt(Exception):
    pass


class _KillAfter(HookBase):
    """Stop training with an exception after ``iteration`` (a kill between two checkpoints)."""

    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            raise _Interrupt()


@pytest.mark.parametrize("task", ["ade20k_semantic", "coco_panoptic", "coco_instance", "cityscapes_panoptic"])
def test_kill_and_resume_ends_with_the_uninterrupted_weights(task, registered_root, tmp_path):
    """With the shipped aspect-ratio grouping on, for every config family. In the COCO sets the
    images have both orientations, and at the checkpoint (iteration 2) detectron2's grouping
    would hold a sample back that the checkpoint does not have."""
    schedule = ["SOLVER.MAX_ITER", "5", "SOLVER.CHECKPOINT_PERIOD", "3", "TEST.EVAL_PERIOD", "0",
                "MODEL.AFF.DROP_PATH_RATE", "0.2", "DATALOADER.ASPECT_RATIO_GROUPING", "True"]
    if task == "ade20k_semantic":
        schedule += ["INPUT.COLOR_AUG_SSD", "True"]
    reference = train(tiny_cfg(task, tmp_path / "uninterrupted", *schedule))

    cfg = tiny_cfg(task, tmp_path / "interrupted", *schedule)
    with pytest.raises(_Interrupt):
        train(cfg, extra_hooks=[_KillAfter(3)])  # iterations 0-3 ran; the checkpoint is of iteration 2
    assert (tmp_path / "interrupted" / "last_checkpoint").read_text().strip() == "model_0000002.pth"
    seed_all_rng(cfg.SEED + 1)  # a restarted process: its RNG state must not matter
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    resumed.train()

    expected, got = reference.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    differing = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differing, differing[:5]
    # the resumed run did train: its weights moved on from the checkpoint it started from
    checkpoint = torch.load(tmp_path / "interrupted" / "model_0000002.pth", weights_only=False)["model"]
    assert not torch.equal(checkpoint["sem_seg_head.predictor.class_embed.weight"],
                           got["sem_seg_head.predictor.class_embed.weight"])


def _train_net(args, root, timeout=900):
    env = dict(os.environ, DETECTRON2_DATASETS=root, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def _copypaste_metrics(log):
    """{metric: value} from detectron2's "copypaste:" lines (the last evaluation in ``log``)."""
    lines = [line.split("copypaste: ", 1)[1] for line in log.splitlines() if "copypaste: " in line]
    names, values = lines[-2].split(","), lines[-1].split(",")
    return dict(zip(names, map(float, values)))


@pytest.fixture(scope="module")
def gloo_run(synthetic_root, tmp_path_factory):
    """Two CPU processes (gloo) train the semantic task for 2 iterations and evaluate."""
    out = tmp_path_factory.mktemp("gloo")
    config = os.path.join(CONFIGS, TASKS["ade20k_semantic"])
    log = _train_net(["--config-file", config, "--num-gpus", "2", "--dist-url", "auto",
                      *tiny_opts("ade20k_semantic", out)], synthetic_root)
    return out, log


def test_two_cpu_processes_train_and_evaluate_with_gloo(gloo_run):
    out, log = gloo_run
    assert os.path.isfile(out / "model_final.pth")
    assert "World size: 2" in (out / "log.txt.rank1").read_text()
    assert math.isfinite(_copypaste_metrics((out / "log.txt").read_text())["mIoU"])


def test_console_is_quiet_and_the_details_go_to_log_txt(gloo_run):
    """No config dump, model repr or per-class dict on the console (they are in log.txt), and
    metrics as plain numbers."""
    out, log = gloo_run
    for detail in ("Running with full config", "MaskFormer(", "'mIoU'"):
        assert detail not in log
    assert "np.float64" not in log
    assert len(log.splitlines()) < 60, log
    details = (out / "log.txt").read_text()
    for detail in ("Running with full config", "MaskFormer(", "'mIoU'"):
        assert detail in details
    assert "np.float64" not in details


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_evaluation_under_test_amp(precision, registered_root, tmp_path):
    """TEST.AMP: the evaluation runs the model in low precision and scores like fp32."""
    cfg = tiny_cfg("ade20k_semantic", tmp_path)
    model = Trainer.build_model(cfg)
    fp32 = Trainer.test(cfg, model)
    amp_cfg = tiny_cfg("ade20k_semantic", tmp_path, "TEST.AMP.ENABLED", "True", "TEST.AMP.PRECISION", precision)
    dtypes = []
    model.sem_seg_head.predictor.register_forward_hook(lambda m, i, out: dtypes.append(out["pred_masks"].dtype))
    amp = Trainer.test(amp_cfg, model)
    assert set(dtypes) == {getattr(torch, precision)}
    assert type(amp["sem_seg"]["mIoU"]) is float
    assert amp["sem_seg"]["mIoU"] == pytest.approx(fp32["sem_seg"]["mIoU"], abs=1.0)


def test_eval_only_reproduces_the_final_evaluation(gloo_run, synthetic_root, tmp_path):
    out, _ = gloo_run
    config = os.path.join(CONFIGS, TASKS["ade20k_semantic"])
    log = _train_net(["--config-file", config, "--eval-only",
                      *tiny_opts("ade20k_semantic", tmp_path, "MODEL.WEIGHTS", out / "model_final.pth")],
                     synthetic_root)
    assert _copypaste_metrics(log) == _copypaste_metrics((out / "log.txt").read_text())


class _LossRecorder(HookBase):
    def __init__(self):
        self.losses = []

    def after_step(self):
        self.losses.append(self.trainer.storage.history("total_loss").latest())


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_training_follows_fp32(precision, registered_root, tmp_path):
    """The full model under autocast learns like the fp32 run on the semantic quick schedule."""
    curves = {}
    for name, amp in (("fp32", []), (precision, ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", precision])):
        recorder = _LossRecorder()
        train(tiny_cfg("ade20k_semantic", tmp_path / name, "SOLVER.MAX_ITER", 80, "TEST.EVAL_PERIOD", 0, *amp),
              extra_hooks=[recorder])
        curves[name] = recorder.losses
    fp32, low = curves["fp32"], curves[precision]
    assert len(low) == len(fp32) == 80 and all(math.isfinite(x) for x in low)

    def mean(xs):
        return sum(xs) / len(xs)

    assert mean(low[-10:]) < 0.85 * mean(low[:5]), low  # it learns
    assert abs(mean(low[-10:]) - mean(fp32[-10:])) < 0.15 * mean(fp32[-10:]), (low[-10:], fp32[-10:])


@pytest.mark.parametrize("name", ["ade20k_semantic_grid",
                                  pytest.param("ade20k_semantic_faseg_grid", marks=pytest.mark.slow)])
def test_grid_model_trains_resumes_and_evaluates(registered_root, tmp_path, name):
    """The grid Mask2Former (ResNet maps, upstream heads) and FASeg on it: train 3 iterations; as
    if killed after the checkpoint of iteration 1, resume (train_net's --resume path) and run
    iteration 2; then train_net.py --eval-only of the final weights reproduces the final evaluation."""
    from detectron2.config import get_cfg

    from aff_seg import add_maskformer2_config

    config = os.path.join(CONFIGS, f"synthetic/{name}.yaml")
    opts = tiny_opts("ade20k_semantic", tmp_path, "SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 2)
    cfg = get_cfg()
    add_maskformer2_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(opts)
    train(cfg)
    os.remove(tmp_path / "model_final.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    resumed.train()
    evaluated = _train_net(["--config-file", config, "--eval-only",
                            *opts, "MODEL.WEIGHTS", str(tmp_path / "model_final.pth")], registered_root)
    expected = resumed._last_eval_results["sem_seg"]
    assert {k: round(expected[k], 4) for k in ("mIoU", "fwIoU", "mACC", "pACC")} == {
        k: v for k, v in _copypaste_metrics(evaluated).items() if k in ("mIoU", "fwIoU", "mACC", "pACC")}


def test_cluster_launchers_train_to_the_same_weights(synthetic_root, tmp_path):
    """The same 2-process job three ways: ``torchrun --nproc_per_node 2``, two "machines" of one
    process each (``--num-machines 2 --machine-rank r``, gloo over localhost), and a Slurm job of
    two tasks (its ``SLURM_*`` environment given by hand): the same weights; and those of one
    process with the same global batch (IMS_PER_BATCH 2), to float tolerance.  With drop path,
    aspect-ratio grouping and the stem's BatchNorm synchronised (naiveSyncBN), 3 iterations."""
    from detectron2.engine.launch import _find_free_port

    config = os.path.join(CONFIGS, TASKS["ade20k_semantic"])
    env = dict(os.environ, DETECTRON2_DATASETS=synthetic_root, OMP_NUM_THREADS="1")
    train_net = os.path.join(REPO, "train_net.py")

    def args(name):
        return ["--config-file", config, *tiny_opts(
            "ade20k_semantic", tmp_path / name, "DATASETS.TEST", "()", "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", 3,
            "MODEL.AFF.DROP_PATH_RATE", 0.2, "DATALOADER.ASPECT_RATIO_GROUPING", True,
            "MODEL.AFF.STEM_NORM", "naiveSyncBN")]

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    jobs = [([sys.executable, train_net, *args("one_process")], {})]
    jobs += [([torchrun, "--nproc_per_node", "2", "--master_port", str(_find_free_port()), train_net,
              *args("torchrun")], {})]
    machines_url = f"tcp://127.0.0.1:{_find_free_port()}"
    jobs += [([sys.executable, train_net, "--num-machines", "2", "--machine-rank", str(rank),
               "--dist-url", machines_url, *args("machines")], {}) for rank in (0, 1)]
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "127.0.0.1",
             "MASTER_PORT": str(_find_free_port())}
    jobs += [([sys.executable, train_net, *args("slurm")], dict(slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)))
             for r in (0, 1)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=dict(env, **extra), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd, extra in jobs]
    for proc in procs:
        out = proc.communicate(timeout=1800)[0]  # 7 processes: long on a loaded machine
        assert proc.returncode == 0, out[-4000:]

    weights = {name: torch.load(tmp_path / name / "model_final.pth", weights_only=False)["model"]
               for name in ("torchrun", "machines", "slurm", "one_process")}
    assert "World size: 2" in (tmp_path / "slurm" / "log.txt").read_text()
    for name in ("machines", "slurm"):
        for key, value in weights["torchrun"].items():
            torch.testing.assert_close(weights[name][key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    # one process: the same numbers up to float rounding (batched vs single-image kernels, the
    # all-reduced sums), which AdamW's normalised steps carry into the weights; the parameters
    # are about 0.1-1, a step 4e-4.  detectron2's NaiveSyncBatchNorm counts no batches across
    # processes (num_batches_tracked, unused with a momentum) and updates running_var with the
    # biased variance (a 1/2048 difference for the stem's 2 x 32 x 32 values per channel).
    for key, value in weights["one_process"].items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(weights["machines"][key], value, rtol=1e-3, atol=5e-5, msg=f"one process: {key}")
