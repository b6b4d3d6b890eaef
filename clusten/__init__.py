"""clusten: AFF's neighbourhood ops (CUDA kernels with pure-PyTorch twins); needs torch alone."""
