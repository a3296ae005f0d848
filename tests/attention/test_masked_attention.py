"""masked_attention against SDPA with the equivalent boolean mask in float64 (the reference), under the
Triton interpreter on CPU and on the GPU when there is one."""
import pytest
import torch

from mmalign import _dispatch
from mmalign.attention import masked_attention, masked_attention_reference
from mmalign.attention.masked import masked_attention_triton, visibility_mask

from .._numerics import DEVICES, assert_low_precision, cases

FP32 = cases("masked_attention", (torch.float32,))
LOW = cases("masked_attention", (torch.float16,) + ((torch.bfloat16,) if torch.cuda.is_available() else ()))


def _inputs(rng, B, Hq, Hkv, Tq, Tk, D, device, dtype, keep_rate=None, scope=False):
    q = torch.randn(B, Hq, Tq, D, generator=rng).to(device, dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=rng).to(device, dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=rng).to(device, dtype)
    keep = None if keep_rate is None else (torch.rand(B, Tk, generator=rng) < keep_rate).to(device)
    sc = (torch.rand(B, Tq, generator=rng) < 0.6).to(device) if scope else None
    return q, k, v, keep, sc


def _ref(q, k, v, keep, sc, causal=True):
    return masked_attention_reference(q.double(), k.double(), v.double(), keep, query_scope=sc, causal=causal)


@pytest.mark.parametrize("device, backend, dtype", FP32)
@pytest.mark.parametrize("shape", [(2, 4, 2, 70, 70, 64), (1, 3, 1, 17, 17, 80), (2, 2, 2, 1, 1, 96),
                                   (1, 4, 4, 40, 40, 128), (2, 4, 2, 129, 129, 64)])
@pytest.mark.parametrize("keep_rate", [None, 0.0, 0.01, 0.5, 1.0])
def test_prefill_matches_reference(rng, poison, device, backend, dtype, shape, keep_rate):
    q, k, v, keep, _ = _inputs(rng, *shape, device, dtype, keep_rate)
    out = masked_attention(q, k, v, key_keep=keep, backend=backend)
    torch.testing.assert_close(out.double(), _ref(q, k, v, keep, None), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device, backend, dtype", FP32)
@pytest.mark.parametrize("causal", [True, False])
def test_query_scope_text_only_variant(rng, poison, device, backend, dtype, causal):
    q, k, v, keep, sc = _inputs(rng, 2, 4, 2, 90, 90, 64, device, dtype, 0.1, scope=True)
    sc[0, :32] = True  # a block of only scoped queries takes the kept-key walk, the others the dense one
    out = masked_attention(q, k, v, key_keep=keep, query_scope=sc, causal=causal, backend=backend)
    torch.testing.assert_close(out.double(), _ref(q, k, v, keep, sc, causal), rtol=2e-5, atol=2e-5)
    # scoped queries never read a hidden key: changing hidden keys' values leaves their rows unchanged
    v2 = torch.where(keep[:, None, :, None], v, v + 10)
    out2 = masked_attention(q, k, v2, key_keep=keep, query_scope=sc, causal=causal, backend=backend)
    rows = sc[:, None, :, None].expand_as(out)
    assert torch.equal(out[rows], out2[rows]) and not torch.equal(out[~rows], out2[~rows])


@pytest.mark.parametrize("device, backend, dtype", FP32)
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_decode_split_kv(rng, poison, device, backend, dtype, splits):
    q, k, v, keep, _ = _inputs(rng, 2, 8, 2, 2, 300, 64, device, dtype, 0.3)
    out = masked_attention(q, k, v, key_keep=keep, num_splits=splits, backend=backend)
    torch.testing.assert_close(out.double(), _ref(q, k, v, keep, None), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device, backend, dtype", FP32)
def test_decode_step_by_step_equals_prefill(rng, device, backend, dtype):
    q, k, v, keep, _ = _inputs(rng, 1, 2, 1, 48, 48, 64, device, dtype, 0.5)
    keep[:, 0] = True
    full = masked_attention(q, k, v, key_keep=keep, backend=backend)
    for t in (0, 17, 47):
        step = masked_attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], key_keep=keep[:, :t + 1],
                                backend=backend)
        torch.testing.assert_close(step, full[:, :, t:t + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device, backend, dtype", FP32)
def test_left_padding_and_empty_rows_give_zero_not_nan(rng, poison, device, backend, dtype):
    q, k, v, _, _ = _inputs(rng, 2, 2, 2, 40, 40, 64, device, dtype)
    keep = torch.ones(2, 40, dtype=torch.bool, device=device)
    keep[1, :13] = False  # sample 1 is left-padded by 13
    out = masked_attention(q, k, v, key_keep=keep, backend=backend)
    assert torch.isfinite(out).all() and (out[1, :, :13] == 0).all()
    torch.testing.assert_close(out.double(), _ref(q, k, v, keep, None), rtol=2e-5, atol=2e-5)
    # the padded sample equals the same sample without its padding
    alone = masked_attention(q[1:, :, 13:], k[1:, :, 13:], v[1:, :, 13:], backend=backend)
    torch.testing.assert_close(out[1:, :, 13:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device, backend, dtype", FP32)
def test_layouts_from_hugging_face(rng, device, backend, dtype):
    """HF hands over (B, T, H, D).transpose(1, 2): non-contiguous heads."""
    q, k, v, keep, _ = _inputs(rng, 2, 4, 2, 33, 33, 64, device, dtype, 0.5)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    torch.testing.assert_close(masked_attention(qt, kt, vt, key_keep=keep, backend=backend),
                               masked_attention(q, k, v, key_keep=keep, backend=backend))


@pytest.mark.parametrize("device, backend, dtype", LOW)
def test_low_precision_flash_attn_rule(rng, device, backend, dtype):
    q, k, v, keep, sc = _inputs(rng, 2, 4, 2, 64, 64, 64, device, dtype, 0.2, scope=True)
    ref = _ref(q, k, v, keep, sc)
    eager = masked_attention_reference(q, k, v, keep, query_scope=sc)
    out = masked_attention(q, k, v, key_keep=keep, query_scope=sc, backend=backend)
    assert out.dtype == dtype
    assert_low_precision(out, ref, eager, 1e-3, f"masked_attention {dtype}")


GRAD_CASES = [  # (B, Hq, Hkv, Tq, Tk, D, causal, keep rate, query scope, splits): GQA, decode, splits, padding
    (1, 2, 1, 6, 6, 16, True, 0.5, True, None),
    (2, 4, 2, 17, 17, 32, True, 0.5, False, None),
    (1, 2, 2, 5, 9, 16, False, 0.7, True, None),
    (2, 2, 1, 3, 40, 16, True, 0.6, False, 3),
    (1, 1, 1, 7, 7, 80, True, None, False, None),
    (2, 2, 2, 70, 70, 16, True, 0.3, True, None),  # several 64-row blocks in both backward kernels
]


@pytest.mark.parametrize("device, backend, dtype", FP32)
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-causal={c[6]}-keep={c[7]}")
def test_triton_backward_matches_the_reference_gradients(rng, poison, device, backend, dtype, case):
    """The Triton kernels' backward (not the reference's autograd) against float64 SDPA autograd: dq, dk, dv
    for GQA heads, masks with and without query scope, non-causal, split-KV forward and left padding (rows that
    see no key get zero gradient)."""
    B, Hq, Hkv, Tq, Tk, D, causal, rate, scope, splits = case
    q, k, v, keep, sc = _inputs(rng, B, Hq, Hkv, Tq, Tk, D, device, dtype, rate, scope and rate is not None)
    if keep is not None:
        keep[0, :2] = False  # left padding: in causal attention the first rows of sample 0 see nothing
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = masked_attention(*leaves, key_keep=keep, query_scope=sc, causal=causal, num_splits=splits, backend=backend)
    g = torch.randn(out.shape, generator=rng).to(device, dtype)
    grads = torch.autograd.grad(out, leaves, g)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = masked_attention_reference(*ref_leaves, keep, query_scope=sc, causal=causal)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g.double())
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("device, backend, dtype", FP32)
@pytest.mark.filterwarnings("ignore:Input #\\d+ requires gradient and is not a double")
def test_triton_backward_gradcheck(rng, device, backend, dtype):
    """gradcheck of the Triton kernels' own backward (the reference's autograd is not involved). tl.dot has no
    float64, so it runs in float32, in fast mode (random projections u'J v of the Jacobian: each interpreted
    launch costs milliseconds; the test above compares whole gradients). The projections are O(1e-2), so the
    tolerance is absolute 1e-6 plus 2e-3 relative: central differences with eps 1e-2 in float32 stay within it,
    a gradient 1% off does not."""
    q, k, v, keep, sc = _inputs(rng, 1, 2, 1, 5, 5, 16, device, dtype, 0.6, scope=True)
    keep[:, 0] = True
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: masked_attention(a, b, c, key_keep=keep, query_scope=sc, backend=backend), inputs,
        eps=1e-2, atol=1e-6, rtol=2e-3, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_automatic_choice_with_gradients_is_the_reference(rng, device):
    """Without backend=, a call that needs a gradient runs the reference (SDPA and its autograd): the same bits."""
    q, k, v, keep, sc = _inputs(rng, 1, 2, 1, 6, 6, 8, device, torch.float64, 0.5, scope=True)
    keep[:, 0] = True
    q.requires_grad_()
    out = masked_attention(q, k, v, key_keep=keep, query_scope=sc)
    assert torch.equal(out, masked_attention_reference(q, k, v, keep, query_scope=sc))
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_visibility_mask_rule():
    keep = torch.tensor([[True, False, True, False]])
    scope = torch.tensor([[False, True]])
    m = visibility_mask(2, 4, keep, scope)[0, 0]
    # queries sit at positions 2 and 3; the unscoped one (row 0) still sees hidden key 1
    assert m.tolist() == [[True, True, True, False], [True, False, True, False]]


def test_argument_errors():
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 3, 8, 16)
    with pytest.raises(ValueError, match="k: its 3 heads must divide q's 4"):
        masked_attention(q, k, k)
    with pytest.raises(ValueError, match="k, v: expected equal shapes"):
        masked_attention(q, q, q[:, :, :4])
    with pytest.raises(ValueError, match=r"key_keep: expected a bool tensor of shape \(1, 8\)"):
        masked_attention(q, q, q, key_keep=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="query_scope: only meaningful with key_keep"):
        masked_attention(q, q, q, query_scope=torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="q: expected a 4-D tensor"):
        masked_attention(q[0], q, q)
    with pytest.raises(ValueError, match="v: expected torch.float32"):
        masked_attention(q, q, q.double())
    reasons = _dispatch.not_supported_reasons("masked_attention", "triton", "cpu", torch.float64)
    assert any("Triton kernel takes" in r for r in reasons)


@pytest.mark.gpu
def test_split_heuristic_on_gpu(rng):
    q, k, v, keep, _ = _inputs(rng, 1, 8, 1, 1, 8192, 128, "cuda", torch.bfloat16, 0.01)
    out = masked_attention_triton(q, k, v, keep)
    ref = _ref(q, k, v, keep, None)
    assert_low_precision(out, ref, masked_attention_reference(q, k, v, keep), 1e-3, "decode bf16")


def test_packed_bitmask(rng):
    from mmalign.attention.masked import pack_keep, unpack_keep

    keep = torch.rand(3, 29, generator=rng) < 0.4
    packed = pack_keep(keep)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 4)
    assert torch.equal(unpack_keep(packed, 29), keep)
    q, k, v, _, _ = _inputs(rng, 3, 2, 1, 29, 29, 16, "cpu", torch.float64)
    keep[:, 0] = True
    torch.testing.assert_close(masked_attention(q, k, v, key_keep=pack_keep(keep)),
                               masked_attention(q, k, v, key_keep=keep))
    with pytest.raises(ValueError, match="packed uint8 bitmask must have shape"):
        masked_attention(q, k, v, key_keep=packed[:, :2])


@pytest.mark.parametrize("B,T,p", [(1, 1, 0.5), (3, 17, 0.3), (2, 1000, 0.01), (4, 64, 0.0), (4, 64, 1.0), (2, 0, 0.5)])
def test_kept_key_index_is_a_stable_partition(B, T, p):
    """IDX lists each sample's kept keys in order, then its hidden ones in order (what a stable argsort by
    "hidden" gives, built without a sort); COUNT[b, j] counts the kept keys before j."""
    from mmalign.attention.masked import kept_key_index

    keep = torch.rand(B, T, generator=torch.Generator().manual_seed(T)) < p
    idx, count = kept_key_index(keep)
    assert idx.dtype == count.dtype == torch.int32 and idx.shape == (B, T) and count.shape == (B, T + 1)
    assert torch.equal(idx, torch.argsort((~keep).int(), dim=1, stable=True).int())
    assert torch.equal(count, torch.nn.functional.pad(keep.int().cumsum(1), (1, 0)).int())


def test_prepared_keys_are_reused_until_the_mask_changes():
    from mmalign.attention.masked import prepared_keys

    keep = torch.rand(2, 40, generator=torch.Generator().manual_seed(0)) > 0.5
    first = prepared_keys(keep)
    assert prepared_keys(keep) is first
    assert prepared_keys(keep.clone()) is not first  # another tensor
    keep[0, :4] = False  # in place
    again = prepared_keys(keep)
    assert again is not first and torch.equal(again[0], keep.to(torch.int8))
    assert torch.equal(again[1], torch.argsort((~keep).int(), dim=1, stable=True).int())
