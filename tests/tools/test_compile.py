"""TEST.COMPILE: the inference model compiled by torch.compile (inductor) gives the eager result."""
import pytest
import torch

import aff_seg.predictor
from aff_seg.predictor import compile_for_inference

# inductor's fused float32 kernels reorder sums: agreement to float32 rounding, not bit equality
ATOL, RTOL = 1e-5, 1e-4


@pytest.mark.slow
def test_compiled_model_gives_the_eager_result(analyze_model, tiny_config):
    config, opts = tiny_config
    cfg = analyze_model.setup_cfg(config, opts)
    torch.manual_seed(0)
    model = analyze_model.build_loaded_model(cfg).eval()
    inputs = analyze_model.fixed_size_inputs(64, 96)
    keys = list(model.state_dict())
    with torch.no_grad():
        eager = model(inputs)[0]["sem_seg"]
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compile_for_inference(model)
        compiled = model(inputs)[0]["sem_seg"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    assert list(model.state_dict()) == keys  # checkpoints load unchanged
    torch.testing.assert_close(compiled, eager, atol=ATOL, rtol=RTOL)
    assert not torch.equal(compiled, torch.zeros_like(compiled))


def test_compile_needs_backbone_and_head():
    with pytest.raises(ValueError, match="TEST.COMPILE"):
        compile_for_inference(torch.nn.Linear(2, 2))


def test_predictor_compiles_with_the_key(tiny_config, monkeypatch):
    config, opts = tiny_config
    compiled = []
    monkeypatch.setattr(aff_seg.predictor, "compile_for_inference", compiled.append)
    predictor = aff_seg.Predictor(config, weights="", opts=opts)
    assert compiled == []
    predictor = aff_seg.Predictor(config, weights="", opts=[*opts, "TEST.COMPILE", "True"])
    assert compiled == [predictor.model]


def test_benchmark_compile_option(benchmark, tiny_config, monkeypatch):
    config, opts = tiny_config
    seen = []

    def spy(cfg, tasks, **kwargs):
        seen.append(cfg.TEST.COMPILE)
        return {"config": {}, "inference": benchmark.summarize([0.1], 1, 1.0, 0.5)}

    monkeypatch.setattr(benchmark, "run", spy)
    benchmark.main(["--tasks", "inference", "--compile", "--config-file", config, *opts])
    benchmark.main(["--tasks", "inference", "--config-file", config, *opts])
    assert seen == [True, False]
    with pytest.raises(ValueError, match="@compile"):
        benchmark.main(["--compare", config, "--compile"])


def test_benchmark_refuses_to_compile_for_training(benchmark, analyze_model, tiny_config):
    config, opts = tiny_config
    cfg = analyze_model.setup_cfg(config, [*opts, "TEST.COMPILE", "True"])
    with pytest.raises(ValueError, match="--tasks inference"):
        benchmark.run(cfg, ["inference", "train"], input_size=(64, 64), warmup=0, iters=1)
