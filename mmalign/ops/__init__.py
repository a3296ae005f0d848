"""One op per file: reference (SPEC.md) -> Triton kernels -> launchers -> autograd Function."""
