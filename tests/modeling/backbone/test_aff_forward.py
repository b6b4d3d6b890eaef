"""Forward behaviour of the AFF backbone: invariants, gradients, determinism, any input size."""
import copy

import pytest
import torch

import aff_seg  # noqa: F401
from aff_seg.modeling.backbone import AFF, AFF_SIZES
from aff_seg.modeling.backbone.attention import neighbourhood_attention
from aff_seg.modeling.backbone.merging import merge_count
from detectron2.structures import ImageList


def mini(seed=0, **kwargs):
    torch.manual_seed(seed)
    return AFF(**dict(AFF_SIZES["mini"], **kwargs))


def run(model, x):
    with torch.no_grad():
        return model(x)


def grid_positions(h, w, step=1):
    ys, xs = torch.meshgrid(torch.arange(0, h, step), torch.arange(0, w, step), indexing="ij")
    return {(int(x), int(y)) for x, y in zip(xs.flatten(), ys.flatten())}


def check_invariants(out, H, W, ds_rate=0.25):
    h, w = -(-H // 4), -(-W // 4)
    b = out["res2"].shape[0]
    n = h * w
    for i in range(4):
        stride = 2 ** (i + 1)
        pos = out[f"res{i + 2}_pos"]
        assert out[f"res{i + 2}_spatial_shape"] == (h, w)
        assert pos.dtype == torch.float32 and out[f"res{i + 2}"].shape[:2] == pos.shape[:2] == (b, n)
        assert torch.equal(pos, pos.round()) and (pos >= 0).all()
        assert (pos[..., 0] < w).all() and (pos[..., 1] < h).all()
        for j in range(b):
            tokens = {(int(x), int(y)) for x, y in pos[j].tolist()}
            assert len(tokens) == n  # distinct grid points
            if i == 0:
                assert tokens == grid_positions(h, w)
            else:  # the reserved grid of the previous stage is always kept
                assert grid_positions(h, w, stride) <= tokens
        assert torch.isfinite(out[f"res{i + 2}"]).all()
        reserve = -(-h // (2 * stride)) * -(-w // (2 * stride))
        n = merge_count(n, ds_rate, reserve)


def test_token_counts_follow_the_spec_table():
    """Token counts per stage (docs/aff.md, adaptive downsampling) for 512^2 (DS 0.25 and 0.2) and Cityscapes sizes."""
    def counts(H, W, ds):
        h, w, n, out = H // 4, W // 4, H * W // 16, []
        for stride in (2, 4, 8):
            out.append(n)
            n = merge_count(n, ds, -(-h // (2 * stride)) * -(-w // (2 * stride)))
        return out + [n]
    assert counts(512, 512, 0.25) == [16384, 4096, 1024, 256]
    assert counts(512, 512, 0.2) == [16384, 3276, 655, 131]
    assert counts(512, 1024, 0.25) == [32768, 8192, 2048, 512]
    assert counts(1024, 2048, 0.25) == [131072, 32768, 8192, 2048]


@pytest.mark.parametrize("size,H,W", [("mini", 128, 128), ("mini_1_5th", 96, 128)])
def test_invariants(size, H, W):
    torch.manual_seed(0)
    model = AFF(**AFF_SIZES[size]).eval()
    out = run(model, torch.randn(2, 3, H, W))
    check_invariants(out, H, W, AFF_SIZES[size].get("ds_rate", 0.25))
    if size == "mini":
        assert [out[f"res{i}"].shape[1] for i in range(2, 6)] == [1024, 256, 64, 16]


@pytest.mark.parametrize("H,W", [(32, 32), (33, 47), (32, 2048), (2048, 32), (40, 100), (36, 300)])
def test_any_input_of_at_least_32_pixels(H, W):
    """Odd sizes, extreme aspect ratios, and stages with fewer tokens than a neighbourhood
    (global attention, also in stages that downsample: 32 x 32 has 16 tokens in stage 2)."""
    model = mini().eval()
    check_invariants(run(model, torch.randn(1, 3, H, W)), H, W)


def test_gradients_reach_every_parameter_including_prob_net():
    # when stochastic depth drops a branch for every image of the batch, that branch's parameters
    # get no gradient (right, but not what this test is about): 4 images and a fixed seed keep it away
    torch.manual_seed(0)
    model = mini(drop_path_rate=0.1).train()
    for H, W in [(64, 64), (32, 32)]:  # local attention, and global attention in downsampling stages
        model.zero_grad()
        out = model(torch.randn(4, 3, H, W))
        sum((out[f"res{i}"] ** 2).mean() for i in range(2, 6)).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            # at 32 x 32 stage 4 has a single token: its only offset (0, 0) has zero features
            if not (H == 32 and name.startswith("layers.3.") and "pos_embed.weight" in name):
                assert p.grad.abs().sum() > 0, f"{name} has zero gradient ({H}x{W})"


def test_deterministic_with_a_fixed_seed():
    x = torch.randn(2, 3, 96, 64)
    a, b = run(mini(seed=3).eval(), x), run(mini(seed=3).eval(), x)
    for key in a:
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]


def test_eval_single_image_equals_the_same_image_in_a_batch():
    model = mini().eval()
    torch.manual_seed(5)
    batch = torch.randn(3, 3, 96, 96)
    together = run(model, batch)
    alone = run(model, batch[1:2])
    for i in range(2, 6):
        assert torch.equal(together[f"res{i}_pos"][1], alone[f"res{i}_pos"][0])
        torch.testing.assert_close(together[f"res{i}"][1], alone[f"res{i}"][0], rtol=1e-4, atol=1e-5)


def test_no_stale_state_between_calls_with_other_batch_and_canvas_sizes():
    """After calls with other batch and canvas sizes (train and eval), a model gives what a fresh
    model with the same state_dict gives: no clustering cache or other hidden state."""
    model = mini().train()
    for x in [torch.randn(2, 3, 64, 64), torch.randn(3, 3, 96, 64), torch.randn(1, 3, 64, 128)]:
        model(x)
    model.eval()
    run(model, torch.randn(2, 3, 64, 96))
    fresh = mini(seed=1)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 80, 48)
    for mode in ("train", "eval"):
        training = mode == "train"
        expect, got = run(copy.deepcopy(fresh).train(training), x), run(copy.deepcopy(model).train(training), x)
        for key in expect:
            assert torch.equal(expect[key], got[key]) if torch.is_tensor(got[key]) else expect[key] == got[key]


def test_padded_batch_of_mixed_sizes():
    images = [torch.randn(3, 70, 90), torch.randn(3, 100, 40)]
    batch = ImageList.from_tensors(images, size_divisibility=32)
    assert tuple(batch.tensor.shape[-2:]) == (128, 96)
    out = run(mini().eval(), batch.tensor)
    check_invariants(out, 128, 96)


def test_global_attention_equals_local_attention_over_all_tokens():
    torch.manual_seed(0)
    b, h, n, c = 2, 3, 10, 4
    q, k, v = (torch.randn(b, h, n, c) for _ in range(3))
    bias = torch.randn(b, h, n, n)
    blank_k, blank_v = torch.randn(h, c), torch.randn(h, c)
    dense = neighbourhood_attention(q, k, v, None, bias, None, blank_k, blank_v)
    every = torch.arange(n).expand(b, n, n)
    local = neighbourhood_attention(q, k, v, every, bias, None, blank_k, blank_v)
    torch.testing.assert_close(dense, local)
    # padding slots carry the -100 logit
    valid = torch.ones(b, n, n, dtype=torch.bool)
    valid[:, :, -1] = False
    masked = neighbourhood_attention(q, k, v, every, bias, valid, blank_k, blank_v)
    bias2 = bias.clone()
    bias2[..., -1] -= 100
    torch.testing.assert_close(masked, neighbourhood_attention(q, k, v, None, bias2, None, blank_k, blank_v))


def test_bf16_autocast_on_cpu():
    model = mini().eval()
    x = torch.randn(1, 3, 64, 64)
    ref = run(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, x)
    check_invariants(out, 64, 64)
    assert torch.equal(out["res2_pos"], ref["res2_pos"])  # stage 1 order depends on positions only
    err = (out["res2"].float() - ref["res2"]).norm() / ref["res2"].norm()
    assert err < 0.05


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(dtype):
    model = mini().eval()
    x = torch.randn(2, 3, 96, 128)
    ref = run(model, x)
    model = model.cuda()
    with torch.autocast("cuda", dtype=dtype):
        out = run(model, x.cuda())
    check_invariants({k: v.cpu() if torch.is_tensor(v) else v for k, v in out.items()}, 96, 128)
    assert torch.equal(out["res2_pos"].cpu(), ref["res2_pos"])
    assert (out["res2"].float().cpu() - ref["res2"]).norm() / ref["res2"].norm() < 0.05
    fp32 = run(model, x.cuda())
    torch.testing.assert_close(fp32["res2"].cpu(), ref["res2"], rtol=1e-3, atol=1e-3)


def test_fused_attention_gives_the_reference_result():
    """MODEL.AFF.FUSED_ATTENTION swaps the attention core only: same outputs and gradients."""
    x = torch.randn(2, 3, 64, 96)
    outs, grads = [], []
    for fused in (False, True):
        model = mini(seed=4, fused_attention=fused).eval()
        out = model(x)
        out["res5"].square().mean().backward()
        outs.append(out)
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for i in range(2, 6):
        assert torch.equal(outs[0][f"res{i}_pos"], outs[1][f"res{i}_pos"])
        torch.testing.assert_close(outs[0][f"res{i}"], outs[1][f"res{i}"], rtol=1e-4, atol=1e-5)
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-3, atol=1e-5, msg=k)
