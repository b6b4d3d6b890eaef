"""Fuzz the model's entry with random sizes, dtypes, shapes and values, as a careless or hostile
caller would: every input must give either a clear error raised by aff_seg's own checks
(``ValueError``/``TypeError``) or a finite result, never a traceback from deep inside the model."""
import os
import traceback

import numpy as np
import pytest
import torch

import aff_seg
from detectron2.config import get_cfg
from detectron2.modeling import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
ADE_MINI = os.path.join(ROOT, "configs/ade20k/semantic-segmentation/aff/maskformer2_aff_mini_bs32_80k.yaml")
AFF_SEG_DIR = os.path.dirname(os.path.abspath(aff_seg.__file__))

# a randomly initialised AFF + Mask2Former of a few thousand parameters
TINY_OPTS = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
    "MODEL.AFF.EMBED_DIM", "[16, 16, 32, 32]", "MODEL.AFF.DEPTHS", "[1, 1, 1, 1]",
    "MODEL.AFF.NUM_HEADS", "[1, 1, 2, 2]", "MODEL.AFF.CLUSTER_SIZE", "4",
    "MODEL.AFF.NBHD_SIZE", "[16, 16, 16, 16]", "MODEL.MASK_FORMER.DEC_LAYERS", "2",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "5", "MODEL.MASK_FORMER.NHEADS", "2",
    "MODEL.SEM_SEG_HEAD.MASK_DIM", "32", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4", "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
]


def tiny_model():
    cfg = get_cfg()
    aff_seg.add_maskformer2_config(cfg)
    cfg.merge_from_file(ADE_MINI)
    cfg.merge_from_list(TINY_OPTS)
    torch.manual_seed(0)
    return build_model(cfg).eval()


def fuzz_cases(seed=0, count=48):
    """``count`` (description, batched_inputs) pairs drawn from a seeded RNG."""
    rng = np.random.default_rng(seed)

    def image(dtype="float32", channels=3, h=None, w=None):
        h = int(rng.integers(1, 160)) if h is None else h
        w = int(rng.integers(1, 160)) if w is None else w
        x = torch.from_numpy(rng.uniform(0, 255, (channels, h, w)).astype(np.float32))
        return x.to(getattr(torch, dtype)) if dtype != "complex64" else torch.complex(x, x)

    kinds = [
        ("valid float32", lambda: [{"image": image()}]),
        ("valid uint8", lambda: [{"image": image("uint8")}]),
        ("valid batch of 3", lambda: [{"image": image()} for _ in range(3)]),
        ("extreme aspect", lambda: [{"image": image(h=int(rng.integers(1, 4)), w=int(rng.integers(200, 600)))}]),
        ("dtype", lambda: [{"image": image(str(rng.choice(
            ["float64", "float16", "bfloat16", "bool", "int64", "int32", "int16", "complex64"])))}]),
        ("channels", lambda: [{"image": image(channels=int(rng.choice([0, 1, 2, 4, 6])))}]),
        ("rank", lambda: [{"image": image()[0] if rng.random() < 0.5 else image()[None]}]),
        ("empty side", lambda: [{"image": image(h=0) if rng.random() < 0.5 else image(w=0)}]),
        ("numpy array", lambda: [{"image": image().numpy()}]),
        ("missing image", lambda: [{"height": 10, "width": 10}]),
        ("not a dict", lambda: [image()]),
        ("empty batch", lambda: []),
        ("bad height/width", lambda: [{"image": image(), "height": rng.choice([0, -5, 3.5, "12", None]),
                                       "width": 20}]),
        ("nan pixel", lambda: [{"image": _poison(image(), float("nan"), rng)}, {"image": image()}]),
        ("inf pixel", lambda: [{"image": _poison(image(), float("-inf"), rng)}, {"image": image()}]),
        ("huge values", lambda: [{"image": image() * 1e30}, {"image": image()}]),
        ("constant image", lambda: [{"image": torch.full((3, 64, 64), float(rng.uniform(0, 255)))}]),
    ]
    cases = []
    for i in range(count):
        name, make = kinds[i % len(kinds)]
        cases.append((f"{i}: {name}", make()))
    return cases


def _poison(x, value, rng):
    x = x.clone()
    x[:, int(rng.integers(x.shape[1])), int(rng.integers(x.shape[2]))] = value
    return x


def classify(model, inputs):
    """"fine" (finite results), "clear" (our ValueError/TypeError) or a description of the failure."""
    try:
        with torch.no_grad():
            results = model(inputs)
    except (ValueError, TypeError) as e:
        origin = traceback.extract_tb(e.__traceback__)[-1].filename
        if os.path.abspath(origin).startswith(AFF_SEG_DIR):
            return "clear"
        return f"{type(e).__name__} from {origin}: {e}"
    except Exception as e:  # noqa: BLE001  (what the harness looks for)
        origin = traceback.extract_tb(e.__traceback__)[-1].filename
        return f"{type(e).__name__} from {origin}: {e}"
    if all(torch.isfinite(r["sem_seg"]).all() for r in results):
        return "fine"
    return "non-finite output"


def run_fuzz(seed=0, count=48):
    """Counts per outcome and the failures, over ``count`` cases."""
    model = tiny_model()
    counts = {"tried": 0, "clear": 0, "fine": 0, "failed": 0}
    failures = []
    for name, inputs in fuzz_cases(seed, count):
        outcome = classify(model, inputs)
        counts["tried"] += 1
        if outcome in ("clear", "fine"):
            counts[outcome] += 1
        else:
            counts["failed"] += 1
            failures.append(f"{name}: {outcome[:300]}")
    return counts, failures


@pytest.mark.slow
def test_fuzzed_inputs_give_a_clear_error_or_a_finite_result():
    torch.set_num_threads(1)
    counts, failures = run_fuzz()
    assert counts["fine"] >= 8  # the valid cases really ran
    assert not failures, "\n".join(failures)


if __name__ == "__main__":  # python tests/modeling/meta_arch/test_input_fuzz.py: print the counts
    counts, failures = run_fuzz()
    print(counts)
    print("\n".join(failures))
