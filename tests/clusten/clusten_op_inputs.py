"""Random arguments for the five clusten ops, shared by the op tests and the CUDA tests."""
import torch

OPS = ("clusten_qk", "clusten_av", "clusten_wf", "weighted_gather", "msdetrpc")


def op_inputs(op, sizes, dtype=torch.float64, index_dtype=torch.int64, device="cpu", seed=0):
    """Arguments of ``op`` in its argument order; floats require grad.

    Args:
        sizes: dict with B, H, N, N_SRC, M, C, IC, K (indices point into N_SRC source rows).
    """
    B, H, N, N_SRC, M, C, IC, K = (sizes[key] for key in ("B", "H", "N", "N_SRC", "M", "C", "IC", "K"))
    g = torch.Generator(device=device).manual_seed(seed)

    def f(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float64).to(dtype).requires_grad_()

    def i(*shape):
        return torch.randint(0, N_SRC, shape, generator=g, device=device).to(index_dtype)

    return {
        "clusten_qk": lambda: (f(B, H, N, C), f(B, H, N_SRC, C), i(B, N, M)),
        "clusten_av": lambda: (f(B, H, N, M), f(B, H, N_SRC, C), i(B, N, M)),
        "clusten_wf": lambda: (f(B, N, M, IC), f(B, N_SRC, C), i(B, N, M)),
        "weighted_gather": lambda: (i(B, N, K), f(B, N, K), f(B, N_SRC, C)),
        "msdetrpc": lambda: (i(B, N, M, K), f(B, N, M, K), f(B, N, M), f(B, N_SRC, C)),
    }[op]()
