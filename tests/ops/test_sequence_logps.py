"""sequence_logps / token_logps against the float64 reference of docs/math.md section 1, every backend."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmalign.functional as F
from mmalign.ops_demo import eager_sequence_logps
from mmalign.ops.sequence_logps import sequence_logps_reference, token_logps_reference

from .._numerics import assert_low_precision, backends, cases

OP = "sequence_logps"
CASES64 = cases(OP)


def _inputs(g, B, T, V, device, dtype=torch.float64, ignore_frac=0.3):
    logits = (3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignore_frac] = -100
    return logits, labels.to(device)


def _assert_fwd_bwd_match_reference(logits, labels, backend):
    """Output and gradient of sum(logps) equal the reference's (logits may be any strided view)."""
    z = logits.detach().requires_grad_()
    out = F.sequence_logps(z, labels, backend=backend)
    out.sum().backward()
    ref_z = logits.detach().contiguous().requires_grad_()
    ref = sequence_logps_reference(ref_z, labels)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(z.grad, ref_z.grad)


@pytest.mark.parametrize("device,backend,dtype", CASES64)
@pytest.mark.parametrize("V", [7, 127, 128, 129, 4097, 32001])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_reference_fp64(rng, poison, device, backend, dtype, V, reduction):
    B, T = (2, 3) if V > 4097 else (3, 5)
    logits, labels = _inputs(rng, B, T, V, device, dtype)
    logits.requires_grad_()
    out = F.sequence_logps(logits, labels, reduction=reduction, backend=backend)
    tok = F.token_logps(logits, labels, backend=backend)
    g = torch.randn(B, dtype=dtype, generator=rng).to(device)
    (grad,) = torch.autograd.grad((out * g).sum(), logits)
    g_tok = torch.randn(B, T, dtype=dtype, generator=rng).to(device)
    (grad_tok,) = torch.autograd.grad((tok * g_tok).sum(), logits)

    ref_logits = logits.detach().clone().requires_grad_()
    ref = sequence_logps_reference(ref_logits, labels, reduction=reduction)
    (ref_grad,) = torch.autograd.grad((ref * g).sum(), ref_logits)
    ref_tok = token_logps_reference(ref_logits, labels)
    (ref_grad_tok,) = torch.autograd.grad((ref_tok * g_tok).sum(), ref_logits)
    assert out.dtype == torch.float64 and out.shape == (B,) and tok.shape == (B, T)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(tok, ref_tok)
    torch.testing.assert_close(grad, ref_grad)
    torch.testing.assert_close(grad_tok, ref_grad_tok)


@pytest.mark.parametrize("device,backend,dtype", CASES64)
def test_gradcheck(rng, device, backend, dtype):
    logits, labels = _inputs(rng, 2, 4, 11, device)
    labels[0, 0] = -100
    logits.requires_grad_()
    for reduction in ("sum", "mean"):
        assert torch.autograd.gradcheck(
            lambda z: F.sequence_logps(z, labels, reduction=reduction, backend=backend), (logits,))


@pytest.mark.parametrize("device,backend,dtype", CASES64)
def test_edge_shapes(rng, poison, device, backend, dtype):
    # T = 1; every position of every row ignored; one row all ignored
    for B, T, V, frac in [(3, 1, 129, 0.0), (2, 4, 130, 1.0), (1, 1, 1, 0.0)]:
        logits, labels = _inputs(rng, B, T, V, device, ignore_frac=frac)
        logits.requires_grad_()
        out = F.sequence_logps(logits, labels, reduction="mean", backend=backend)
        torch.testing.assert_close(out, sequence_logps_reference(logits.detach(), labels, reduction="mean"))
        out.sum().backward()
        if frac == 1.0:
            assert (out == 0).all() and (logits.grad == 0).all()
        assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("device,backend,dtype", CASES64)
def test_non_contiguous_logits(rng, poison, device, backend, dtype):
    # the usual shifted slice logits[:, :-1] of a model output, and a vocabulary slice
    full, labels = _inputs(rng, 3, 9, 131, device)
    for logits, lab in [(full[:, :-1], labels[:, 1:]), (full[:, :, 3:], labels.clamp(max=127)),
                        (full.transpose(0, 1), labels.T)]:
        _assert_fwd_bwd_match_reference(logits, lab.contiguous(), backend)


@pytest.mark.parametrize("device,backend,dtype", CASES64)
def test_inplace_backward(rng, poison, device, backend, dtype):
    logits, labels = _inputs(rng, 2, 5, 300, device)
    ref_z = logits.clone().requires_grad_()
    ref = sequence_logps_reference(ref_z, labels)
    g = torch.randn(2, dtype=dtype, generator=rng).to(device)
    (ref * g).sum().backward()

    leaf = logits.clone().requires_grad_()
    z = leaf * 1.0  # the kernel overwrites this intermediate buffer (as it would lm_head's output)
    out = F.sequence_logps(z, labels, inplace_backward=True, backend=backend)
    torch.testing.assert_close(out, ref)
    (out * g).sum().backward()
    torch.testing.assert_close(leaf.grad, ref_z.grad)
    torch.testing.assert_close(z.detach(), ref_z.grad)  # the buffer now holds the gradient


LOWP = cases(OP, (torch.float16, torch.bfloat16))


@pytest.mark.parametrize("device,backend,dtype", LOWP)
@pytest.mark.parametrize("V", [129, 4097, 32001])
def test_low_precision_rule(rng, device, backend, dtype, V):
    logits, labels = _inputs(rng, 2, 3, V, device, dtype)
    g = torch.randn(2, generator=rng).to(device)
    ref_z = logits.double().requires_grad_()
    ref = sequence_logps_reference(ref_z, labels)
    (ref_grad,) = torch.autograd.grad((ref * g.double()).sum(), ref_z)

    def run(fn):
        z = logits.clone().requires_grad_()
        out = fn(z)
        (grad,) = torch.autograd.grad((out * g).sum(), z)
        return out, grad

    out, grad = run(lambda z: F.sequence_logps(z, labels, backend=backend))
    e_out, e_grad = run(lambda z: eager_sequence_logps(z, labels))
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert_low_precision(out, ref, e_out, 1e-4 * V**0.5, "logps")
    assert_low_precision(grad, ref_grad, e_grad, 1e-6, "grad")


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 6), V=st.integers(1, 300), frac=st.floats(0, 1),
       seed=st.integers(0, 2**31 - 1))
def test_property_cpu(B, T, V, frac, seed):
    backend = backends(OP, "cpu", torch.float64)[0]
    logits, labels = _inputs(torch.Generator().manual_seed(seed), B, T, V, "cpu", ignore_frac=frac)
    _assert_fwd_bwd_match_reference(logits, labels, backend)


def test_float32_output_dtype(rng):
    logits, labels = _inputs(rng, 2, 3, 50, "cpu", torch.float32)
    assert F.sequence_logps(logits, labels).dtype == torch.float32
    assert F.sequence_logps(logits.half(), labels).dtype == torch.float32


def test_large_logits_are_stable(rng):
    logits, labels = _inputs(rng, 2, 3, 1000, "cpu", torch.float32)
    logits = logits + 1e4  # overflow for a naive exp
    out = F.sequence_logps(logits, labels)
    torch.testing.assert_close(out, sequence_logps_reference(logits.double(), labels).float(), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("bad,match", [
    (lambda z, y: (z[0], y), "logits: expected 3 dimensions"),
    (lambda z, y: (z.long(), y), "logits: expected dtype"),
    (lambda z, y: (z, y[:, :-1]), r"labels: expected shape \(2, 3\)"),
    (lambda z, y: (z, y.float()), "labels: expected dtype"),
    (lambda z, y: (z, y.to("meta")), "labels: expected device cpu"),
    (lambda z, y: (z, y.fill_(50)), r"labels: expected values in \[0, 50\) or ignore_index=-100, got 50"),
    (lambda z, y: (z, y.fill_(-1)), "labels: expected values"),
])
def test_bad_inputs_name_the_argument(rng, bad, match):
    logits, labels = _inputs(rng, 2, 3, 50, "cpu")
    with pytest.raises((ValueError, TypeError), match=match):
        F.sequence_logps(*bad(logits, labels))


def test_bad_reduction():
    with pytest.raises(ValueError, match="reduction: expected one of"):
        F.sequence_logps(torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), reduction="avg")


def test_compiled_kernel_checks_labels(rng):
    """The C++ operator checks label range itself (for users calling torch.ops directly)."""
    if "cpp" not in backends(OP, "cpu", torch.float32):
        pytest.skip("extension not built")
    logits, labels = _inputs(rng, 1, 2, 10, "cpu", torch.float32)
    labels[0, 1] = 10
    with pytest.raises(RuntimeError, match="labels: expected values in"):
        torch.ops.mmalign.token_logps_fwd(logits, labels, -100)
