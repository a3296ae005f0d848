"""Every public function under torch.compile(fullgraph=True), on every backend that runs here (Triton under the
interpreter on CPU; cuda and GPU Triton where there is a GPU): the same outputs, gradients and state updates as
eager. And torch.library.opcheck on every operator of the package (schemas, declared mutations, fake kernels,
autograd registrations). Tiny shapes: the interpreter costs milliseconds per program."""
import pytest
import torch

import mmalign.functional as F
from mmalign import _dispatch, _ext
from mmalign.functional import DAMOConfig

from .._numerics import DEVICES

COMPILER = "aot_eager"  # the graph torch.compile hands to a backend; inductor would add codegen time only


def _cases(op, dtype):
    """(device, backend) for every backend on every device of this machine, each skipped with its reasons when
    it cannot run here (cuda without a GPU, the extension not built, ...)."""
    out = []
    for device in DEVICES + (["cuda"] if "cuda" not in DEVICES else []):
        for backend in _dispatch.BACKENDS:
            reasons = (["no CUDA device"] if device == "cuda" and not torch.cuda.is_available()
                       else _dispatch.not_supported_reasons(op, backend, device, dtype))
            marks = pytest.mark.skip(reason="; ".join(reasons)) if reasons else ()
            out.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return out


def _tensors(out):
    return [out] if isinstance(out, torch.Tensor) else [t for t in out]


def _assert_compiled_equals_eager(fn, make_args, n_leaves):
    """fn(*args) compiled with fullgraph=True against eager, on fresh copies of the arguments: every output,
    the gradient of every leaf (the first n_leaves arguments) through the differentiable outputs, and every
    argument afterwards (the in-place state)."""
    results = []
    for run in (fn, torch.compile(fn, backend=COMPILER, fullgraph=True)):
        args = make_args()
        leaves = args[:n_leaves]
        out = _tensors(run(*args))
        diff = [t for t in out if t.requires_grad]
        probes = [torch.linspace(-1, 1, t.numel(), dtype=t.dtype, device=t.device).view(t.shape) for t in diff]
        grads = torch.autograd.grad(sum((t * p).sum() for t, p in zip(diff, probes)), leaves)
        results.append((out, grads, [a for a in args if isinstance(a, torch.Tensor)]))
    (out, grads, args), (c_out, c_grads, c_args) = results
    assert len(out) == len(c_out) and grads
    pairs = [("output", x, y) for x, y in zip(out, c_out)] + [("grad", x, y) for x, y in zip(grads, c_grads)]
    for name, a, b in pairs + [("argument", x, y) for x, y in zip(args, c_args)]:
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(b, a, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


def _leaf(g, *shape, device, dtype=torch.float64, scale=1.0, shift=0.0):
    return (shift + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device, dtype).requires_grad_()


def _labels(g, B, T, V, device):
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0] = -100
    return labels.to(device)


@pytest.mark.parametrize("device,backend", _cases("token_logps", torch.float64))
@pytest.mark.parametrize("op,inplace", [("token_logps", False), ("sequence_logps", False), ("sequence_logps", True)],
                         ids=["token_logps", "sequence_logps", "sequence_logps-inplace_backward"])
def test_log_probs(device, backend, op, inplace):
    """inplace_backward: the gradient written over an intermediate's buffer (the declared mutation of the backward
    operator; the reference ignores the flag)."""
    fn = lambda z, y: getattr(F, op)(z * 1.5, y, inplace_backward=inplace, backend=backend)  # noqa: E731
    seed = torch.Generator().manual_seed(1)
    z0, y = _leaf(seed, 2, 3, 11, device=device).detach(), _labels(seed, 2, 3, 11, device)
    _assert_compiled_equals_eager(fn, lambda: (z0.clone().requires_grad_(), y), 1)


@pytest.mark.parametrize("device,backend", _cases("fused_linear_token_logps", torch.float64))
@pytest.mark.parametrize("op", ["fused_linear_token_logps", "fused_linear_sequence_logps"])
def test_fused_linear_log_probs(device, backend, op):
    fn = lambda h, w, b, y: getattr(F, op)(h, w, y, bias=b, chunk_size=4, logit_softcap=3.0,  # noqa: E731
                                           backend=backend)
    seed = torch.Generator().manual_seed(2)
    h, w, b = (_leaf(seed, *s, device=device).detach() for s in ((2, 3, 8), (11, 8), (11,)))
    y = _labels(seed, 2, 3, 11, device)
    _assert_compiled_equals_eager(fn, lambda: (*(t.clone().requires_grad_() for t in (h, w, b)), y), 3)


def _pairs(device, n=6):
    seed = torch.Generator().manual_seed(3)
    return [_leaf(seed, n, device=device, scale=2.0, shift=-5.0).detach() for _ in range(4)]


@pytest.mark.parametrize("device,backend", _cases("preference_loss", torch.float64))
def test_preference_loss(device, backend):
    logps = _pairs(device)
    beta = torch.linspace(0.1, 0.3, 6, dtype=torch.float64, device=device)
    fn = lambda *x: F.preference_loss(*x, beta, loss_type="ipo", backend=backend)  # noqa: E731
    _assert_compiled_equals_eager(fn, lambda: [t.clone().requires_grad_() for t in logps], 4)


@pytest.mark.parametrize("device,backend", _cases("damo_step", torch.float64))
@pytest.mark.parametrize("config", [DAMOConfig(keep=4), DAMOConfig(variant="paper", filter="bottom")],
                         ids=["official-sampled", "paper-bottom"])
def test_damo_step_and_its_in_place_state(device, backend, config):
    """The declared mutations: in place, the running mean and the step counter end where eager leaves them."""
    if backend == "reference":
        pytest.skip("the reference is docs/math.md's Python control flow on tensor values (host synchronizations by "
                    "design, damo_step's docstring): it compiles with graph breaks, not as one graph")
    logps = _pairs(device)
    alpha_d = torch.linspace(0.5, 1.5, 6, dtype=torch.float64, device=device)

    def fn(pc, pr, rc, rr, g, step):
        return F.damo_step(pc, pr, rc, rr, 0.1, running_mean=g, config=config, alpha_d=alpha_d, seed=5, step=step,
                           increment_step=True, inplace=True, backend=backend)

    _assert_compiled_equals_eager(fn, lambda: [t.clone().requires_grad_() for t in logps] + [
        torch.tensor(0.2, device=device), torch.tensor(7, device=device)], 4)


@pytest.mark.parametrize("device,backend", _cases("masked_attention", torch.float32))
def test_masked_attention(device, backend):
    seed = torch.Generator().manual_seed(4)
    q, k, v = (_leaf(seed, *s, device=device, dtype=torch.float32).detach()
               for s in ((1, 2, 5, 16), (1, 1, 5, 16), (1, 1, 5, 16)))
    keep = torch.tensor([[True, False, True, True, False]], device=device)
    scope = torch.tensor([[False, True, True, False, True]], device=device)
    fn = lambda q, k, v: F.masked_attention(q, k, v, key_keep=keep, query_scope=scope, backend=backend)  # noqa: E731
    _assert_compiled_equals_eager(fn, lambda: [t.clone().requires_grad_() for t in (q, k, v)], 3)


def test_modules_compile_whole():
    """nn.DAMOLoss in training mode (buffers updated in place) under torch.compile: the same loss and state."""
    from mmalign.nn import DAMOLoss

    logps = _pairs("cpu", 8)
    results = []
    for compiled in (False, True):
        m = DAMOLoss(0.1, DAMOConfig.from_preset("mdpo"), seed=3)
        run = torch.compile(m, backend=COMPILER, fullgraph=True) if compiled else m
        losses = [run(*logps).loss for _ in range(2)]
        results.append((losses, m.running_mean.clone(), m.step.clone()))
    (a, ga, sa), (b, gb, sb) = results
    torch.testing.assert_close(b, a)
    assert torch.equal(ga, gb) and sa.item() == sb.item() == 2


# ------------------------------------------------------------------------------------------------ opcheck
def _opcheck_cases():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 3, 9, generator=g)
    y = torch.randint(0, 9, (2, 3), generator=g)
    y[0, 1] = -100
    tok, lse = torch.ops.mmalign.token_logps_fwd_triton(z, y, -100)
    grad = torch.randn(2, 3, generator=g)
    pairs = [torch.randn(9, generator=g) - 20 for _ in range(4)]
    alpha_d = torch.rand(9, generator=g) + 0.5
    # beta tensor, scalar beta, alpha_d, weights, running mean, step tensor, step scalar, seed, K, gamma, rho, eps,
    # min_beta, paper, select (sampled), loss_kind, use_m, combine_sum, incr_step
    step_args = (None, 0.1, alpha_d, None, torch.tensor(0.0), torch.tensor(2), 0, 5, 7, 0.9, 0.5, 0.0, 1e-3, False,
                 2, 0, True, False, True)
    diff = [t.clone().requires_grad_() for t in pairs]
    q, k, v = torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 1, 5, 16, generator=g), \
        torch.randn(1, 1, 5, 16, generator=g)
    keep, scope = torch.tensor([[True, False, True, True, False]]), torch.tensor([[False, True, True, False, True]])
    out, att_lse = torch.ops.mmalign.masked_attention_triton(q, k, v, keep, scope, True, 0.25, 0)
    u = torch.randn(9, dtype=torch.float64, generator=g)
    cases = {
        "token_logps_fwd_triton": (z, y, -100),
        "token_logps_bwd_triton": (grad, z, y, lse, -100),
        "token_logps_bwd_triton_": (z.clone(), grad, y, lse, -100),
        "damo_step_fwd_triton": (*pairs, *step_args),
        "damo_step_bwd_triton": (u, u * 2, torch.tensor(0.5, dtype=torch.float64),
                                 torch.tensor(1.5, dtype=torch.float64), u.flip(0), True),
        "damo_step_triton": (*diff, *step_args),
        "masked_attention_triton": (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), keep, scope, True,
                                    0.25, 0),
        "masked_attention_bwd_triton": (torch.randn(out.shape, generator=g), q.detach(), k.detach(), v.detach(),
                                        out.detach(), att_lse.detach(), keep, scope, True, 0.25),
    }
    # the C++ operators (cpp backend): the same schemas but for the running mean (g read, g_out written)
    cpp = {
        "token_logps_fwd": cases["token_logps_fwd_triton"],
        "token_logps_bwd": cases["token_logps_bwd_triton"],
        "token_logps_bwd_": cases["token_logps_bwd_triton_"],
        "damo_step_fwd": (*pairs, *step_args[:5], torch.tensor(0.0), *step_args[5:], True),
        "damo_step": (*diff, *step_args[:5], torch.tensor(0.0), *step_args[5:], True),
    }
    return cases, cpp


TRITON_OPS = ["token_logps_fwd_triton", "token_logps_bwd_triton", "token_logps_bwd_triton_", "damo_step_fwd_triton",
              "damo_step_bwd_triton", "damo_step_triton", "masked_attention_triton", "masked_attention_bwd_triton"]
CPP_OPS = ["token_logps_fwd", "token_logps_bwd", "token_logps_bwd_", "damo_step_fwd", "damo_step"]


@pytest.mark.parametrize("name", TRITON_OPS + CPP_OPS)
def test_opcheck(name):
    if name in CPP_OPS and not _ext.load()[0]:
        pytest.skip(_ext.load()[1])
    if name in TRITON_OPS and _dispatch.not_supported_reasons("token_logps", "triton", "cpu", torch.float32):
        pytest.skip("Triton cannot run on CPU tensors here: " + "; ".join(
            _dispatch.not_supported_reasons("token_logps", "triton", "cpu", torch.float32)))
    cases, cpp = _opcheck_cases()
    torch.library.opcheck(getattr(torch.ops.mmalign, name).default, {**cases, **cpp}[name])


def test_every_operator_is_checked():
    """A new operator in the mmalign namespace gets an opcheck case, or this fails."""
    loaded = _ext.load()[0]
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mmalign::")}
    assert registered == set(TRITON_OPS) | (set(CPP_OPS) if loaded else set())
