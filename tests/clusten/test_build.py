"""The backend decision (env var, fallback log line) and, on any machine with the CUDA
toolkit, a real compile-and-link of the CUDA extension (no GPU needed)."""
import logging
import os

import pytest
import torch

import clusten
from clusten import build

CUDA = torch.device("cuda")


@pytest.fixture
def fresh(monkeypatch):
    """No cached log lines; load_extension replaced by a stub the test configures."""
    monkeypatch.setattr(build, "_logged", set())
    monkeypatch.delenv(build.BACKEND_ENV, raising=False)
    state = {"calls": 0, "error": None}

    def fake_load():
        state["calls"] += 1
        if state["error"]:
            raise state["error"]
        return "extension"

    monkeypatch.setattr(build, "load_extension", fake_load)
    return state


def test_cpu_tensors_never_build(fresh):
    assert build.kernels(torch.device("cpu")) is None
    assert fresh["calls"] == 0


def test_auto_uses_kernels_when_they_build(fresh):
    assert build.kernels(CUDA) == "extension"


def test_fallback_logs_one_line_with_reason(fresh, caplog):
    fresh["error"] = RuntimeError("nvcc exploded\nerror: no toolkit")
    with caplog.at_level(logging.INFO, logger="clusten.build"):
        assert build.kernels(CUDA) is None
        assert build.kernels(CUDA) is None
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["clusten: CUDA kernels unavailable (RuntimeError: error: no toolkit); using the PyTorch path "
                     "(set CLUSTEN_BACKEND=cuda to raise the full error)"]
    assert caplog.records[0].levelno == logging.WARNING


def test_env_forces_torch(fresh, monkeypatch, caplog):
    monkeypatch.setenv(build.BACKEND_ENV, "torch")
    with caplog.at_level(logging.INFO, logger="clusten.build"):
        assert build.kernels(CUDA) is None
    assert fresh["calls"] == 0
    assert "CLUSTEN_BACKEND=torch" in caplog.text


def test_env_forces_cuda_and_raises_when_unavailable(fresh, monkeypatch):
    monkeypatch.setenv(build.BACKEND_ENV, "cuda")
    assert build.kernels(CUDA) == "extension"
    fresh["error"] = OSError("missing nvcc")
    with pytest.raises(RuntimeError, match=r"CLUSTEN_BACKEND=cuda but the CUDA kernels are unavailable \(OSError: missing nvcc\)"):
        build.kernels(CUDA)


def test_invalid_env_value(fresh, monkeypatch):
    monkeypatch.setenv(build.BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match="CLUSTEN_BACKEND='triton'"):
        build.kernels(CUDA)


def test_forced_torch_backend_still_computes(monkeypatch):
    monkeypatch.setenv(build.BACKEND_ENV, "torch")
    attn, value, idx = torch.rand(1, 2, 3, 2), torch.rand(1, 2, 4, 5), torch.tensor([[[0, 3], [1, 1], [2, 0]]])
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
