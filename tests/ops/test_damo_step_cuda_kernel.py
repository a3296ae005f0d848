"""The CUDA DAMO step kernels' own code (forward and backward), run on the host: csrc/cuda/damo_step_kernel.cuh compiled with g++
against csrc/cuda/simt_host.h (one std::thread per CUDA thread, emulated barriers and warp shuffles),
compared output by output with the C++ CPU kernel (mmalign::damo_step_fwd on CPU tensors), which the
other tests hold to the docs/math.md reference. What this cannot show (CUDA's memory model, real warps,
speed) is left to the GPU run of test_damo_step.py, whose cases include backend="cuda"."""
import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmalign.ops import damo_step as ds
from mmalign.ops.damo_step import DAMOConfig
from mmalign.ops.limits import DAMO_ONE_PROGRAM_MAX_N

from .._numerics import backends

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [DAMOConfig(), DAMOConfig(selection="topk"), DAMOConfig(variant="paper"),
           DAMOConfig(variant="paper", filter="bottom"), DAMOConfig(filter="top", keep=5),
           DAMOConfig.from_preset("dpo"), DAMOConfig.from_preset("d2po", loss_type="ipo"),
           DAMOConfig(combine="sum", rho=0.3, loss_type="hinge"), DAMOConfig(label_smoothing=0.2, keep=1.0)]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """tests/ops/_damo_step_cuda_host.cpp built with g++ (the kernel header against simt_host.h)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    if "cpp" not in backends("damo_step", "cpu", torch.float64):
        pytest.skip("the C++ CPU kernel (the oracle) is not built")
    lib = tmp_path_factory.mktemp("simt") / "damo_step_host.so"
    # the shared system libstdc++ by soname, as setup.py links mmalign._C (a toolchain's own static or newer
    # runtime beside torch's is what that avoids)
    link = ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []
    subprocess.run([cxx, "-std=c++17", "-O1", "-pthread", "-shared", "-fPIC", f"-I{ROOT / 'csrc'}", "-o", str(lib),
                    str(ROOT / "tests" / "ops" / "_damo_step_cuda_host.cpp"), *link], check=True, capture_output=True)
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module")
def kernel(library):
    library.damo_step_host.restype = ctypes.c_int
    return library.damo_step_host


@pytest.fixture(scope="module")
def backward_kernel(library):
    return library.damo_step_bwd_host


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _host_step(fn, x: ds.StepInputs, cfg: DAMOConfig):
    """The emulated CUDA kernel on contiguous CPU tensors: the 11 outputs of damo_step_fwd, plus g_out."""
    N, dt = x.pc.shape[0], x.pc.dtype
    k = ds.kernel_args(cfg, N)
    out = [torch.full((), float("nan"), dtype=dt)] + [torch.full((N,), float("nan"), dtype=dt) for _ in range(9)] + \
        [torch.full((), float("nan"), dtype=dt)]
    out[2] = torch.zeros(N, dtype=torch.bool)
    out[7] = torch.ones(N, dtype=torch.bool)
    beta_t = x.beta if isinstance(x.beta, torch.Tensor) else None
    alpha_d = x.alpha_d if cfg.use_alpha_d else None
    step_t = x.step if isinstance(x.step, torch.Tensor) else None
    rc = fn(ctypes.c_int(dt == torch.float64), ctypes.c_int64(N), *map(_ptr, (x.pc, x.pr, x.rc, x.rr, beta_t)),
            ctypes.c_double(0.0 if beta_t is not None else float(x.beta)), _ptr(alpha_d), _ptr(x.weights),
            _ptr(x.g), _ptr(x.g_out), _ptr(step_t), ctypes.c_int64(0 if step_t is not None else int(x.step)),
            ctypes.c_int64(x.seed), ctypes.c_int64(k.K), ctypes.c_double(k.gamma), ctypes.c_double(k.rho),
            ctypes.c_double(k.eps), ctypes.c_double(k.min_beta), ctypes.c_int(k.paper), ctypes.c_int64(k.select),
            ctypes.c_int64(k.loss_kind), ctypes.c_int(k.use_m), ctypes.c_int(k.combine_sum),
            ctypes.c_int(x.incr_step and step_t is not None), *map(_ptr, out))
    assert rc == 0
    return out


def _cpu_step(x: ds.StepInputs, cfg: DAMOConfig):
    N = x.pc.shape[0]
    beta_t = x.beta if isinstance(x.beta, torch.Tensor) else None
    step_t = x.step if isinstance(x.step, torch.Tensor) else None
    return list(torch.ops.mmalign.damo_step_fwd(
        x.pc, x.pr, x.rc, x.rr, beta_t, 0.0 if beta_t is not None else float(x.beta),
        x.alpha_d if cfg.use_alpha_d else None, x.weights, x.g, x.g_out, step_t,
        0 if step_t is not None else int(x.step), x.seed, *ds.kernel_args(cfg, N),
        x.incr_step and step_t is not None, False))


NAMES = ("loss", "losses", "keep", "beta", "chosen_rewards", "rejected_rewards", "margins", "accuracies", "grad_u",
         "dl_du", "alpha_m")


def _inputs(N, dtype, seed, *, beta_tensor=False, weights=False, g=0.3):
    gen = torch.Generator().manual_seed(seed)
    lp = [(-20 + 3 * torch.randn(N, generator=gen, dtype=torch.float64)).to(dtype) for _ in range(4)]
    alpha_d = (0.5 + torch.rand(N, generator=gen, dtype=torch.float64)).to(dtype)
    beta = (0.05 + 0.1 * torch.rand(N, generator=gen, dtype=torch.float64)).to(dtype) if beta_tensor else 0.1
    w = torch.rand(N, generator=gen, dtype=torch.float64).to(dtype) if weights else None
    return lp, alpha_d, beta, w, torch.tensor(g)


def _compare(kernel, lp, alpha_d, beta, w, g, cfg, *, step=3, incr=False):
    results = []
    for run in (lambda x: _host_step(kernel, x, cfg), lambda x: _cpu_step(x, cfg)):
        g_out = torch.full((), float("nan"))
        st = torch.tensor(step) if incr else step
        results.append((run(ds.StepInputs(*lp, beta, alpha_d, w, g, g_out, st, 7, incr)), g_out, st))
    (host, g_host, s_host), (cpu, g_cpu, s_cpu) = results
    for name, a, b in zip(NAMES, host, cpu):
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:  # sums in another order: not bit-equal
            torch.testing.assert_close(a, b, equal_nan=True, msg=name)
    torch.testing.assert_close(g_host, g_cpu, equal_nan=True)
    if incr:
        assert s_host.item() == s_cpu.item() == step + 1
    return host


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.variant}-{c.select_code()}-{c.loss_type}-{c.keep}")
@pytest.mark.parametrize("N", [1, 5, 33, 300])
def test_host_build_of_the_cuda_kernel_matches_the_cpu_kernel(kernel, cfg, N):
    lp, alpha_d, beta, w, g = _inputs(N, torch.float64, N)
    if cfg.keep == 5 and N < 5:
        pytest.skip("K > N")
    _compare(kernel, lp, alpha_d, beta, w, g, cfg)


@pytest.mark.parametrize("N", [1500, 8192])  # 2 and 8 pairs per thread of a full block
def test_several_pairs_per_thread(kernel, N):
    lp, alpha_d, beta, w, g = _inputs(N, torch.float64, N, beta_tensor=True, weights=True)
    _compare(kernel, lp, alpha_d, beta, w, g, DAMOConfig(), incr=True)


def test_float32_keys_and_step_tensor(kernel):
    """float32: the same float32 keys and Gumbel noise give the same kept set; the step tensor is read and
    incremented by the kernel; per-pair beta and weights are read."""
    lp, alpha_d, beta, w, g = _inputs(257, torch.float32, 1, beta_tensor=True, weights=True)
    for cfg in (DAMOConfig(), DAMOConfig(variant="paper")):
        _compare(kernel, lp, alpha_d, beta, w, g, cfg, step=41, incr=True)


def test_underflowing_weights_and_non_finite_inputs(kernel):
    lp, alpha_d, beta, w, _ = _inputs(40, torch.float64, 2)
    _compare(kernel, lp, alpha_d, beta, w, torch.tensor(1000.0), DAMOConfig(keep=10))  # every w_i = 0
    lp[0][17] = float("nan")  # documented: NaN loss, losses and gradient, empty mask, g unchanged
    g_out = torch.full((), float("nan"))
    out = _host_step(kernel, ds.StepInputs(*lp, beta, alpha_d, w, torch.tensor(0.2), g_out, 3, 7, False),
                     DAMOConfig())
    assert torch.isnan(out[0]) and torch.isnan(out[1]).all() and not out[2].any() and torch.isnan(out[8]).all()
    assert g_out.item() == pytest.approx(0.2)


def test_one_block_limit_is_the_python_side_limit(kernel):
    """kMaxN of the kernel (one block) is limits.DAMO_ONE_PROGRAM_MAX_N, past which mmalign._dispatch sends "cuda"
    to Triton: the host entry refuses one pair more before touching any pointer (8192 runs in the test above)."""
    args = [ctypes.c_int(1), ctypes.c_int64(DAMO_ONE_PROGRAM_MAX_N + 1)] + [None] * 35
    assert kernel(*args) == 1


@pytest.mark.parametrize("gl,gls,neg", [(True, False, True), (False, True, True), (True, True, False), (False, False, True)])
@pytest.mark.parametrize("N", [5, 700])  # 700 > one 256-thread block: the block-stride loop
def test_backward_kernel(backward_kernel, gl, gls, neg, N):
    """gu = g_loss * grad_u + g_losses * dl_du into pos, -gu into neg; either gradient may be absent, and
    g_losses may be an expanded (stride 0) tensor."""
    gen = torch.Generator().manual_seed(N)
    grad_u, dl_du = torch.randn(N, generator=gen, dtype=torch.float64), torch.randn(N, generator=gen, dtype=torch.float64)
    g_loss = torch.tensor(0.7, dtype=torch.float64) if gl else None
    g_losses = torch.randn(N, generator=gen, dtype=torch.float64) if gls and N == 5 else (
        torch.tensor([1.5], dtype=torch.float64).expand(N) if gls else None)
    pos, minus = torch.full((N,), float("nan"), dtype=torch.float64), torch.full((N,), float("nan"), dtype=torch.float64)
    backward_kernel(ctypes.c_int64(N), _ptr(grad_u), _ptr(dl_du), _ptr(g_loss), _ptr(g_losses),
                    ctypes.c_int64(g_losses.stride(0) if g_losses is not None else 0), _ptr(pos),
                    _ptr(minus) if neg else None, ctypes.c_int(256))
    expected = (0.7 * grad_u if gl else torch.zeros(N, dtype=torch.float64)) + (g_losses * dl_du if gls else 0)
    torch.testing.assert_close(pos, expected)
    if neg:
        torch.testing.assert_close(minus, -expected)
    else:
        assert torch.isnan(minus).all()


@pytest.mark.parametrize("N", [40, 2500])  # 2500: ties across a thread's several pairs
def test_ties_break_towards_the_lower_index(kernel, N):
    """Equal keys: the lower index is kept first, in every slot of every thread."""
    z = torch.zeros(N, dtype=torch.float64)
    u = torch.tensor([0.5, -0.5, 0.25] * N, dtype=torch.float64)[:N]
    for cfg in (DAMOConfig(selection="topk", keep=N // 2), DAMOConfig(filter="top", keep=N // 3 + 1)):
        out = _compare(kernel, [u, z, z, z], torch.ones(N, dtype=torch.float64), 0.1, None, torch.tensor(0.0), cfg)
        kept = out[2].nonzero().flatten()
        assert kept.numel() == cfg.keep
