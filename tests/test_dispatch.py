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
