"""tools/benchmark.py on the CPU with the tiny model."""
import json

import pytest


@pytest.mark.slow
def test_tiny_config_on_cpu_writes_valid_json(benchmark, tiny_config, tmp_path, capsys):
    config, opts = tiny_config
    path = tmp_path / "speed.json"
    benchmark.main(["--config-file", config, "--input-size", "64", "64", "--warmup", "1",
                    "--iters", "2", "--json", str(path), *opts])
    result = json.loads(path.read_text())
    assert result["inputs"] == "random 64x64"
    for task in ("inference", "train"):
        r = result[task]
        assert r["iterations"] == 2 and r["images_per_s"] > 0 and r["peak_memory_mib"] > 0 and r["warmup_s"] > 0
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert "| inference |" in capsys.readouterr().out


def test_help_describes_the_tool_in_full(benchmark):
    description = benchmark.get_parser().description
    assert description.endswith("the harness every speed figure of aff_seg is quoted from.")


def test_summarize(benchmark):
    r = benchmark.summarize([0.1, 0.3], images_per_iter=2, peak_memory_mib=5, warmup_seconds=1.5)
    assert r["images_per_s"] == 4 / 0.4 and r["warmup_s"] == 1.5
    assert r["latency_ms"]["p50"] == 200


def test_original_execution_runs_fp32_unfused_with_brute_force_knn(benchmark, tiny_config, tmp_path, monkeypatch):
    import clusten
    from clusten import knn_search

    config, opts = tiny_config
    seen = {}

    def spy(cfg, *args, **kwargs):
        seen.update(amp=cfg.SOLVER.AMP.ENABLED, fused=cfg.MODEL.AFF.FUSED_ATTENTION,
                    knn=clusten.get_knn_method())
        return {"config": {}, "inference": benchmark.summarize([0.1], 1, 1.0, 0.5)}

    monkeypatch.setattr(benchmark, "run", spy)
    monkeypatch.setattr(knn_search.METHOD, "value", "auto")  # restored after the test
    benchmark.main(["--config-file", config, "--tasks", "inference", "--original-execution", *opts,
                    "SOLVER.AMP.ENABLED", "True"])
    assert seen == {"amp": False, "fused": False, "knn": "brute_force"}


def test_op_breakdown_lists_the_clusten_ops(benchmark, analyze_model, tiny_config, capfd):
    config, opts = tiny_config
    cfg = analyze_model.setup_cfg(config, opts)
    model = analyze_model.build_loaded_model(cfg)
    capfd.readouterr()
    rows = benchmark.op_breakdown(model, cfg, analyze_model.fixed_size_inputs(64, 64), top=200)
    # on a machine without a GPU driver, Kineto's "ERROR: ... gpuGetDeviceCount failed" is dropped
    assert "ERROR" not in capfd.readouterr().err
    ops = {r["op"] for r in rows}
    # CPU inference runs the attention as clusten.cpu.cluster_attention (a labelled range), the
    # PointConv and Shepard gathers as clusten's gather op
    assert {"clusten::cluster_attention_cpu", "clusten::gather_sum"} <= ops, sorted(ops)
    assert all(r["calls"] >= 1 and r["self_ms"] >= 0 for r in rows)
    assert 99.0 < sum(r["percent"] for r in rows) <= 100.0 + 1e-6


def test_compare_rejects_unknown_suffix(benchmark, tiny_config):
    config, _ = tiny_config
    with pytest.raises(ValueError, match="@original"):
        benchmark.compare([config + "@fast"], ["inference"], [])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        benchmark.compare(["missing.yaml"], ["inference"], [])
