"""The backend decision (setting, fallback log line, refusals that say why) and, on any machine
with the CUDA toolkit, a real compile-and-link of the CUDA extension (no GPU needed)."""
import logging
import os

import pytest
import torch

import clusten
from clusten import backends, build

CUDA = torch.device("cuda")


@pytest.fixture
def fresh(monkeypatch):
    """No cached log lines, the default backend; load_extension replaced by a stub the test configures."""
    monkeypatch.setattr(backends, "_logged", set())
    monkeypatch.setattr(backends.BACKEND, "value", "auto")
    state = {"calls": 0, "error": None}

    def fake_load():
        state["calls"] += 1
        if state["error"]:
            raise state["error"]
        return "extension"

    monkeypatch.setattr(build, "load_extension", fake_load)
    return state


def test_cpu_tensors_never_build(fresh):
    assert backends.cuda_extension(torch.device("cpu")) is None
    assert fresh["calls"] == 0


def test_auto_uses_kernels_when_they_build(fresh):
    assert backends.cuda_extension(CUDA) == "extension"
    assert clusten.can_run("cuda", CUDA)


def test_fallback_logs_one_line_with_reason(fresh, caplog):
    fresh["error"] = RuntimeError("nvcc exploded\nerror: no toolkit")
    with caplog.at_level(logging.INFO, logger="clusten.backends"):
        assert backends.cuda_extension(CUDA) is None
        assert backends.cuda_extension(CUDA) is None
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["clusten: the CUDA kernels unavailable (RuntimeError: error: no toolkit); using the PyTorch "
                     "reference (backend 'cuda' raises instead)"]
    assert caplog.records[0].levelno == logging.WARNING


def test_torch_backend_in_a_block(fresh, caplog):
    with caplog.at_level(logging.INFO, logger="clusten.backends"), clusten.backend("torch"):
        assert clusten.get_backend() == "torch"
        assert backends.cuda_extension(CUDA) is None
    assert clusten.get_backend() == "auto"
    assert fresh["calls"] == 0
    assert "backend 'torch'" in caplog.text


def test_cuda_backend_raises_with_the_reason(fresh):
    clusten.set_backend("cuda")
    assert backends.cuda_extension(CUDA) == "extension"
    fresh["error"] = OSError("missing nvcc")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' but the CUDA kernels cannot run \(OSError: missing nvcc\)"):
        backends.cuda_extension(CUDA)


def test_can_run_says_why_not(fresh):
    assert clusten.can_run("torch", "cpu") and clusten.can_run("auto", CUDA)
    assert not clusten.can_run("cuda", "cpu")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run: cpu is not a CUDA device"):
        clusten.can_run("cuda", "cpu", raise_error=True)
    fresh["error"] = OSError("missing nvcc")
    assert backends.why_not("cuda", CUDA) == "the CUDA kernels are unavailable (OSError: missing nvcc)"


def test_invalid_backend_names(fresh):
    with pytest.raises(ValueError, match="backend='triton': expected one of auto, torch, cuda"):
        clusten.set_backend("triton")
    def from_environment(environ):
        return backends.Setting("backend", backends.BACKENDS, backends.BACKEND_ENV, environ).value

    with pytest.raises(ValueError, match="CLUSTEN_BACKEND='triton'"):
        from_environment({"CLUSTEN_BACKEND": "triton"})
    assert from_environment({"CLUSTEN_BACKEND": " Torch "}) == "torch"
    assert from_environment({}) == "auto"


def test_forced_torch_backend_still_computes(fresh):
    attn, value, idx = torch.rand(1, 2, 3, 2), torch.rand(1, 2, 4, 5), torch.tensor([[[0, 3], [1, 1], [2, 0]]])
    with clusten.backend("torch"):
        out = clusten.clusten_av(attn, value, idx)
    torch.testing.assert_close(out[0, 1, 0], attn[0, 1, 0, 0] * value[0, 1, 0] + attn[0, 1, 0, 1] * value[0, 1, 3])


def _toolkit_missing():
    try:
        build.cuda_home()
    except RuntimeError as err:
        return str(err)
    return "" if torch.version.cuda else "torch is a CPU-only build"


@pytest.mark.slow
@pytest.mark.skipif(bool(_toolkit_missing()), reason=_toolkit_missing() or "toolkit present")
def test_extension_compiles_and_links(tmp_path, monkeypatch):
    """Compiles every kernel with nvcc and links the module; works without a GPU."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    module = build.load_extension(build_directory=str(tmp_path))
    for name in ("gather_dot", "gather_sum", "scatter_sum_atomic", "scatter_sum_sorted"):
        assert callable(getattr(module, name))
    assert any(f.endswith(".so") for f in os.listdir(tmp_path))
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        module.gather_dot(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long))


def test_nvidia_headers_found_when_package_present():
    pytest.importorskip("nvidia")
    dirs = build.nvidia_include_dirs()
    assert dirs and all(os.path.isfile(os.path.join(d, "cusparse.h")) for d in dirs)
