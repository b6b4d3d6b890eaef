"""Per-image random draws: an image's drop path and sampled points, and the criterion's gradient,
do not depend on the batch or the number of processes the image is trained in."""
import pytest
import torch

from aff_seg.modeling import criterion as criterion_module
from aff_seg.modeling.backbone.attention import DropPath
from aff_seg.modeling.criterion import SetCriterion
from aff_seg.modeling.image_rng import image_generators, image_rand, images_rand
from aff_seg.modeling.matcher import HungarianMatcher

SEEDS = [11, 23, 5]


def test_an_image_draws_the_same_numbers_alone_or_in_a_batch():
    with image_generators([{"seed": s} for s in SEEDS]):
        batch = [image_rand(i, 4) for i in range(3)] + [image_rand(i, 2, 3) for i in range(3)]
    for i, seed in enumerate(SEEDS):
        with image_generators([{"seed": seed}]):
            alone = [image_rand(0, 4), image_rand(0, 2, 3)]
        torch.testing.assert_close(alone, [batch[i], batch[3 + i]], rtol=0, atol=0)
    with image_generators([{"seed": SEEDS[0]}]):
        with pytest.raises(ValueError, match="image 1 of a batch of 1"):
            image_rand(1, 2)


def test_images_rand_draws_row_i_as_image_i():
    with image_generators([{"seed": s} for s in SEEDS]):
        rows = images_rand(3, 2)
    for i, seed in enumerate(SEEDS):
        with image_generators([{"seed": seed}]):
            torch.testing.assert_close(image_rand(0, 2), rows[i], rtol=0, atol=0)
    # without seeds: one draw from the global RNG, the numbers of one draw per image
    torch.manual_seed(0)
    one_draw = images_rand(3, 2)
    torch.manual_seed(0)
    torch.testing.assert_close(one_draw, torch.stack([image_rand(i, 2) for i in range(3)]), rtol=0, atol=0)
    assert len(one_draw.unique()) == 6


def test_drop_path_of_an_image_does_not_depend_on_its_batch():
    drop = DropPath(0.5).train()
    x = torch.ones(3, 5, 2)
    with image_generators([{"seed": s} for s in SEEDS]):
        batched = torch.stack([drop(x) for _ in range(8)])  # 8 blocks
    assert set(batched.unique().tolist()) == {0.0, 2.0}
    for i, seed in enumerate(SEEDS):
        with image_generators([{"seed": seed}]):
            alone = torch.stack([drop(x[i:i + 1]) for _ in range(8)])
        torch.testing.assert_close(alone, batched[:, i:i + 1], rtol=0, atol=0)


def _criterion():
    matcher = HungarianMatcher(cost_class=2, cost_mask=5, cost_dice=5, num_points=64)
    return SetCriterion(3, matcher, {}, eos_coef=0.1, losses=["labels", "masks"], num_points=48,
                        oversample_ratio=3.0, importance_sample_ratio=0.75)


def _batch():
    """Outputs (with one auxiliary set) and targets of 2 images with 1 and 3 masks, leaf tensors."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, generator=generator, requires_grad=True)
    masks = torch.randn(2, 5, 8, 8, generator=generator, requires_grad=True)
    targets = [{"labels": torch.tensor([2]), "masks": torch.rand(1, 16, 16, generator=generator) > 0.5},
               {"labels": torch.tensor([0, 1, 1]), "masks": torch.rand(3, 16, 16, generator=generator) > 0.5}]
    return logits, masks, targets


def _loss(criterion, logits, masks, targets, seeds):
    outputs = {"pred_logits": logits, "pred_masks": masks,
               "aux_outputs": [{"pred_logits": logits * 0.5, "pred_masks": masks * 2}]}
    with image_generators([{"seed": s} for s in seeds]):
        return sum(criterion(outputs, targets).values())


def test_two_processes_of_one_image_get_the_gradient_of_one_process_of_two(monkeypatch):
    """The criterion on each image in its own "process" (all_reduce of the normalisers simulated),
    gradients averaged as DDP does = the criterion on both images in one process."""
    criterion = _criterion()
    logits, masks, targets = _batch()
    _loss(criterion, logits, masks, targets, SEEDS[:2]).backward()
    expected = logits.grad.clone(), masks.grad.clone()

    sent = {}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(criterion_module, "get_world_size", lambda: 2)

    def one_process(rank, all_reduce):
        monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
        logits, masks, targets = _batch()
        part = slice(rank, rank + 1)
        _loss(criterion, logits[part], masks[part], targets[part], SEEDS[part]).backward()
        return logits.grad[part], masks.grad[part]

    for rank in (0, 1):  # what each process contributes to the all_reduce
        one_process(rank, lambda t, rank=rank: sent.__setitem__(rank, t.clone()))
    grads = [one_process(rank, lambda t, rank=rank: t.add_(sent[1 - rank])) for rank in (0, 1)]
    # process r's loss reaches only image r's rows; DDP averages the two processes' gradients
    for averaged, one in zip([torch.cat(pair) / 2 for pair in zip(*grads)], expected):
        torch.testing.assert_close(averaged, one, rtol=1e-5, atol=1e-7)
