"""The backbone forward has no host-device synchronisation: it traces as one graph.

``torch.compile(fullgraph=True)`` refuses any graph break, and ``.item()``, ``nonzero`` with a
data-dependent size or a Python branch on tensor values each cause one; so a full-graph trace
proves the clustering, the neighbourhoods, the KNN searches and the merge selection stay on
the device (the precondition for CUDA graphs).  The ``eager`` backend traces without
generating code, which keeps the test fast on CPU.
"""
import pytest
import torch

from aff_seg.modeling.backbone.aff import AFF, AFF_SIZES


@pytest.mark.parametrize("training", [False, True])
def test_forward_traces_as_one_graph(training):
    torch.manual_seed(0)
    model = AFF(**AFF_SIZES["mini"]).train(training)
    x = torch.randn(2, 3, 64, 96)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        expected = model(x)
        got = compiled(x)
    for key, value in expected.items():
        if torch.is_tensor(value):
            assert torch.equal(value, got[key]), key
        else:
            assert value == got[key], key


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_forward_does_not_synchronise():
    model = AFF(**AFF_SIZES["mini"]).cuda().eval()
    x = torch.randn(1, 3, 128, 128, device="cuda")
    with torch.no_grad():
        model(x)  # warm-up: kernel builds, allocator
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
