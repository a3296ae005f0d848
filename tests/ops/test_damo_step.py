"""The fused DAMO step against the literal reference of docs/math.md sections 2, 3 and 5, every backend."""
import dataclasses
import functools
import itertools
import math

import pytest
import torch

import mmalign
import mmalign.functional as F
from mmalign import _dispatch
from mmalign.ops.damo_step import DAMOConfig, damo_step_reference, uniforms_reference

from .._numerics import DEVICES, backends, cases

OP = "damo_step"
CONFIG_FIELDS = {f.name for f in dataclasses.fields(DAMOConfig)} | {"preset"}
CONFIGS = [
    dict(),  # damo, official, sampled
    dict(selection="topk"),
    dict(variant="paper"),
    dict(variant="paper", filter="bottom"),
    dict(filter="top"),
    dict(preset="dpo"),
    dict(preset="d2po"),
    dict(preset="mdpo", selection="topk"),
    dict(combine="sum", rho=0.3),
    dict(loss_type="ipo"),
    dict(loss_type="hinge", variant="paper"),
    dict(label_smoothing=0.2),
]


def _inputs(g, N, device, dtype=torch.float64):
    logps = [(-20 + 3 * torch.randn(N, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
             for _ in range(4)]
    alpha_d = (0.5 + torch.rand(N, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
    return logps, alpha_d


def _run(logps, alpha_d, running_mean, kw, backend, seed=7, step=3):
    kw = dict(kw)
    preset = kw.pop("preset", None)
    return F.damo_step(*logps, 0.1, running_mean=running_mean, alpha_d=alpha_d,
                       config=DAMOConfig.from_preset(preset, **kw), seed=seed, step=step, backend=backend)


def _ref(logps, alpha_d, running_mean, kw, seed=7, step=3):
    kw = dict(kw)
    cfg = DAMOConfig.from_preset(kw.pop("preset", None), **kw)
    return damo_step_reference(*logps, 0.1, running_mean, cfg, alpha_d=alpha_d, seed=seed, step=step)


def _assert_same(out, ref):
    """float64 at 1e-10: tight enough to catch a float32 rounding of any input or parameter (IPO's
    1/(2 beta_i) amplifies one about 1000x), loose enough for a different summation order."""
    tol = dict(rtol=1e-10, atol=1e-12) if out.loss.dtype == torch.float64 else {}
    assert torch.equal(out.keep, ref.keep)
    torch.testing.assert_close(out.loss, ref.loss, **tol)
    torch.testing.assert_close(out.running_mean, ref.running_mean, **tol)
    for name in ("alpha_m", "beta", "chosen_rewards", "rejected_rewards", "margins", "losses"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), **tol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert torch.equal(out.accuracies, ref.accuracies)


@pytest.mark.parametrize("device,backend,dtype", cases(OP, (torch.float64, torch.float32)))
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "damo")
@pytest.mark.parametrize("g0", [0.0, 0.7])
def test_matches_reference(rng, poison, device, backend, dtype, cfg, g0):
    logps, alpha_d = _inputs(rng, 16, device, dtype)
    logps = [t.requires_grad_() for t in logps]
    g = torch.tensor(g0, device=device)
    out = _run(logps, alpha_d, g, cfg, backend)
    ref = _ref(logps, alpha_d, g, cfg)
    _assert_same(out, ref)
    assert g.item() == torch.tensor(g0).item()  # not in place unless asked
    gout = torch.autograd.grad(out.loss, logps)
    gref = torch.autograd.grad(ref.loss, logps)
    for a, b in zip(gout, gref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device,backend,dtype", cases(OP))
@pytest.mark.parametrize("N", [1, 2, 3, 16, 17, 1000, 4096, 8192, 8193])  # 8192: one full block/program
def test_fuzzed_sizes_and_k(rng, device, backend, dtype, N):
    if backend == "triton" and device == "cpu" and N > 17:
        pytest.skip("the Triton interpreter sorts 1000+ keys in ~10 s per call; cpp/reference cover it on CPU, "
                    "the GPU run covers Triton")
    if device == "cpu" and N > 4096:
        pytest.skip("the one-block/one-program limit of the GPU kernels; on CPU 4096 covers the C++ kernel")
    logps, alpha_d = _inputs(rng, N, device)
    g = torch.tensor(0.1 * torch.randn((), generator=rng).item(), device=device)
    for K, cfg in itertools.product(sorted({1, max(1, N - 1), N}), (dict(), dict(variant="paper", keep=None))):
        cfg = dict(cfg, keep=K)
        out, ref = _run(logps, alpha_d, g, cfg, backend), _ref(logps, alpha_d, g, cfg)
        assert int(out.keep.sum()) == K
        _assert_same(out, ref)


@pytest.mark.parametrize("cfg", [dict(selection="topk"), dict(preset="dpo", label_smoothing=0.1),
                                 dict(variant="paper")])
def test_long_float32_batches_match_the_reference(rng, cfg):
    """fp32 batches past the C++ kernel's vectorized-math threshold (512 pairs): values and gradients."""
    if "cpp" not in backends(OP, "cpu", torch.float32):
        pytest.skip("extension not built")
    logps, alpha_d = _inputs(rng, 1000, "cpu", torch.float32)
    logps = [t.requires_grad_() for t in logps]
    g = torch.tensor(0.2)
    out, ref = _run(logps, alpha_d, g, cfg, "cpp"), _ref(logps, alpha_d, g, cfg)
    _assert_same(out, ref)
    for a, b in zip(torch.autograd.grad(out.loss, logps), torch.autograd.grad(ref.loss, logps)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device,backend,dtype", cases(OP))
@pytest.mark.parametrize("cfg", [dict(preset="dpo"), dict(preset="d2po"), dict(preset="d2po", loss_type="ipo"),
                                 dict(preset="d2po", variant="paper", filter="both", keep=3)])
def test_gradcheck(rng, device, backend, dtype, cfg):
    """gradcheck where beta_i does not depend on the inputs (alpha_M is a detached function of them,
    so finite differences would see it move); the other presets are compared with the reference's
    autograd in test_matches_reference."""
    logps, alpha_d = _inputs(rng, 6, device)
    logps = [t.requires_grad_() for t in logps]
    g = torch.tensor(0.0, device=device)
    assert torch.autograd.gradcheck(lambda *x: _run(x, alpha_d, g, cfg, backend).loss, logps)


def test_official_topk_by_hand():
    """The released code's dpo_loss (docs/math.md §3 "official") on fixed inputs, computed by hand in floats."""
    margins = [0.5, -1.0, 2.0, 0.1, 3.5]  # u_i, with ref log-probs 0 and pr = 0: pc = u
    g, beta, gamma = 0.2, 0.1, 0.9
    alpha_d = [1.0, 1.2, 0.8, 1.0, 0.5]
    K = math.floor(0.8 * 5)  # 4
    w = [math.exp(-((a - g) ** 2) / 2) for a in margins]
    S = sorted(range(5), key=lambda i: -w[i])[:K]  # the 4 largest w: drops u = 3.5
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    alpha_m = sum(sig(margins[i]) for i in S) / K / sig(g)
    beta_i = [max(beta * alpha_d[i] * alpha_m, 1e-3) for i in range(5)]
    losses = [-math.log(sig(beta_i[i] * margins[i])) for i in range(5)]
    loss = sum(losses[i] for i in S) / K
    g_new = gamma * g + (1 - gamma) * sum(margins) / 5

    u = torch.tensor(margins, dtype=torch.float64)
    z = torch.zeros(5, dtype=torch.float64)
    for backend in backends(OP, "cpu", torch.float64, include_reference=True):
        out = F.damo_step(u, z, z, z, beta, running_mean=torch.tensor(g), config=DAMOConfig(selection="topk"),
                          alpha_d=torch.tensor(alpha_d, dtype=torch.float64), backend=backend)
        assert out.keep.tolist() == [i in S for i in range(5)], backend
        assert int(out.keep.sum()) == 4
        torch.testing.assert_close(out.alpha_m.item(), alpha_m)
        torch.testing.assert_close(out.beta.tolist(), beta_i)
        torch.testing.assert_close(out.losses.tolist(), losses)
        torch.testing.assert_close(out.loss.item(), loss)
        torch.testing.assert_close(out.running_mean.item(), g_new, rtol=1e-6, atol=1e-7)  # g is float32


def test_paper_first_step_by_hand():
    """Eq. 9-15 literally at g = 0 (the first step): R-hat = R, alpha_M = sigma(Rbar) / sigma(0)."""
    margins, beta, gamma = [1.0, -2.0, 0.5, 4.0, 0.2], 0.5, 0.9
    R = [beta * m for m in margins]  # Eq. 9; g = 0 so Eq. 10 leaves R
    d = [r ** 2 for r in R]  # Eq. 11 with g = 0
    S = sorted(range(5), key=lambda i: d[i])[:4]  # keeps the 4 smallest d: drops 4.0
    r_bar = sum(R[i] for i in S) / 4  # Eq. 12 (mean over S)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    alpha_m = sig(r_bar) / sig(0.0)  # Eq. 13
    losses = [-math.log(sig(beta * alpha_m * m)) for m in margins]  # Eq. 16-17 with alpha_D = 1
    u = torch.tensor(margins, dtype=torch.float64)
    z = torch.zeros(5, dtype=torch.float64)
    for backend in backends(OP, "cpu", torch.float64, include_reference=True):
        out = F.damo_step(u, z, z, z, beta, running_mean=torch.tensor(0.0),
                          config=DAMOConfig.from_preset("mdpo", variant="paper"), backend=backend)
        assert out.keep.tolist() == [i in S for i in range(5)]
        torch.testing.assert_close(out.alpha_m.item(), alpha_m)
        torch.testing.assert_close(out.loss.item(), sum(losses[i] for i in S) / 4)
        torch.testing.assert_close(out.running_mean.item(), (1 - gamma) * r_bar, rtol=1e-6, atol=1e-7)  # Eq. 15


def _inclusion_probabilities(w, K):
    """Exact P(i in S) for K draws without replacement with probability ~ w (successive sampling)."""
    p = [0.0] * len(w)
    for seq in itertools.permutations(range(len(w)), K):
        prob, left = 1.0, sum(w)
        for i in seq:
            prob *= w[i] / left
            left -= w[i]
        for i in seq:
            p[i] += prob
    return p


def test_sampled_selection_frequencies():
    """Over many steps the sampled mask keeps each pair as often as sampling ~ w_i without replacement."""
    margins = [0.0, 0.5, 1.0, 1.5, 2.5]
    g = 0.3
    w = [math.exp(-((a - g) ** 2) / 2) for a in margins]
    want = _inclusion_probabilities(w, 3)
    u = torch.tensor(margins, dtype=torch.float64)
    z = torch.zeros(5, dtype=torch.float64)
    backend = backends(OP, "cpu", torch.float64)[-1]
    n = 3000
    counts = torch.zeros(5)
    for step in range(n):
        counts += F.damo_step(u, z, z, z, running_mean=torch.tensor(g), config=DAMOConfig(keep=3), step=step,
                              backend=backend).keep.float()
    freq = (counts / n).tolist()
    for f, p in zip(freq, want):
        assert abs(f - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-3, (freq, want)


def test_same_seed_and_step_same_mask_on_every_backend(rng):
    logps, alpha_d = _inputs(rng, 300, "cpu")
    g = torch.tensor(-0.4)
    masks = [_run(logps, alpha_d, g, {}, b, seed=11, step=42).keep
             for b in backends(OP, "cpu", torch.float64, include_reference=True)]
    assert all(torch.equal(m, masks[0]) for m in masks)
    other = _run(logps, alpha_d, g, {}, "reference", seed=11, step=43).keep
    assert not torch.equal(other, masks[0])


def test_uniforms_are_uniform():
    u = uniforms_reference(1, 2, 100000)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002


def test_arguments_made_unread_by_the_callers_own_choice_pass():
    """keep with filter='none', selection with variant='paper', rho with combine='product': given together, a
    choice (a sweep over filters with one keep), not a mistake; only a setting the caller did not give refuses."""
    u = torch.zeros(4, dtype=torch.float64)
    for kw in (dict(filter="none", keep=3), dict(variant="paper", selection="topk"), dict(combine="product", rho=0.3),
               dict(preset="dpo", filter="both", keep=0.5)):
        F.damo_step(u, u, u, u, running_mean=torch.tensor(0.0), config=DAMOConfig.from_preset(kw.pop("preset", None),
                                                                                              **kw))


def test_filters_keep_what_table_3_says():
    u = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    z = torch.zeros(5, dtype=torch.float64)
    g = torch.tensor(0.0)
    kept = {f: F.damo_step(u, z, z, z, 1.0, running_mean=g, config=DAMOConfig(filter=f, keep=3, variant="paper")
                           ).keep.tolist()
            for f in ("both", "bottom", "top", "none")}
    assert kept["both"] == [False, True, True, True, False]  # both extremes dropped
    assert kept["bottom"] == [True, True, True, False, False]  # the largest rewards dropped
    assert kept["top"] == [False, False, True, True, True]  # the smallest rewards dropped
    assert kept["none"] == [True] * 5


def test_presets_apply_the_right_factors(rng):
    logps, alpha_d = _inputs(rng, 10, "cpu")
    g = torch.tensor(0.2)
    dpo = F.damo_step(*logps, running_mean=g, alpha_d=alpha_d, config=DAMOConfig.from_preset("dpo"))
    assert dpo.keep.all() and torch.allclose(dpo.beta, torch.full((10,), 0.1, dtype=torch.float64))
    d2po = F.damo_step(*logps, running_mean=g, alpha_d=alpha_d, config=DAMOConfig.from_preset("d2po"))
    assert d2po.keep.all() and torch.allclose(d2po.beta, 0.1 * alpha_d)
    mdpo = F.damo_step(*logps, running_mean=g, alpha_d=alpha_d, config=DAMOConfig.from_preset("mdpo"))
    assert int(mdpo.keep.sum()) == 8
    torch.testing.assert_close(mdpo.beta, (0.1 * mdpo.alpha_m).expand(10).clamp(min=1e-3))
    damo = F.damo_step(*logps, running_mean=g, alpha_d=alpha_d, config=DAMOConfig.from_preset("damo"))
    torch.testing.assert_close(damo.beta, (0.1 * alpha_d * damo.alpha_m).clamp(min=1e-3))


@pytest.mark.parametrize("device,backend,dtype", cases(OP))
def test_underflowing_weights_keep_the_closest(rng, device, backend, dtype):
    u = torch.tensor([100.0, 90.0, 300.0, 95.0, 250.0], dtype=dtype, device=device)
    z = torch.zeros_like(u)
    out = F.damo_step(u, z, z, z, running_mean=torch.tensor(0.0, device=device), config=DAMOConfig(keep=3),
                      backend=backend)
    assert out.keep.tolist() == [True, True, False, True, False]


@pytest.mark.parametrize("device,backend,dtype", cases(OP))
def test_ties_break_towards_the_lower_index(device, backend, dtype):
    u = torch.full((6,), 0.5, dtype=dtype, device=device)
    z = torch.zeros_like(u)
    out = F.damo_step(u, z, z, z, running_mean=torch.tensor(0.0, device=device),
                      config=DAMOConfig(keep=4, selection="topk"), backend=backend)
    assert out.keep.tolist() == [True] * 4 + [False] * 2


@pytest.mark.parametrize("device,backend,dtype", cases(OP))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_propagate_when_unchecked(device, backend, dtype, bad):
    u = torch.tensor([0.1, bad, 0.3, -0.2], dtype=dtype, device=device)
    z = torch.zeros_like(u)
    g = torch.tensor(0.25, device=device)
    out = F.damo_step(u, z, z, z, running_mean=g, check_inputs=False, backend=backend)
    assert math.isnan(out.loss.item()) and not out.keep.any()
    assert out.running_mean.item() == 0.25
    with pytest.raises(ValueError, match="policy_chosen_logps: expected finite values"):
        F.damo_step(u, z, z, z, running_mean=g, backend=backend)


@pytest.mark.parametrize("device,backend,dtype", cases(OP))
@pytest.mark.parametrize("arg", ["policy_chosen_logps", "ref_rejected_logps", "running_mean", "alpha_d", "weights",
                                 "beta"])
def test_checked_inputs_name_the_argument_and_change_nothing(rng, device, backend, dtype, arg):
    """check_inputs (the default): the C++ kernel tests the values in its own pass, Triton and the
    reference through the Python check; the same message, and neither g nor step is touched."""
    logps, alpha_d = _inputs(rng, 6, device, dtype)
    kw = dict(alpha_d=alpha_d, weights=torch.ones(6, dtype=dtype, device=device), beta=0.1)
    g, step = torch.tensor(0.25, device=device), torch.tensor(4, device=device)
    if arg in ("alpha_d", "weights"):
        kw[arg] = kw[arg].clone().index_fill_(0, torch.tensor([2], device=device), float("nan"))
    elif arg == "beta":
        kw["beta"] = torch.full((6,), 0.1, dtype=dtype, device=device).index_fill_(0, torch.tensor([3], device=device),
                                                                                     -0.1)
    elif arg == "running_mean":
        g.fill_(float("inf"))
    else:
        i = 0 if arg == "policy_chosen_logps" else 3
        logps[i] = logps[i].clone().index_fill_(0, torch.tensor([1], device=device), float("-inf"))
    match = "beta: expected every beta > 0" if arg == "beta" else f"{arg}: expected finite values"
    with pytest.raises(ValueError, match=match):
        F.damo_step(*logps, running_mean=g, step=step, increment_step=True, inplace=True, backend=backend, **kw)
    assert step.item() == 4 and (g.item() == 0.25 or arg == "running_mean")


@pytest.mark.parametrize("device,backend,dtype", cases(OP))
def test_gradient_through_per_pair_losses(rng, device, backend, dtype):
    """Gradients flowing into the per-pair losses (alone, with the loss, and as an expanded, stride-0
    gradient from losses.sum()) match the reference's autograd."""
    logps, alpha_d = _inputs(rng, 12, device, dtype)
    logps = [t.requires_grad_() for t in logps]
    g = torch.tensor(0.3, device=device)
    w = torch.rand(12, generator=rng, dtype=torch.float64).to(device=device, dtype=dtype)
    out, ref = _run(logps, alpha_d, g, {}, backend), _ref(logps, alpha_d, g, {})
    for f in (lambda o: o.losses.sum(), lambda o: (o.losses * w).sum() + 3 * o.loss):
        for a, b in zip(torch.autograd.grad(f(out), logps, retain_graph=True),
                        torch.autograd.grad(f(ref), logps, retain_graph=True)):
            torch.testing.assert_close(a, b)


MIXED = [(torch.float32, torch.float64, torch.float32, torch.float32),
         (torch.float16, torch.float32, torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("device,backend,dtype", cases(OP, (torch.float32,)))
@pytest.mark.parametrize("dtypes", MIXED, ids=lambda d: "-".join(str(t)[6:] for t in d))
def test_mixed_input_dtypes_compute_in_the_promoted_dtype(rng, poison, device, backend, dtype, dtypes):
    """Log-probs of different dtypes (say a float64 policy and a float32 reference) give every backend
    the reference's result in torch's promoted dtype, and each input its gradient in its own dtype."""
    logps, alpha_d = _inputs(rng, 12, device)
    logps = [t.to(dt).requires_grad_() for t, dt in zip(logps, dtypes)]
    g = torch.tensor(0.3, device=device)
    out, ref = _run(logps, alpha_d, g, {}, backend), _ref(logps, alpha_d, g, {})
    assert out.loss.dtype == ref.loss.dtype == functools.reduce(torch.promote_types, dtypes)
    _assert_same(out, ref)
    for t, a, b in zip(logps, torch.autograd.grad(out.loss, logps), torch.autograd.grad(ref.loss, logps)):
        assert a.dtype == t.dtype
        torch.testing.assert_close(a, b)


def test_inference_mode_runs_without_autograd(rng):
    """Under torch.inference_mode the operator runs its forward kernel alone (no autograd kernel)."""
    logps, alpha_d = _inputs(rng, 16, "cpu")
    ref = _ref(logps, alpha_d, torch.tensor(0.2), {})
    for backend in backends(OP, "cpu", torch.float64):
        with torch.inference_mode():
            out = _run(logps, alpha_d, torch.tensor(0.2), {}, backend)
        _assert_same(out, ref)


def test_in_place_running_mean_and_step_tensor(rng):
    logps, alpha_d = _inputs(rng, 16, "cpu")
    for backend in backends(OP, "cpu", torch.float64, include_reference=True):
        g, step = torch.tensor(0.0), torch.tensor(5)
        ref = _ref(logps, alpha_d, g.clone(), {}, step=5)
        out = F.damo_step(*logps, running_mean=g, alpha_d=alpha_d, seed=7, step=step, increment_step=True, inplace=True,
                          backend=backend)
        assert out.running_mean is g and g.item() == ref.running_mean.item() and step.item() == 6
        assert torch.equal(out.keep, ref.keep)


@pytest.mark.parametrize("backend", backends(OP, "cpu", torch.float64, include_reference=True))
def test_in_place_state_advances_the_version_counters(rng, backend):
    """The running mean and the step counter written in place are seen by autograd: a graph that saved the running
    mean before the step refuses to run backward on its stale value. A step that updates nothing leaves the running
    mean's version and the step's value alone (the Triton operator declares ``step`` mutable, so reading it on the
    device counts as a write to its version counter)."""
    logps, alpha_d = _inputs(rng, 8, "cpu")
    g, step = torch.tensor(0.2), torch.tensor(3)
    scale = torch.tensor(2.0, requires_grad=True)
    uses_g = scale * g  # saves g for its backward
    versions = (g._version, step._version)
    F.damo_step(*logps, running_mean=g, alpha_d=alpha_d, step=step, increment_step=True, inplace=True,
                backend=backend)
    assert g._version > versions[0] and step._version > versions[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        uses_g.backward()
    version, value = g._version, (g.item(), step.item())
    F.damo_step(*logps, running_mean=g, alpha_d=alpha_d, step=step, backend=backend)
    assert g._version == version and (g.item(), step.item()) == value


@pytest.mark.parametrize("kw,match", [
    (dict(beta=0.0), "beta: expected beta > 0"),
    (dict(keep=9), "keep: K = 9 is larger than the batch N = 8"),
    (dict(keep=0), "keep: expected K >= 1"),
    (dict(keep=1.5), r"keep: expected a keep ratio in \(0, 1\]"),
    (dict(keep=0.0), r"keep: expected a keep ratio in \(0, 1\]"),
    (dict(gamma=1.0), r"gamma: expected a value in \[0, 1\)"),
    (dict(gamma=-0.1), r"gamma: expected a value in \[0, 1\)"),
    (dict(variant="v2"), "variant: expected one of"),
    (dict(selection="multinomial"), "selection: expected one of"),
    (dict(filter="middle"), "filter: expected one of"),
    (dict(preset="kto"), "preset: expected one of"),
    (dict(alpha_d=torch.ones(7)), r"alpha_d: expected shape \(8,\)"),
    (dict(running_mean=torch.zeros(1)), r"running_mean: expected shape \(\)"),
    (dict(running_mean=torch.zeros((), dtype=torch.float64)), "running_mean: expected dtype"),
    (dict(step=torch.tensor(1.0)), "step: expected dtype"),
    (dict(seed=-1), "seed: expected an int"),
    (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing: only loss_type='sigmoid' smooths labels"),
    (dict(preset="dpo", keep=0.5), r"keep: has no effect here \(preset 'dpo'\): filter='none' keeps every pair"),
    (dict(preset="d2po", selection="topk"), r"selection: has no effect here \(preset 'd2po'\): only variant="),
    (dict(rho=0.3), r"rho: has no effect here \(the default\): only combine='sum'"),
    (dict(config="dpo"), r"config: expected a DAMOConfig \(DAMOConfig.from_preset\(name, ...\) for a preset\), "
                         "got str"),
])
def test_bad_arguments_name_the_argument(kw, match):
    """Configuration fields go through DAMOConfig.from_preset (checked there), the rest to damo_step."""
    logps = [torch.zeros(8) - 1 for _ in range(4)]
    kw = dict(kw)
    g = kw.pop("running_mean", torch.tensor(0.0))
    fields = {k: kw.pop(k) for k in list(kw) if k in CONFIG_FIELDS}
    with pytest.raises((ValueError, TypeError), match=match):
        if fields:
            kw["config"] = DAMOConfig.from_preset(fields.pop("preset", None), **fields)
        F.damo_step(*logps, running_mean=g, **kw)


def test_one_way_to_configure():
    """damo_step takes a DAMOConfig and nothing else: no preset or per-field keywords beside it."""
    logps = [torch.zeros(8) - 1 for _ in range(4)]
    for kw in (dict(preset="dpo"), dict(keep=3), dict(variant="paper")):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            F.damo_step(*logps, running_mean=torch.tensor(0.0), **kw)


def test_mismatched_devices():
    a = torch.zeros(4)
    with pytest.raises(ValueError, match="policy_rejected_logps: expected device cpu"):
        F.damo_step(a, a.to("meta"), a, a, running_mean=torch.tensor(0.0))


def test_keep_one_and_keep_ratio_one_are_different_configs(rng):
    """keep=1 is K = 1, keep=1.0 keeps every pair; 1 == 1.0 in Python, so no cache may mix them up."""
    logps, alpha_d = _inputs(rng, 8, "cpu")
    for first, second in ((1, 1.0), (1.0, 1)):
        a = F.damo_step(*logps, running_mean=torch.tensor(0.0), config=DAMOConfig(keep=first))
        b = F.damo_step(*logps, running_mean=torch.tensor(0.0), config=DAMOConfig(keep=second))
        assert {int(a.keep.sum()), int(b.keep.sum())} == {1, 8}
    assert DAMOConfig(keep=1) != DAMOConfig(keep=1.0) and DAMOConfig.from_preset(None, keep=1.0).keep == 1.0


def test_module_state_and_modes(rng):
    logps, alpha_d = _inputs(rng, 16, "cpu")
    m = mmalign.nn.DAMOLoss(beta=0.1, seed=3)
    first = m(*logps, alpha_d=alpha_d)
    assert m.step.item() == 1 and m.running_mean.item() == first.running_mean.item() != 0
    clone = mmalign.nn.DAMOLoss(config=DAMOConfig.from_preset("dpo"))
    clone.load_state_dict(m.state_dict())
    assert clone.seed == 3 and clone.config == m.config and clone.step.item() == 1
    a, b = m(*logps, alpha_d=alpha_d), clone(*logps, alpha_d=alpha_d)  # resumed: same draw at step 1
    assert torch.equal(a.keep, b.keep) and m.running_mean.item() == clone.running_mean.item()
    m.eval()
    before = (m.running_mean.item(), m.step.item())
    m(*logps, alpha_d=alpha_d)
    assert (m.running_mean.item(), m.step.item()) == before


@pytest.mark.parametrize("cast", ["bfloat16", "half", "double", "to"])
def test_module_keeps_a_float32_running_mean_through_model_casts(rng, cast):
    """A model holding the loss, cast to another dtype as a whole (model.bfloat16() and the like), keeps
    the loss's running mean float32 and exact, and the loss still runs on logps of the new dtype."""
    logps, alpha_d = _inputs(rng, 16, "cpu")
    model = torch.nn.Module()
    model.head, model.loss = torch.nn.Linear(2, 2), mmalign.nn.DAMOLoss(seed=1)
    model.loss(*logps, alpha_d=alpha_d)
    g = model.loss.running_mean.clone()
    model = model.to(torch.float16) if cast == "to" else getattr(model, cast)()
    assert model.head.weight.dtype != torch.float32
    assert model.loss.running_mean.dtype == torch.float32 and torch.equal(model.loss.running_mean, g)
    assert model.loss.step.dtype == torch.int64
    out = model.loss(*[t.to(model.head.weight.dtype) for t in logps], alpha_d=alpha_d)
    assert out.running_mean is model.loss.running_mean and model.loss.step.item() == 2


def _step_without_sync(n: int, backend=None):
    """One DAMOLoss step (check_inputs=False) on n CUDA pairs under sync debug mode "error": any host
    synchronization raises."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logps = [torch.randn(n, device="cuda", generator=g) - 20 for _ in range(4)]
    m = mmalign.nn.DAMOLoss(check_inputs=False, backend=backend).to("cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = m(*logps)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert m.step.item() == 1 and out.keep.sum().item() == int(0.8 * n)
    return m, logps


@pytest.mark.gpu
@pytest.mark.parametrize("n", [16, 10000])  # 10000: past MAX_FUSED_N = 8192, the multi-program path
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_no_host_sync_and_graph_capture(n, backend):
    """With check_inputs=False the step never synchronizes, and it replays inside a CUDA graph."""
    if _dispatch.not_supported_reasons(OP, backend, "cuda", torch.float32):
        pytest.skip(f"no {backend} backend here")
    m, logps = _step_without_sync(n, backend)
    static = [t.clone() for t in logps]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        m(*static)  # warm-up on a side stream
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = m(*static)  # noqa: F841 (the captured output stays alive while the graph replays)
    step0, g0 = m.step.item(), m.running_mean.item()
    graph.replay()
    torch.cuda.synchronize()
    assert m.step.item() == step0 + 1 and m.running_mean.item() != g0


@pytest.mark.parametrize("x", [0.1, 1 / 3, 0.95, 1e-8, 0.0, 123.456789, -2.5e-3, float("inf")])
def test_float_arguments_reach_the_kernels_in_float64(x):
    """Triton passes Python floats to a GPU kernel as float32: beta, gamma, rho, eps and min_beta go in as
    an exact float32 (hi, lo) pair that the kernels add in the accumulation dtype."""
    np = pytest.importorskip("numpy")
    from mmalign.ops.damo_step_triton import split_float

    hi, lo = split_float(x)
    assert float(np.float32(hi)) == hi and float(np.float32(lo)) == lo
    if math.isfinite(x):
        assert abs((hi + lo) - x) <= 2.0 ** -47 * abs(x)
    else:
        assert (hi, lo) == (x, 0.0)


@pytest.fixture
def multi_program(monkeypatch):
    """The Triton backend with one program capped at 16 pairs, 16 pairs per program past it: batches of a
    few dozen pairs take the multi-program path under the interpreter."""
    import mmalign.ops.damo_step_triton as dt

    if "triton" not in backends(OP, DEVICES[-1], torch.float64):
        pytest.skip("no Triton backend here")
    calls = []
    monkeypatch.setattr(dt, "MAX_FUSED_N", 16)
    monkeypatch.setattr(dt, "MP_BLOCK", 16)
    monkeypatch.setattr(dt, "_multi_program_fwd", lambda *a, f=dt._multi_program_fwd: calls.append(1) or f(*a))
    return calls


@pytest.mark.parametrize("cfg", CONFIGS + [dict(filter="bottom"), dict(keep=1.0), dict(keep=3)],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "damo")
def test_multi_program_path_matches_the_reference(rng, multi_program, cfg):
    """Past MAX_FUSED_N: a grid of programs (here 5, the last one partial) gives the reference's mask,
    values and gradients; the step tensor is read on the device and incremented."""
    dev = DEVICES[-1]
    logps, alpha_d = _inputs(rng, 70, dev)
    logps = [t.requires_grad_() for t in logps]
    g, step = torch.tensor(0.3, device=dev), torch.tensor(3, device=dev)
    kw = dict(cfg)
    config = DAMOConfig.from_preset(kw.pop("preset", None), **kw)
    out = F.damo_step(*logps, 0.1, running_mean=g, alpha_d=alpha_d, config=config, seed=7, step=step,
                      increment_step=True, backend="triton")
    assert multi_program and step.item() == 4
    ref = _ref(logps, alpha_d, g, cfg)
    _assert_same(out, ref)
    for a, b in zip(torch.autograd.grad(out.loss, logps), torch.autograd.grad(ref.loss, logps)):
        torch.testing.assert_close(a, b)


def test_multi_program_path_with_weights_beta_tensor_and_many_programs(rng, multi_program, monkeypatch):
    """Per-pair beta and weights, 18 programs (the partials span more than one 16-wide block), and the
    gradient through the per-pair losses."""
    import mmalign.ops.damo_step_triton as dt

    monkeypatch.setattr(dt, "MP_BLOCK", 4)
    dev = DEVICES[-1]
    logps, alpha_d = _inputs(rng, 70, dev)
    logps = [t.requires_grad_() for t in logps]
    beta = 0.05 + 0.1 * torch.rand(70, generator=rng, dtype=torch.float64).to(dev)
    weights = torch.rand(70, generator=rng, dtype=torch.float64).to(dev)
    for cfg in (DAMOConfig(variant="paper"), DAMOConfig(combine="sum", rho=0.3)):
        out = F.damo_step(*logps, beta, running_mean=torch.tensor(0.4, device=dev), alpha_d=alpha_d, weights=weights,
                          config=cfg, seed=3, step=11, backend="triton")
        ref = damo_step_reference(*logps, beta, torch.tensor(0.4, device=dev), cfg, alpha_d=alpha_d, weights=weights,
                                  seed=3, step=11)
        _assert_same(out, ref)
        probe = torch.randn(70, generator=rng, dtype=torch.float64).to(dev)
        objective = lambda o: o.loss + (o.losses * probe).sum()  # noqa: E731
        for a, b in zip(torch.autograd.grad(objective(out), logps), torch.autograd.grad(objective(ref), logps)):
            torch.testing.assert_close(a, b)


def test_multi_program_gradcheck(rng, multi_program):
    """As test_gradcheck: a filtered preset whose beta_i does not move with the inputs."""
    dev = DEVICES[-1]
    logps, alpha_d = _inputs(rng, 40, dev)
    logps = [t.requires_grad_() for t in logps]
    cfg = DAMOConfig.from_preset("d2po", variant="paper", filter="both", keep=30)
    f = lambda *x: F.damo_step(*x, running_mean=torch.tensor(0.2, device=dev), alpha_d=alpha_d,  # noqa: E731
                               config=cfg, backend="triton").loss
    assert torch.autograd.gradcheck(f, logps)


def test_multi_program_keys_equal_the_one_program_keys(rng, monkeypatch):
    """float32, sampled selection included: the multi-program path keeps exactly the pairs the one-program
    kernel keeps (and the C++ kernel), because both build the same float32 keys."""
    import mmalign.ops.damo_step_triton as dt

    dev = DEVICES[-1]
    if "triton" not in backends(OP, dev, torch.float32):
        pytest.skip("no Triton backend here")
    logps, alpha_d = _inputs(rng, 300, dev, torch.float32)
    for cfg in (DAMOConfig(), DAMOConfig(variant="paper"), DAMOConfig(filter="top", keep=17)):
        run = lambda: F.damo_step(*logps, running_mean=torch.tensor(0.4, device=dev), alpha_d=alpha_d,  # noqa: E731
                                  config=cfg,
                                  seed=5, step=9, backend="triton")
        one = run()
        monkeypatch.setattr(dt, "MAX_FUSED_N", 64)
        monkeypatch.setattr(dt, "MP_BLOCK", 64)
        many = run()
        monkeypatch.undo()
        assert torch.equal(one.keep, many.keep)
        torch.testing.assert_close(one.loss, many.loss)
        torch.testing.assert_close(one.running_mean, many.running_mean)
        if "cpp" in backends(OP, "cpu", torch.float32):
            c = F.damo_step(*[t.cpu() for t in logps], running_mean=torch.tensor(0.4), alpha_d=alpha_d.cpu(),
                            config=cfg, seed=5,
                            step=9, backend="cpp")
            assert torch.equal(c.keep, many.keep.cpu())


@pytest.mark.parametrize("cfg", [DAMOConfig(), DAMOConfig(variant="paper", filter="bottom"),
                                 DAMOConfig.from_preset("dpo", loss_type="ipo")], ids=["damo", "paper-bottom", "dpo"])
def test_multi_program_path_at_its_real_sizes(rng, cfg):
    """No monkeypatching: 9000 float32 pairs, past MAX_FUSED_N = 8192, in 1024-pair programs: the C++
    kernel's mask and values (the keys kernel, torch.topk's threshold and the partials at their sizes)."""
    import mmalign.ops.damo_step_triton as dt

    dev = DEVICES[-1]
    if "triton" not in backends(OP, dev, torch.float32) or "cpp" not in backends(OP, "cpu", torch.float32):
        pytest.skip("needs the Triton and C++ backends")
    logps, alpha_d = _inputs(rng, dt.MAX_FUSED_N + 808, dev, torch.float32)
    a = F.damo_step(*logps, running_mean=torch.tensor(0.3, device=dev), alpha_d=alpha_d, config=cfg, seed=3, step=5,
                    backend="triton")
    b = F.damo_step(*[t.cpu() for t in logps], running_mean=torch.tensor(0.3), alpha_d=alpha_d.cpu(), config=cfg,
                    seed=3, step=5,
                    backend="cpp")
    assert torch.equal(a.keep.cpu(), b.keep)
    torch.testing.assert_close(a.loss.cpu(), b.loss)
    torch.testing.assert_close(a.running_mean.cpu(), b.running_mean)
    torch.testing.assert_close(a.losses.cpu(), b.losses)


def test_multi_program_underflowing_weights_keep_the_closest(multi_program):
    """Every w_i = 0 (A far from g): the sampled selection falls back to the K closest to g, decided from
    the batch-wide maximum the first keys launch writes."""
    dev = DEVICES[-1]
    u = torch.linspace(-3, 3, 40, dtype=torch.float64, device=dev)
    z = torch.zeros(40, dtype=torch.float64, device=dev)
    g = torch.tensor(1000.0, device=dev)
    out = F.damo_step(u, z, z, z, running_mean=g, config=DAMOConfig(keep=10), backend="triton")
    assert out.keep.nonzero().flatten().tolist() == list(range(30, 40))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees 1 / 0 (sum of kept weights)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_multi_program_path_propagates_non_finite_inputs(multi_program, bad):
    dev = DEVICES[-1]
    u = torch.linspace(-1, 1, 40, dtype=torch.float64, device=dev)
    u[33] = bad
    u.requires_grad_()
    z = torch.zeros(40, dtype=torch.float64, device=dev)
    out = F.damo_step(u, z, z, z, running_mean=torch.tensor(0.25, device=dev), check_inputs=False, backend="triton")
    assert math.isnan(out.loss.item()) and not out.keep.any() and out.running_mean.item() == 0.25
    assert torch.isnan(out.losses).all()
    assert torch.isnan(torch.autograd.grad(out.loss, u)[0]).all()
