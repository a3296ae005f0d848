"""The dispatch table: automatic choice, forcing, and errors that carry the reasons."""
import pytest
import torch

import mmalign.functional as F
from mmalign import BackendUnavailable, _dispatch, _ext


def test_reference_always_available():
    for op in _dispatch.TABLE:
        assert _dispatch.not_supported_reasons(op, "reference", "cpu", torch.float32) == []


def test_cpu_prefers_the_compiled_kernel():
    want = "cpp" if _ext.load()[0] else "triton"
    assert _dispatch.select("sequence_logps", "cpu", torch.float32) == want


def test_reasons_name_the_problem():
    reasons = _dispatch.not_supported_reasons("sequence_logps", "cuda", "cpu", torch.float32)
    assert any("runs on cuda tensors" in r for r in reasons)
    reasons = _dispatch.not_supported_reasons("sequence_logps", "cpp", "cpu", torch.int64)
    assert any("dtype torch.int64 is not supported" in r for r in reasons)


def test_triton_under_interpreter_refuses_bf16(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reasons = _dispatch.not_supported_reasons("sequence_logps", "triton", "cpu", torch.bfloat16)
    assert any("bfloat16" in r for r in reasons)


def test_triton_without_interpreter_needs_cuda(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = _dispatch.not_supported_reasons("sequence_logps", "triton", "cpu", torch.float32)
    assert any("Triton needs CUDA tensors" in r for r in reasons)


def test_forced_backend_that_cannot_run_raises_with_reasons():
    with pytest.raises(BackendUnavailable, match=r"backend 'cuda' \(from backend=\) cannot run on cpu"):
        F.sequence_logps(torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), backend="cuda")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend=: expected one of"):
        _dispatch.select("sequence_logps", "cpu", torch.float32, backend="fast")


def test_env_var_forces_all_ops(monkeypatch):
    monkeypatch.setenv("MMALIGN_BACKEND", "reference")
    assert _dispatch.select("sequence_logps", "cpu", torch.float32) == "reference"
    assert _dispatch.select("fused_linear_sequence_logps", "cpu", torch.float32) == "reference"


def test_env_var_per_op(monkeypatch):
    monkeypatch.setenv("MMALIGN_BACKEND", "fused_linear_sequence_logps=reference")
    assert _dispatch.select("fused_linear_sequence_logps", "cpu", torch.float32) == "reference"
    assert _dispatch.select("sequence_logps", "cpu", torch.float32) != "reference"


def test_env_var_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("MMALIGN_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="from MMALIGN_BACKEND"):
        F.sequence_logps(torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long))


def test_report_covers_every_op_and_backend():
    rep = _dispatch.report("cpu", torch.float32)
    assert set(rep) == set(_dispatch.TABLE)
    for backends in rep.values():
        assert set(backends) == set(_dispatch.BACKENDS)


def test_unknown_op():
    with pytest.raises(KeyError, match="unknown op"):
        _dispatch.select("softmax", "cpu", torch.float32)


def test_cuda_kernels_are_chosen_by_batch_size(monkeypatch):
    """On CUDA the automatic choice takes the DAMO step's CUDA C++ kernel up to 256 pairs and Triton beyond
    (the kernel ranks by counting; H100 measurements in _dispatch.py), the preference loss's up to the
    kernel's 8192 pairs; sequence_logps takes its CUDA kernel at any size; forcing backend="cuda" reaches
    the kernel at any size."""
    from mmalign import _ext

    loaded, _ = _ext.load()
    if not (loaded and _ext.has_kernel("mmalign::damo_step_fwd", "CUDA")):
        pytest.skip("mmalign._C has no CUDA kernels here")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_dispatch._triton, "HAS_TRITON", True)
    _dispatch._select.cache_clear()
    try:
        sel = lambda op, n, **kw: _dispatch.select(op, "cuda", torch.float32, n=n, **kw)  # noqa: E731
        assert [sel("damo_step", n) for n in (1, 16, 256, 257, 4096, None)] == ["cuda"] * 3 + ["triton"] * 2 + ["cuda"]
        assert [sel("preference_loss", n) for n in (16, 8192, 8193)] == ["cuda", "cuda", "triton"]
        assert sel("sequence_logps", 10**6) == "cuda"
        assert sel("damo_step", 4096, backend="cuda") == "cuda"
        monkeypatch.setenv("MMALIGN_BACKEND", "damo_step=cuda")
        assert sel("damo_step", 4096) == "cuda"
    finally:
        _dispatch._select.cache_clear()


def test_host_helpers_match_triton():
    """The launchers' plain cdiv / next_power_of_2 (Triton's are slow to call from Python) agree with Triton's."""
    from mmalign import _triton

    triton = pytest.importorskip("triton")
    for n in [1, 2, 3, 15, 16, 17, 1000, 4096, 4097, 8192]:
        assert _triton.next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 16, 64, 128, 1024):
            assert _triton.cdiv(n, d) == triton.cdiv(n, d)
    assert _triton.cdiv(0, 16) == 0


def test_every_public_function_dispatches_under_its_own_name(monkeypatch):
    """MMALIGN_BACKEND=<op>=... reaches that function alone: token_logps is not sequence_logps, nor the fused-linear
    pair each other."""
    z, y = torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long)
    h, w = torch.randn(1, 2, 3), torch.randn(5, 3)
    calls = {
        "token_logps": lambda: F.token_logps(z, y),
        "sequence_logps": lambda: F.sequence_logps(z, y),
        "fused_linear_token_logps": lambda: F.fused_linear_token_logps(h, w, y),
        "fused_linear_sequence_logps": lambda: F.fused_linear_sequence_logps(h, w, y),
    }
    for forced in calls:
        monkeypatch.setenv("MMALIGN_BACKEND", f"{forced}=cuda")  # cannot run on CPU tensors: raises, naming the op
        for name, call in calls.items():
            if name == forced:
                with pytest.raises(BackendUnavailable, match=f"^{name}: backend 'cuda'"):
                    call()
            else:
                call()
    assert set(calls) | {"preference_loss", "damo_step", "masked_attention"} == set(_dispatch.TABLE)


def test_past_the_cuda_kernels_size_cuda_runs_triton(monkeypatch):
    """The CUDA C++ DAMO kernel holds at most DAMO_ONE_PROGRAM_MAX_N pairs (one thread block): past that, "cuda",
    asked for or chosen, is "triton" (the choice happens here, in _dispatch, not in the op); automatic choice takes
    it up to cuda_auto_max_n. (Every backend declared runnable: the rule alone, on any machine.)"""
    from mmalign.ops.limits import DAMO_ONE_PROGRAM_MAX_N as LIMIT

    monkeypatch.setattr(_dispatch, "not_supported_reasons", lambda *a: [])
    monkeypatch.delenv("MMALIGN_BACKEND", raising=False)
    _dispatch._select.cache_clear()
    try:
        sel = lambda op, n, **kw: _dispatch.select(op, "cuda", torch.float32, n=n, **kw)  # noqa: E731
        assert [sel("damo_step", n, backend="cuda") for n in (1, LIMIT, LIMIT + 1)] == ["cuda", "cuda", "triton"]
        assert [sel("preference_loss", n) for n in (16, LIMIT, LIMIT + 1)] == ["cuda", "cuda", "triton"]
        assert [sel("damo_step", n) for n in (256, 257)] == ["cuda", "triton"]
        assert sel("damo_step", LIMIT + 1, backend="triton") == "triton"
        assert sel("sequence_logps", 10 * LIMIT, backend="cuda") == "cuda"  # no such limit
        monkeypatch.setenv("MMALIGN_BACKEND", "damo_step=cuda")
        assert sel("damo_step", LIMIT + 1) == "triton"
    finally:
        _dispatch._select.cache_clear()


def test_no_gpu_query_at_import():
    """Importing mmalign (every operator registered) asks CUDA nothing: a fresh interpreter with the CUDA queries
    made to raise imports the package and lists its operators."""
    import subprocess
    import sys

    code = ("import torch\n"
            "def no(*a, **k): raise AssertionError('GPU queried at import')\n"
            "torch.cuda.is_available = torch.cuda.device_count = torch.cuda.get_device_properties = no\n"
            "torch.cuda.current_device = torch.cuda.init = no\n"
            "import mmalign, mmalign.functional, mmalign.nn\n"
            "print(sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith('mmalign::')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'mmalign::damo_step_triton'" in proc.stdout and "'mmalign::masked_attention_triton'" in proc.stdout
