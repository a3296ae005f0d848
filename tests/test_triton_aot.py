"""Every Triton kernel compiles for NVIDIA sm_80 and sm_90 on this GPU-less machine (mmalign/_aot.py):
the interpreter tests check what the kernels compute, this checks that the GPU compiler accepts them."""
import os
import subprocess
import sys

import pytest

from mmalign import _triton


@pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton is not installed")
def test_every_triton_kernel_compiles_for_nvidia_gpus():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    proc = subprocess.run([sys.executable, "-m", "mmalign._aot", "80,90", "--quick"], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "every Triton kernel compiles for sm_80, sm_90" in proc.stdout
