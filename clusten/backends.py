"""Which implementation the clusten ops run: the backend setting and what can run where.

Backends:

- ``auto`` (default): CUDA tensors use the device kernels (the compiled CUDA extension for the
  gather primitives, Triton for the fused attention); where they cannot run, the PyTorch
  reference runs instead and one warning line says why.
- ``torch``: always the PyTorch reference.
- ``cuda``: CUDA tensors must use the device kernels; where they cannot run, the op raises and
  says why.

CPU tensors run the gather primitives as sparse-matrix products (:mod:`clusten.cpu`; the
reference under ``torch``) and the fused attention as the PyTorch chain over them (the Triton
kernels also run on CPU tensors under Triton's interpreter, ``TRITON_INTERPRET=1``, which is how
CI tests them). The setting is
process-wide: ``set_backend(name)``, or ``with backend(name): ...`` for a block; its default is
read once, at import, from ``CLUSTEN_BACKEND``. ``can_run(name, device)`` tells whether a
backend can run ops on a device, and why not (NATTEN's ``can_run`` pattern).

``CLUSTEN_DEBUG=1`` (read once, at import) checks index ranges on the kernel path too; the
reference path always checks them.
"""
import contextlib
import logging
import os

import torch

from . import build

logger = logging.getLogger(__name__)

BACKEND_ENV = "CLUSTEN_BACKEND"
BACKENDS = ("auto", "torch", "cuda")
DEBUG_ENV = "CLUSTEN_DEBUG"

__all__ = ["BACKENDS", "Setting", "backend", "can_run", "get_backend", "set_backend"]


class Setting:
    """A process-wide choice among ``choices`` (the first is the default), whose starting value
    is read once from the environment variable ``env``."""

    def __init__(self, what, choices, env, environ=os.environ):
        self.what, self.choices, self.env = what, tuple(choices), env
        self.value = self.validated(environ.get(env, "").strip() or self.choices[0], env)

    def validated(self, value, source=None):
        name = str(value).strip().lower()
        if name not in self.choices:
            raise ValueError(f"clusten: {source or self.what}={value!r}: expected one of {', '.join(self.choices)}")
        return name

    def set(self, value):
        self.value = self.validated(value)

    @contextlib.contextmanager
    def use(self, value):
        """Run a block with ``value``; the previous value is restored after it."""
        previous = self.value
        self.set(value)
        try:
            yield
        finally:
            self.value = previous


def debug_from_environment(environ=os.environ):
    """True when ``CLUSTEN_DEBUG`` asks for index-range checks on the kernel path too."""
    return environ.get(DEBUG_ENV, "0").strip() not in ("", "0", "false", "False")


BACKEND = Setting("backend", BACKENDS, BACKEND_ENV)
debug = debug_from_environment()
_logged = set()


def get_backend():
    """The current backend: ``"auto"``, ``"torch"`` or ``"cuda"``."""
    return BACKEND.value


def set_backend(name):
    """Set the backend of every later clusten call in this process (see the module doc)."""
    BACKEND.set(name)


def backend(name):
    """Context manager: run a block with backend ``name``, then restore the previous one."""
    return BACKEND.use(name)


def _log_once(level, message):
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)


def _reason(err):
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}"


def why_not(name, device):
    """None if backend ``name`` can run the gather primitives on ``device``, else the reason.

    ``torch`` and ``auto`` run anywhere (``auto`` falls back to the reference); ``cuda`` needs a
    CUDA device and a CUDA extension that builds and loads.
    """
    name = BACKEND.validated(name)
    if name != "cuda":
        return None
    if torch.device(device).type != "cuda":
        return f"{torch.device(device)} is not a CUDA device"
    try:
        build.load_extension()
    except Exception as err:  # any build/load failure is a reason
        return f"the CUDA kernels are unavailable ({_reason(err)})"
    return None


def can_run(name, device, raise_error=False):
    """Whether backend ``name`` can run the ops on ``device``; with ``raise_error``, a refusal
    raises ``RuntimeError`` with the reason instead of returning False."""
    reason = why_not(name, device)
    if reason is not None and raise_error:
        raise RuntimeError(f"clusten: backend {name!r} cannot run: {reason}")
    return reason is None


def refuse_or_fall_back(what, reason):
    """A device kernel ``what`` cannot run: raise under the ``cuda`` backend, else log once and
    let the caller run the reference."""
    if get_backend() == "cuda":
        raise RuntimeError(f"clusten: backend 'cuda' but {what} cannot run ({reason})")
    _log_once(logging.WARNING, f"clusten: {what} unavailable ({reason}); using the PyTorch reference "
                               f"(backend 'cuda' raises instead)")


def cuda_extension(device):
    """The compiled extension for CUDA tensors on ``device`` under the current backend, or None
    when the reference runs (CPU tensors, backend ``torch``, or ``auto`` after a failed build)."""
    if torch.device(device).type != "cuda":
        return None
    if get_backend() == "torch":
        _log_once(logging.INFO, "clusten: backend 'torch', CUDA tensors use the PyTorch reference")
        return None
    try:
        return build.load_extension()
    except Exception as err:  # any build/load failure means: fall back (or raise under 'cuda')
        refuse_or_fall_back("the CUDA kernels", _reason(err))
        return None
