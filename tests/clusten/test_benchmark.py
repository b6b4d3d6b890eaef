"""python -m clusten.benchmark: runs on CPU at small shapes, writes its table as JSON, and times
the same attention in its original, reference and fused forms."""
import json

import pytest
import torch

import clusten
from clusten import benchmark


def test_small_cpu_run_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    benchmark.main(["--device", "cpu", "--small", "--min-run-time", "0", "--ops", "clusten_av", "knn",
                    "--knn-size", "96", "128", "--json", str(path)])
    rows = json.loads(path.read_text())["rows"]
    assert [(r["shapes"], r["op"], r["backend"]) for r in rows] == [
        ("64x64 b1", "clusten_av", "torch"), ("64x64 b1", "knn (brute force)", "torch"),
        ("64x64 b1", "knn (grid)", "torch"), ("96x128 b1", "knn (brute force)", "torch"),
        ("96x128 b1", "knn (grid)", "torch")]
    assert rows[0]["dtype"] == "float32" and rows[0]["fwd_ms"] > 0 and rows[0]["fwd_bwd_ms"] > 0
    assert all(r["identical"] for r in rows[1:])
    assert "clusten_av" in capsys.readouterr().out


def test_the_three_attention_rows_compute_the_same_attention():
    """The original's table bias gathered per neighbour is the bias the reference and fused rows get."""
    cases = benchmark.op_cases(32, 32, 1, torch.device("cpu"), torch.float64)
    original_fn, original = cases["original attention"]
    _, attention = cases["fused attention"]
    h = original["q"].shape[1]
    b, n, m = original["nbhd_idx"].shape
    table_bias = torch.nn.functional.linear(original["table"], original["pe_weight"], original["pe_bias"])
    bias = table_bias[original["pe_idx"]].permute(0, 3, 1, 2)  # b x h x n x m
    assert bias.shape == (b, h, n, m)
    args = dict(attention, query=original["q"], key=original["k"], value=original["v"], bias=bias)
    expected = original_fn(**original)
    torch.testing.assert_close(clusten.cluster_attention(**args), expected)
    torch.testing.assert_close(clusten.cluster_attention_reference(**args), expected)


def test_neighbourhoods_are_six_whole_clusters_around_the_own_one():
    idx = benchmark.neighbourhoods(2, 96, "cpu")
    assert idx.shape == (2, 96, 48) and torch.equal(idx[0], idx[1])
    clusters = idx[0] // benchmark.CLUSTER_SIZE
    own = torch.arange(96) // benchmark.CLUSTER_SIZE
    assert bool((clusters == own[:, None]).any(1).all())
    for row in (0, 50, 95):
        counts = torch.bincount(clusters[row], minlength=12)
        assert sorted(counts.tolist()) == [0] * 6 + [8] * 6


@pytest.mark.slow
def test_cli_smoke_every_row(capsys):
    benchmark.main(["--device", "cpu", "--small", "--min-run-time", "0"])
    printed = capsys.readouterr().out
    for op in ("clusten_qk", "clusten_av", "clusten_wf", "weighted_gather", "msdetrpc", "original attention",
               "reference attention", "fused attention"):
        assert f" {op} " in printed
    assert printed.count("identical: True") == 2
