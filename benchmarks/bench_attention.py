"""masked_attention (BDHS, docs/math.md §7): causal attention over a LLaVA-1.6-like sequence whose image keys
are ~99% hidden (ρ_th = 0.99), prefill and decode. Providers, all forward only:

  sdpa-mask     torch SDPA with the equivalent boolean mask (falls off the flash path)
  flex          FlexAttention under torch.compile (its intended use: uncompiled it runs an unfused
                fallback that materializes the scores) with a block mask built for the batch (GPU only,
                when available; the block-mask build is timed too, as it is needed per batch; the
                compilation happens in the warm-up round)
  mmalign       mmalign's Triton kernel (GPU; on CPU it would be the interpreter, not benchmarked)
  compact-sdpa  the exact compaction path: attention over the sequence with hidden tokens removed
                (SDPA, padding mask); the compaction itself is done once per prefill and not timed:
                the upper bound

GPU: B=8, 32 query / 8 KV heads, D=128, T=3000 of which 2900 image tokens, bf16; decode: 1 query over the
same keys. CPU (reference paths only): B=1, 8/2 heads, D=64, T=1024 with 900 image tokens, fp32."""
import functools

import pytest
import torch

from mmalign import _dispatch
from mmalign.attention import compact_image_tokens, masked_attention, masked_attention_reference, sample_image_keep

from conftest import run_case

PROVIDERS = ["sdpa-mask", "flex", "mmalign", "compact-sdpa"]


def _shape(device, quick):
    if device == "cuda":
        return dict(B=8, Hq=32, Hkv=8, T=3000, n_image=2900, D=128, dtype=torch.bfloat16)
    return dict(B=1, Hq=8, Hkv=2, T=512 if quick else 1024, n_image=450 if quick else 900, D=64, dtype=torch.float32)


def _inputs(device, B, Hq, Hkv, T, n_image, D, dtype, tq):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, Hq, tq, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, T, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, T, D, device=device, dtype=dtype, generator=g)
    image = torch.zeros(B, T, dtype=torch.bool, device=device)
    image[:, 5:5 + n_image] = True
    keep = sample_image_keep(image, 0.99, generator=torch.Generator().manual_seed(1)).to(device)
    return q, k, v, keep


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, keep):
    from torch.nn.attention.flex_attention import create_block_mask

    tq, tk = q.shape[2], k.shape[2]

    def mask_mod(b, h, i, j):
        return (j <= i + (tk - tq)) & keep[b, j]

    block = create_block_mask(mask_mod, q.shape[0], None, tq, tk, device=q.device, _compile=True)
    return _compiled_flex()(q, k, v, block_mask=block, enable_gqa=True)


def _compact_inputs(q, k, v, keep):
    """Per-head K/V and (prefill) queries with hidden positions removed, left-padded, and their mask."""
    B, Hkv, T, D = k.shape
    tq = q.shape[2]
    c = compact_image_tokens(torch.zeros(B, T, 1, device=k.device), keep)
    idx = c.index.clamp_min(0)
    gather = lambda t: torch.gather(t, 2, idx[:, None, :, None].expand(B, t.shape[1], idx.shape[1], D))  # noqa: E731
    kc, vc = gather(k), gather(v)
    qc = gather(q) if tq == T else q
    pad = c.attention_mask.bool()
    tqc = qc.shape[2]
    causal = torch.ones(tqc, idx.shape[1], dtype=torch.bool, device=k.device).tril(idx.shape[1] - tqc)
    mask = causal[None, None] & pad[:, None, None, :]
    return qc, kc, vc, mask


def _sdpa(q, k, v, mask):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_masked_attention(benchmark, device, quick, mode, provider):
    s = _shape(device, quick)
    dtype = s.pop("dtype")
    tq = s["T"] if mode == "prefill" else 1
    if provider == "mmalign" and (device != "cuda" or _dispatch.not_supported_reasons(
            "masked_attention", "triton", device, dtype)):
        pytest.skip("the Triton kernel is benchmarked on a GPU only")
    if provider == "flex":
        if device != "cuda":
            pytest.skip("FlexAttention is benchmarked on a GPU only")
        pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v, keep = _inputs(device, **s, dtype=dtype, tq=tq)
    if provider == "sdpa-mask":
        fn, args = (lambda q, k, v, keep: masked_attention_reference(q, k, v, keep)), (q, k, v, keep)
    elif provider == "flex":
        fn, args = _flex, (q, k, v, keep)
    elif provider == "mmalign":
        fn, args = (lambda q, k, v, keep: masked_attention(q, k, v, key_keep=keep, backend="triton")), (q, k, v, keep)
    else:
        fn, args = _sdpa, _compact_inputs(q, k, v, keep)
    shape = f"B={s['B']} H={s['Hq']}/{s['Hkv']} T={s['T']} image={s['n_image']} D={s['D']} " \
            f"{str(dtype).replace('torch.', '')} keep=1%"
    benchmark.group = f"masked_attention {mode} {shape}"
    with torch.no_grad():
        run_case(benchmark, device, fn, lambda: args, op="masked_attention", mode=mode, provider=provider, shape=shape)
