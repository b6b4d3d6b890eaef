"""Builds and loads the CUDA extension of the gather primitives (which backend runs is
:mod:`clusten.backends`' business).

The extension is compiled lazily, on the first call with a CUDA tensor (never at import), by
``torch.utils.cpp_extension.load`` with ninja, and is cached in ``CLUSTEN_BUILD_DIR`` (default:
PyTorch's extension cache), so later processes only load it.

Building needs the CUDA toolkit (``CUDA_HOME``, default ``/usr/local/cuda``) but no GPU: the
cuSPARSE headers that ATen's CUDA headers include are taken from the ``nvidia`` pip package
that the CUDA build of torch installs, and ``TORCH_CUDA_ARCH_LIST`` defaults to
``DEFAULT_ARCH_LIST`` when no GPU is visible.
"""
import glob
import os
import shutil
import threading

import torch

BUILD_DIR_ENV = "CLUSTEN_BUILD_DIR"
DEFAULT_ARCH_LIST = "8.0;8.6;9.0"
EXTENSION_NAME = "clusten_cuda"
SOURCES = ("bindings.cpp", "gather_dot.cu", "gather_sum.cu", "scatter_sum.cu")
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")

_lock = threading.Lock()
_extension = None
_failure = None  # why the last build failed (str), or None


def cuda_home():
    """The CUDA toolkit folder: ``CUDA_HOME``/``CUDA_PATH`` if set, else ``/usr/local/cuda`` or nvcc's."""
    for key in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(key):
            return os.environ[key]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "bin", "nvcc")) and os.path.isdir(os.path.join(folder, "include")):
            return folder
    raise RuntimeError("no CUDA toolkit found: set CUDA_HOME to a folder with bin/nvcc")


def nvidia_include_dirs():
    """Header folders of the ``nvidia`` pip packages that hold ``cusparse.h`` (none if absent)."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        for header in glob.glob(os.path.join(root, "*", "include", "cusparse.h")):
            found.append(os.path.dirname(header))
    return sorted(found)


def load_extension(build_directory=None, verbose=False):
    """Compile (once) and import the CUDA extension; returns the module. Raises on failure.

    Args:
        build_directory: where ninja builds and caches it (default ``CLUSTEN_BUILD_DIR`` or
            PyTorch's extension cache).
        verbose: print the compiler commands.
    """
    global _extension, _failure
    with _lock:
        if _extension is not None and build_directory is None:
            return _extension
        if _failure is not None and build_directory is None:
            raise RuntimeError(_failure)
        try:
            module = _compile(build_directory, verbose)
        except Exception as err:
            if build_directory is None:
                _failure = f"{type(err).__name__}: {err}"
            raise
        if build_directory is None:
            _extension = module
        return module


def _compile(build_directory, verbose):
    home = cuda_home()
    # torch.utils.cpp_extension reads these from the environment.
    os.environ.setdefault("CUDA_HOME", home)
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is a CPU-only build")
    if cpp_extension.CUDA_HOME != home:
        # torch.utils.cpp_extension reads CUDA_HOME once at its import; it may have been
        # imported (by another library) before CUDA_HOME was known.
        cpp_extension.CUDA_HOME = home
    build_directory = build_directory or os.environ.get(BUILD_DIR_ENV)
    if build_directory:
        os.makedirs(build_directory, exist_ok=True)
    flags = ["-O3"]
    return cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[os.path.join(CSRC, source) for source in SOURCES],
        extra_include_paths=[CSRC] + nvidia_include_dirs(),
        extra_cflags=flags,
        extra_cuda_cflags=flags + ["-lineinfo"],
        build_directory=build_directory,
        verbose=verbose,
    )
