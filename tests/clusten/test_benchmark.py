"""tools/benchmark_ops.py runs on CPU at small shapes and writes its table as JSON."""
import importlib.util
import json
import os

import pytest
import torch

import clusten


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_ops", os.path.join(ROOT, "tools", "benchmark_ops.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_cpu_run_writes_json(bench, tmp_path, capsys):
    path = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--small", "--repeat", "1", "--ops", "clusten_av", "knn", "--json", str(path)])
    rows = json.loads(path.read_text())["rows"]
    assert [(r["op"], r["impl"]) for r in rows] == [
        ("clusten_av", "torch"), ("knn (pixels->res3, k=4)", "brute force"), ("knn (pixels->res3, k=4)", "grid")
    ]
    assert rows[0]["impl"] == "torch" and rows[0]["fwd_ms"] > 0 and rows[0]["bwd_ms"] > 0
    assert "clusten_av" in capsys.readouterr().out


def test_fused_attention_row_computes_the_chain(bench):
    """The fused row and the original chain are the same attention (same bias and mask)."""
    s = bench.tiny_sizes(32, 32, 1)
    s["nbhd"] = 5
    q, k, v, idx, pe_idx, mask, table, pe_w, pe_b, blank_k, blank_v = bench.chain_inputs(
        s, torch.device("cpu"), torch.float64)
    b, h, n, c = q.shape
    bias = (table @ pe_w.T + pe_b)[pe_idx].permute(0, 3, 1, 2)  # b x h x n x m
    fused = bench.fused_inputs(s, torch.device("cpu"), torch.float64)
    assert [tuple(t.shape) for t in fused] == [
        tuple(t.shape) for t in (q, k, v, idx, bias, mask, blank_k.view(h, c), blank_v.view(h, c))]
    out = clusten.cluster_attention(q, k, v, idx, bias, mask, blank_k.view(h, c), blank_v.view(h, c))
    chain = bench.original_attention_chain(q, k, v, idx, pe_idx, mask, table, pe_w, pe_b, blank_k, blank_v)
    torch.testing.assert_close(out, chain)


def test_attention_chain_is_the_original_formula(bench):
    """The re-created chain equals softmax([qk + bias + mask term, q.blank_k]) applied to [v, blank_v]."""
    s = bench.tiny_sizes(32, 32, 1)
    s["nbhd"] = 5
    args = [a.detach() for a in bench.chain_inputs(s, torch.device("cpu"), torch.float64)]
    q, k, v, idx, pe_idx, mask, table, pe_w, pe_b, blank_k, blank_v = args
    out = bench.original_attention_chain(*args)
    b, h, n, c = q.shape
    bias = (table @ pe_w.T + pe_b)[pe_idx]  # b x n x m x h
    for i in (0, n - 1):
        for head in range(h):
            keys = k[0, head, idx[0, i]]
            logits = keys @ q[0, head, i] + bias[0, i, :, head] - 100 * (1 - mask[0, i])
            logits = torch.cat([logits, (q[0, head, i] * blank_k.view(h, c)[head]).sum().view(1)])
            p = logits.softmax(0)
            expected = p[:-1] @ v[0, head, idx[0, i]] + p[-1] * blank_v.view(h, c)[head]
            torch.testing.assert_close(out[0, head, i], expected)
