"""One op per file: reference (docs/math.md) -> Triton kernels -> launchers -> autograd Function."""
