"""Bad arguments give errors that name the op and the argument."""
import pytest
import torch

import clusten


def qk_args():
    return torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4), torch.randint(0, 6, (2, 5, 7))


def test_wrong_rank_names_argument():
    q, k, idx = qk_args()
    with pytest.raises(ValueError, match=r"clusten_qk: key must have rank 4 \(b x h x n_ x c\)"):
        clusten.clusten_qk(q, k[0], idx)


def test_mismatched_size_names_both_arguments():
    q, k, idx = qk_args()
    with pytest.raises(ValueError, match=r"clusten_qk: key .* c=4 from query"):
        clusten.clusten_qk(q, k[..., :3], idx)
    with pytest.raises(ValueError, match=r"nbhd_idx .* n=5 from query"):
        clusten.clusten_qk(q, k, idx[:, :4])


def test_out_of_range_index_names_argument():
    q, k, idx = qk_args()
    idx[1, 2, 3] = 6
    with pytest.raises(IndexError, match=r"clusten_qk: nbhd_idx has values in \[0, 6\] but must lie in \[0, n_=6\)"):
        clusten.clusten_qk(q, k, idx)
    idx[1, 2, 3] = -1
    with pytest.raises(IndexError, match="nbhd_idx"):
        clusten.clusten_qk(q, k, idx)


def test_index_dtype_and_float_dtype():
    q, k, idx = qk_args()
    with pytest.raises(TypeError, match="nbhd_idx must be int32 or int64"):
        clusten.clusten_qk(q, k, idx.float())
    with pytest.raises(TypeError, match="key must be a floating-point tensor"):
        clusten.clusten_qk(q, k.long(), idx)


def test_device_mismatch_names_argument():
    q, k, idx = qk_args()
    with pytest.raises(ValueError, match="clusten_qk: key is on meta but query is on cpu"):
        clusten.clusten_qk(q, k.to("meta"), idx)


def test_msdetrpc_requires_attn_dtype():
    nn_idx = torch.randint(0, 6, (1, 5, 2, 3))
    with pytest.raises(TypeError, match="msdetrpc: value is torch.float64 but attn is torch.float32"):
        clusten.msdetrpc(nn_idx, torch.rand(1, 5, 2, 3), torch.rand(1, 5, 2), torch.rand(1, 6, 4, dtype=torch.float64))


def test_weighted_gather_range_uses_feat_size():
    with pytest.raises(IndexError, match=r"weighted_gather: nbhd_idx .* \[0, n_=3\)"):
        clusten.weighted_gather(torch.full((1, 2, 2), 3), torch.rand(1, 2, 2), torch.rand(1, 3, 4))


def test_not_a_tensor():
    q, k, idx = qk_args()
    with pytest.raises(TypeError, match="nbhd_idx must be a torch.Tensor"):
        clusten.clusten_qk(q, k, idx.tolist())
