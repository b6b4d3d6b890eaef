"""tools/analyze_model.py: FLOP counts of the clusten ops and KNN searches, checked by hand."""
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import clusten


class NeighbourhoodOps(nn.Module):
    """Calls every clusten op and one KNN search once, on shapes derived from the input."""

    B, H, N, C, M, IC, K, NM = 1, 2, 12, 4, 3, 2, 2, 5  # NM: deformable sampling points

    def forward(self, x):
        b, h, n, c, m = self.B, self.H, self.N, self.C, self.M
        feat = x[:, : h * n * c].reshape(b, h, n, c)
        pos = x[:, : n * 2].reshape(b, n, 2)
        idx = clusten.knn(pos, pos, m)  # b x n x m
        attn = clusten.clusten_qk(feat, feat, idx)
        out = clusten.clusten_av(attn, feat, idx)
        tokens = out.reshape(b, n, h * c)
        wf = clusten.clusten_wf(attn[:, :1].reshape(b, n, m, 1).expand(b, n, m, self.IC), tokens, idx)
        wg = clusten.weighted_gather(idx[..., : self.K], attn[:, 0, :, : self.K], tokens)
        nn_idx = idx[..., : self.K].unsqueeze(2).expand(b, n, self.NM, self.K)
        md = clusten.msdetrpc(nn_idx, nn_idx.float(), attn[:, 0, :, :1].expand(b, n, self.NM), tokens)
        return wf.sum() + wg.sum() + md.sum()

    def hand_count(self):
        """Multiply-adds: qk, av (b h n m c), wf (b n m ic C), wg (b n k C), msdetrpc
        (b n NM K C) and the KNN's distances (b n n d), with C = h c."""
        b, h, n, c, m = self.B, self.H, self.N, self.C, self.M
        return {
            "gather_dot": b * h * n * m * c,
            "gather_sum": b * h * n * m * c + b * n * m * self.IC * h * c
            + b * n * self.K * h * c + b * n * self.NM * self.K * h * c,
            "knn": b * n * n * 2,
        }


def test_custom_ops_match_the_hand_count(analyze_model):
    model = NeighbourhoodOps()
    x = torch.randn(1, 200)
    counted = analyze_model.flop_analysis(model, (x,))
    assert dict(counted.by_operator()) == model.hand_count()
    excluded = analyze_model.flop_analysis(model, (x,), count_custom_ops=False)
    assert excluded.total() == 0


@pytest.mark.parametrize("fused", [False, True])
def test_tiny_aff_backbone_matches_the_hand_count(analyze_model, tiny_config, fused):
    """Cluster attention and KNN searches of the tiny AFF backbone on a 64 x 64 input,
    counted from the stage rules of docs/aff.md: the attention logits are the ``gather_dot``
    op. On the CPU, inference runs the unfused chain also with ``FUSED_ATTENTION``
    (``clusten.cluster_attention`` without autograd: the fused op is that chain plus work only
    its backward needs), so both settings count the same; the fused
    op's own FLOP rule is checked in test_custom_ops_match_the_hand_count."""
    from detectron2.modeling import build_backbone

    config_file, opts = tiny_config
    cfg = analyze_model.setup_cfg(config_file, [*opts, "MODEL.AFF.FUSED_ATTENTION", str(fused)])
    backbone = build_backbone(cfg).eval()
    aff = cfg.MODEL.AFF
    m = aff.CLUSTER_SIZE
    n = (64 // 4) ** 2
    qk = knn = 0
    for stage, (dim, nbhd) in enumerate(zip(aff.EMBED_DIM, aff.NBHD_SIZE)):
        if nbhd < n:  # local attention over M neighbours, found by KNN to cluster means
            k = math.ceil(n / m)
            nnc = min(round(nbhd / m), k)
            qk += aff.DEPTHS[stage] * n * m * nnc * dim
            knn += n * k * 2 if k < n else n * n * 2
        if stage < 3 and stage > 0:  # merging at stride >= 4: 2-NN among the tokens
            knn += n * n * 2
        n = int(n * aff.DS_RATE)
    with torch.no_grad():
        counted = analyze_model.flop_analysis(backbone, (torch.zeros(1, 3, 64, 64),))
    ops = counted.by_operator()
    assert (ops["gather_dot"], ops["knn"], ops.get("cluster_attention_fwd", 0)) == (qk, knn, 0)


@pytest.mark.slow
def test_tiny_model_cli(analyze_model, tiny_config, tmp_path, caplog):
    config, opts = tiny_config
    results = {}
    for flag in ([], ["--exclude-custom-ops"]):
        path = tmp_path / f"r{len(flag)}.json"
        with caplog.at_level(logging.INFO):
            for name in ("fvcore", "aff_seg"):  # setup_logger stops propagation: listen directly
                logging.getLogger(name).addHandler(caplog.handler)
            try:
                analyze_model.main(["--config-file", config, "--tasks", "flop", "parameter",
                                    "--use-fixed-input-size", "--json", str(path), *flag, *opts])
            finally:
                for name in ("fvcore", "aff_seg"):
                    logging.getLogger(name).removeHandler(caplog.handler)
        results[bool(flag)] = json.loads(path.read_text())
    # one summary line instead of fvcore's warning per operator without a FLOP rule
    assert "Unsupported operator" not in caplog.text
    assert "Not counted (no FLOP rule, as in fvcore): " in caplog.text
    counted, excluded = results[False], results[True]
    custom_ops = {"gather_dot", "gather_sum", "scatter_sum", "cluster_attention_fwd", "knn"}
    assert {"gather_dot", "gather_sum", "knn"} <= set(counted["gflops_by_operator"])
    custom = sum(v for k, v in counted["gflops_by_operator"].items() if k in custom_ops)
    assert counted["gflops"] > excluded["gflops"]
    assert counted["gflops"] - excluded["gflops"] == pytest.approx(custom)
    assert not custom_ops & set(excluded["gflops_by_operator"])
    model = analyze_model.build_loaded_model(analyze_model.setup_cfg(config, opts))
    assert counted["parameters"] == sum(p.numel() for p in model.parameters())


class WindowAttention(nn.Module):
    """One ``F.scaled_dot_product_attention`` call on fixed shapes."""

    def forward(self, x):
        q = x[:, :24].reshape(1, 2, 3, 4)  # batch 1 x 2, L = 3, E = 4
        k = x[:, :40].reshape(1, 2, 5, 4)  # S = 5
        v = x[:, :60].reshape(1, 2, 5, 6)  # Ev = 6
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_scaled_dot_product_attention_is_counted(analyze_model):
    counted = analyze_model.flop_analysis(WindowAttention(), (torch.randn(1, 60),), count_custom_ops=False)
    assert dict(counted.by_operator()) == {"scaled_dot_product_attention": 2 * 3 * 5 * (4 + 6)}


def test_focal_attention_matches_the_key_count(analyze_model):
    """Each window of 7 x 7 queries attends to its own 49 tokens, the 132-token ring (not in the
    last stage: at 224 px pretraining it is one window) and kf x kf pooled windows."""
    from aff_seg.modeling.backbone import FocalTransformer

    model = FocalTransformer(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4)).eval()
    expected = 0
    for stage, (side, keys) in enumerate(zip((16, 8, 4, 2), (49 + 132 + 49, 49 + 132 + 25, 49 + 132 + 9, 49 + 1))):
        windows = math.ceil(side / 7) ** 2
        expected += model.layers[stage].blocks.__len__() * windows * 49 * keys * 2 * 16 * 2 ** stage
    with torch.no_grad():
        counted = analyze_model.flop_analysis(model, (torch.zeros(1, 3, 64, 64),))
    assert counted.by_operator()["scaled_dot_product_attention"] == expected


@pytest.mark.slow
def test_focal_configs_analyse_and_benchmark(analyze_model, benchmark, tiny_config, tmp_path):
    root = Path(__file__).resolve().parents[2]
    opts = tiny_config[1] + ["MODEL.FOCAL.EMBED_DIM", "16", "MODEL.FOCAL.DEPTHS", "[1, 1, 1, 1]"]
    for config in ("configs/synthetic/ade20k_semantic_focal_point_cloud.yaml", "configs/synthetic/ade20k_semantic_focal_grid.yaml"):
        flops = analyze_model.main(["--config-file", str(root / config), "--tasks", "flop",
                                    "--use-fixed-input-size", *opts])
        assert flops["gflops_by_operator"]["scaled_dot_product_attention"] > 0
        path = tmp_path / "speed.json"
        benchmark.main(["--config-file", str(root / config), "--input-size", "64", "64", "--warmup", "1",
                        "--iters", "1", "--json", str(path), *opts])
        assert json.loads(path.read_text())["train"]["images_per_s"] > 0
