"""Argument checks for every public clusten op, in one place.

An op describes its arguments as ``(name, tensor, dims, kind)`` with ``dims`` a space-separated
list of size names (``"b h n c"``); the same name must mean the same size everywhere, and
``kind`` is ``"float"`` or ``"index:<dim>"`` (integer values in ``[0, size of <dim>)``). Errors
are ``ValueError``/``TypeError``/``IndexError`` naming the op and the argument.
"""
import torch

from . import backends

INDEX_DTYPES = (torch.int32, torch.int64)


def check(op, args):
    """Validate ``args`` (list of ``(name, tensor, dims, kind)``); returns the bound size dict."""
    sizes, origin = {}, {}
    device = None
    for name, tensor, dims, kind in args:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        names = dims.split()
        if tensor.dim() != len(names):
            raise ValueError(
                f"{op}: {name} must have rank {len(names)} ({' x '.join(names)}), got shape {tuple(tensor.shape)}"
            )
        for dim, size in zip(names, tensor.shape):
            if dim in sizes and sizes[dim] != size:
                raise ValueError(
                    f"{op}: {name} has shape {tuple(tensor.shape)} ({' x '.join(names)}) but {dim}={sizes[dim]} "
                    f"from {origin[dim]}"
                )
            sizes.setdefault(dim, size)
            origin.setdefault(dim, name)
        if device is None:
            device, first = tensor.device, name
        elif tensor.device != device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but {first} is on {device}")
        if kind == "float" and not tensor.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {tensor.dtype}")
        if kind.startswith("index") and tensor.dtype not in INDEX_DTYPES:
            raise TypeError(f"{op}: {name} must be int32 or int64, got {tensor.dtype}")
    for name, tensor, dims, kind in args:
        if kind.startswith("index") and _check_values(tensor):
            _check_range(op, name, tensor, sizes[kind.split(":")[1]], kind.split(":")[1])
    return sizes


def _check_values(tensor):
    """Index values are checked on the PyTorch path always, on the kernel path in debug mode."""
    if tensor.numel() == 0 or torch.compiler.is_compiling():
        return False
    return backends.debug or backends.cuda_extension(tensor.device) is None


def _check_range(op, name, tensor, upper, dim):
    low, high = (int(v) for v in torch.aminmax(tensor))  # one pass
    if low < 0 or high >= upper:
        raise IndexError(f"{op}: {name} has values in [{low}, {high}] but must lie in [0, {dim}={upper})")


def check_same_dtype(op, reference_name, reference, **tensors):
    """Raise if any of ``tensors`` has a dtype other than ``reference``'s."""
    for name, tensor in tensors.items():
        if tensor.dtype != reference.dtype:
            raise TypeError(f"{op}: {name} is {tensor.dtype} but {reference_name} is {reference.dtype}; they must match")
