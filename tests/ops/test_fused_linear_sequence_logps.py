"""fused_linear_sequence_logps against the float64 reference (full logits), every backend."""
import pytest
import torch

import mmalign.functional as F
from mmalign.ops_demo import eager_sequence_logps
from mmalign.ops.fused_linear_sequence_logps import chunk_rows, fused_linear_token_logps_reference
from mmalign.ops.sequence_logps import reduce_token_logps

from .._numerics import assert_low_precision, cases

OP = "fused_linear_sequence_logps"


def _inputs(g, B, T, H, V, device, dtype=torch.float64, ignore_frac=0.4, bias=True):
    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)

    hidden, weight = rand(B, T, H), rand(V, H, scale=H**-0.5)
    b = rand(V) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignore_frac] = -100
    return hidden, weight, b, labels.to(device)


def _reference(hidden, weight, bias, labels, reduction="sum"):
    tok = fused_linear_token_logps_reference(hidden, weight, labels, bias)
    return reduce_token_logps(tok, labels, -100, reduction), tok


@pytest.mark.parametrize("device,backend,dtype", cases(OP))
@pytest.mark.parametrize("chunk_size", [1, 3, 7, None])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("V", [7, 129, 4097])
def test_matches_reference_fp64(rng, poison, device, backend, dtype, chunk_size, bias, V):
    hidden, weight, b, labels = _inputs(rng, 2, 6, 16, V, device, bias=bias)
    leaves = [t.requires_grad_() for t in (hidden, weight, b) if t is not None]
    out = F.fused_linear_sequence_logps(hidden, weight, labels, bias=b, chunk_size=chunk_size, backend=backend)
    tok = F.fused_linear_token_logps(hidden, weight, labels, bias=b, chunk_size=chunk_size, backend=backend)
    g = torch.randn(2, generator=rng, dtype=dtype).to(device)
    g_tok = torch.randn(2, 6, generator=rng, dtype=dtype).to(device)
    grads = torch.autograd.grad((out * g).sum() + (tok * g_tok).sum(), leaves)
    ref, ref_tok = _reference(hidden, weight, b, labels)
    ref_grads = torch.autograd.grad((ref * g).sum() + (ref_tok * g_tok).sum(), leaves)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(tok, ref_tok)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device,backend,dtype", cases(OP))
def test_gradcheck(rng, device, backend, dtype):
    hidden, weight, b, labels = _inputs(rng, 2, 5, 4, 9, device)
    labels[0, 0] = -100
    for reduction in ("sum", "mean"):
        assert torch.autograd.gradcheck(
            lambda h, w, bb: F.fused_linear_sequence_logps(h, w, labels, bias=bb, chunk_size=3, reduction=reduction,
                                                           backend=backend),
            tuple(t.requires_grad_() for t in (hidden, weight, b)))


TRANSFORMS = [dict(logit_softcap=0.7), dict(logit_scale=0.25), dict(logit_scale=3.0, logit_softcap=2.0)]


@pytest.mark.parametrize("device,backend,dtype", cases(OP) + [pytest.param("cpu", "reference", torch.float64,
                                                                           id="cpu-reference-float64")])
@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: "-".join(f"{k}={v}" for k, v in t.items()))
def test_logit_transform_matches_the_transformed_logits(rng, poison, device, backend, dtype, transform):
    """Soft-capped and scaled logits (Gemma-2, Cohere, Granite) equal sequence_logps of the transformed full
    logits, values and gradients, over several chunks; gradcheck in float64."""
    hidden, weight, b, labels = _inputs(rng, 2, 6, 16, 33, device)
    hidden = 4 * hidden  # logits of several units: the cap bends them (a softcap of 0.7 caps |z| < 0.7)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    out = F.fused_linear_sequence_logps(hidden, weight, labels, bias=b, chunk_size=5, backend=backend, **transform)
    z = (hidden @ weight.T + b) * transform.get("logit_scale", 1.0)
    cap = transform.get("logit_softcap")
    z = cap * torch.tanh(z / cap) if cap else z
    want = torch.log_softmax(z, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0].masked_fill(labels < 0, 0).sum(1)
    assert (out - F.fused_linear_sequence_logps(hidden, weight, labels, bias=b, backend=backend)).abs().max() > 0.1
    torch.testing.assert_close(out, want)
    g = torch.randn(2, generator=rng, dtype=dtype).to(device)
    for got, ref in zip(torch.autograd.grad((out * g).sum(), leaves), torch.autograd.grad((want * g).sum(), leaves)):
        torch.testing.assert_close(got, ref)
    h, w, bb, y = _inputs(rng, 2, 3, 4, 9, device)
    assert torch.autograd.gradcheck(
        lambda *x: F.fused_linear_sequence_logps(x[0], x[1], y, bias=x[2], chunk_size=2, backend=backend, **transform),
        (h.requires_grad_(), w.requires_grad_(), bb.requires_grad_()))


@pytest.mark.parametrize("kw,match", [(dict(logit_scale=0.0), "logit_scale: expected a finite non-zero"),
                                      (dict(logit_scale=float("nan")), "logit_scale"),
                                      (dict(logit_softcap=0.0), "logit_softcap: expected a finite float > 0"),
                                      (dict(logit_softcap=-1.0), "logit_softcap"),
                                      (dict(logit_softcap=True), "logit_softcap")])
def test_bad_logit_transform(rng, kw, match):
    hidden, weight, b, labels = _inputs(rng, 1, 2, 4, 5, "cpu")
    with pytest.raises(ValueError, match=match):
        F.fused_linear_sequence_logps(hidden, weight, labels, **kw)


@pytest.mark.parametrize("device,backend,dtype", cases(OP))
def test_all_ignored_and_single_token(rng, device, backend, dtype):
    hidden, weight, b, labels = _inputs(rng, 2, 3, 8, 11, device, ignore_frac=1.0)
    hidden.requires_grad_(), weight.requires_grad_()
    out = F.fused_linear_sequence_logps(hidden, weight, labels, bias=b, backend=backend)
    assert (out == 0).all()
    out.sum().backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()
    hidden, weight, b, labels = _inputs(rng, 1, 1, 8, 11, device, ignore_frac=0.0)
    torch.testing.assert_close(F.fused_linear_sequence_logps(hidden, weight, labels, bias=b, backend=backend),
                               _reference(hidden, weight, b, labels)[0])


@pytest.mark.parametrize("device,backend,dtype", cases(OP, (torch.float16, torch.bfloat16)))
def test_low_precision_rule(rng, device, backend, dtype):
    hidden, weight, b, labels = _inputs(rng, 2, 16, 32, 257, device, dtype)
    g = torch.randn(2, generator=rng).to(device)
    ref_leaves = [t.double().requires_grad_() for t in (hidden, weight, b)]
    ref = _reference(*ref_leaves, labels)[0]
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), ref_leaves)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
        out = fn(*leaves)
        return out, torch.autograd.grad((out * g).sum(), leaves)

    out, grads = run(lambda h, w, bb: F.fused_linear_sequence_logps(h, w, labels, bias=bb, chunk_size=5, backend=backend))
    e_out, e_grads = run(lambda h, w, bb: eager_sequence_logps(h @ w.T + bb, labels))
    assert_low_precision(out, ref, e_out, 1e-3, "logps")
    for name, got, eager, want in zip(("hidden", "weight", "bias"), grads, e_grads, ref_grads):
        assert got.dtype == dtype
        assert_low_precision(got, want, eager, 1e-3, f"grad {name}")


def test_chunk_rows_fits_budget():
    assert chunk_rows(32000, torch.bfloat16, 256) == 4160  # 256 MiB / 64000 B, rounded down to 64
    assert chunk_rows(152064, torch.float32, 1) == 16  # never fewer than 16 rows
    for v in (7, 32000, 128256):
        rows = chunk_rows(v, torch.float16, 64)
        assert rows >= 16 and (rows < 64 or rows % 64 == 0)
        assert rows * v * 2 <= 64 * 2**20 or rows == 16


def test_noncontiguous_hidden(rng):
    hidden, weight, b, labels = _inputs(rng, 3, 8, 16, 50, "cpu")
    h = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(F.fused_linear_sequence_logps(h, weight, labels, bias=b, chunk_size=4),
                               _reference(hidden, weight, b, labels)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu_multiplies_in_fp32(rng, dtype):
    """CPU half-precision GEMMs are slow (or pathological: bf16 on AVX2), so on CPU the chunk matmuls of
    fp16/bf16 inputs run in fp32: the result is that of the fp32 op on the same (rounded) values, and the
    gradients are its gradients rounded once to the inputs' dtype."""
    hidden, weight, b, labels = _inputs(rng, 2, 9, 16, 300, "cpu", dtype=dtype)
    results = []
    for cast in (lambda t: t, lambda t: t.float()):
        leaves = [cast(t).detach().requires_grad_() for t in (hidden, weight, b)]
        out = F.fused_linear_sequence_logps(*leaves[:2], labels, bias=leaves[2], chunk_size=5, backend="cpp")
        out.sum().backward()
        results.append((out, *[t.grad for t in leaves]))
    (out, *grads), (ref, *ref_grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad, ref_grad.to(dtype), rtol=0, atol=0)


def test_under_autocast_like_a_linear_layer(rng):
    """Under torch.autocast (bf16) an fp32 hidden and an fp32 or bf16 head give the op on the bf16-cast values,
    forward and backward alike, even when backward() itself runs under autocast; the fp32 leaves get fp32
    gradients (those of the bf16 op through the casts)."""
    hidden, weight, b, labels = _inputs(rng, 2, 9, 16, 300, "cpu", dtype=torch.float32)
    results = []
    for mode in ("autocast", "autocast-bf16-head", "cast"):
        leaves = [t.detach().requires_grad_() for t in (hidden, weight, b)]
        h, w, bb = leaves
        if mode == "autocast-bf16-head":  # the frozen reference of mmalign's trainer: its head is already bf16
            w, bb = w.to(torch.bfloat16), bb.to(torch.bfloat16)
        if mode == "cast":
            h, w, bb = (t.to(torch.bfloat16) for t in (h, w, bb))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "cast"):
            out = F.fused_linear_sequence_logps(h, w, labels, bias=bb, chunk_size=5, backend="cpp")
            out.sum().backward()
        results.append((out, *[t.grad for t in leaves]))
    for got in results[:2]:
        for a, e in zip(got, results[2]):
            assert a.dtype == e.dtype
            torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert results[0][2].dtype == torch.float32 and results[0][2].abs().sum() > 0


@pytest.mark.parametrize("bad,match", [
    (lambda h, w, b, y: (h[0], w, y, b), "hidden: expected 3 dimensions"),
    (lambda h, w, b, y: (h, w[:, :-1], y, b), r"weight: expected shape \(\*, 16\)"),
    (lambda h, w, b, y: (h, w.float(), y, b), "weight: expected dtype"),
    (lambda h, w, b, y: (h, w, y, b[:-1]), r"bias: expected shape \(50,\)"),
    (lambda h, w, b, y: (h, w, y[:, 1:], b), r"labels: expected shape \(3, 8\)"),
    (lambda h, w, b, y: (h, w, y.fill_(50), b), r"labels: expected values in \[0, 50\)"),
])
def test_bad_inputs_name_the_argument(rng, bad, match):
    hidden, weight, b, labels = _inputs(rng, 3, 8, 16, 50, "cpu")
    h, w, y, bb = bad(hidden, weight, b, labels)
    with pytest.raises((ValueError, TypeError), match=match):
        F.fused_linear_sequence_logps(h, w, y, bias=bb)


def test_bad_chunk_size(rng):
    hidden, weight, b, labels = _inputs(rng, 1, 2, 4, 5, "cpu")
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        F.fused_linear_sequence_logps(hidden, weight, labels, chunk_size=0)
