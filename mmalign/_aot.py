"""Compile every Triton kernel of the package for NVIDIA GPUs on a machine without one (a check).

Each launcher runs on CPU tensors while Triton's driver is replaced by a compile-only stub and every
launch is turned into a warm-up: ``triton.compile`` builds the TTIR, PTX and cubin (Triton's own
ptxas) for each target, for the constexpr combinations and dtypes below, and nothing runs. A kernel
that the interpreter accepts but the GPU compiler rejects (a type the backend lacks, a shape rule) fails
here. Run ``python -m mmalign._aot [80,90] [--quick]`` with TRITON_INTERPRET unset; exit status 1 on a
failure. The full set takes about 4 minutes per arch on 2 CPU cores (triton 3.8), --quick about one."""
from __future__ import annotations

import contextlib
import sys
import time
import traceback

import torch

DEFAULT_ARCHS = (80, 90)


class _CompileOnlyDriver:
    """What JITFunction.run asks of the active driver, for one compute capability, no device."""

    def __init__(self, cc: int):
        from triton.backends.compiler import GPUTarget

        self.cc, self.target = cc, GPUTarget("cuda", cc, 32)

    def get_current_device(self):
        return self.cc  # one kernel cache per target

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(cc: int):
    """Within: Triton launches compile for sm_<cc> and return without running."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    run = JITFunction.run
    previous = driver._active if hasattr(driver, "_active") else driver.active  # triton < 3.3: .active

    def warm(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    driver.set_active(_CompileOnlyDriver(cc))
    JITFunction.run = warm
    try:
        yield
    finally:
        JITFunction.run = run
        driver.set_active(previous)  # None: the default driver again, created lazily when asked for


def _damo_cases(quick: bool):
    from .ops import damo_step_triton as dt
    from .ops.damo_step import DAMOConfig, kernel_args

    configs = [DAMOConfig(), DAMOConfig(selection="topk"), DAMOConfig(variant="paper"),
               DAMOConfig.from_preset("dpo", variant="paper", loss_type="ipo"), DAMOConfig(filter="bottom"),
               DAMOConfig(filter="top", loss_type="hinge", combine="sum")]
    for dtype in (torch.float32,) if quick else (torch.float32, torch.float64, torch.bfloat16):
        for cfg in configs:
            for n in (16, dt.MAX_FUSED_N + 1) if quick else (16, 4096, dt.MAX_FUSED_N + 1):  # last: multi-program
                lp = [torch.randn(n).to(dtype) for _ in range(4)]
                g, step = torch.zeros(()), torch.zeros((), dtype=torch.int64)
                beta = torch.full((n,), 0.1, dtype=dtype) if cfg.variant == "paper" else None
                args = (*lp, beta, 0.1, torch.rand(n).to(dtype), torch.rand(n).to(dtype), g, step, 0, 0,
                        *kernel_args(cfg, n), True)
                yield f"damo_step fwd {dtype} n={n} {cfg.variant}/{cfg.select_code()}/{cfg.loss_type}", \
                    lambda args=args: dt.damo_step_fwd_triton(*args)
    for acc in (torch.float32,) if quick else (torch.float32, torch.float64):
        for gl, gls in ((True, False), (False, True), (True, True)):
            t, one = torch.randn(64, dtype=acc), torch.ones((), dtype=acc)
            yield f"damo_step bwd {acc} loss={gl} losses={gls}", \
                lambda t=t, one=one, gl=gl, gls=gls: dt.damo_step_bwd_triton(
                    t, t, one, one if gl else None, t.expand(64) if gls else None, True)


def _logps_cases(quick: bool):
    from .ops import sequence_logps as sl

    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for V in (1000, 32000):
            z = torch.randn(2, 3, V).to(dtype)
            y = torch.randint(0, V, (2, 3))
            yield f"token_logps fwd {dtype} V={V}", lambda z=z, y=y: sl._triton_fwd(z, y, -100)
            lse = torch.zeros(2, 3, dtype=sl.acc_dtype(dtype))
            yield f"token_logps bwd {dtype} V={V}", lambda z=z, y=y, lse=lse: sl._triton_bwd_into(
                torch.empty_like(z), torch.ones_like(lse), z, y, lse, -100)


def _attention_cases(quick: bool):
    from .attention.masked import _backward, masked_attention_triton

    for dtype in (torch.bfloat16, torch.float32) if quick else (torch.bfloat16, torch.float16, torch.float32):
        for D in (64, 80) if quick else (64, 80, 128, 256):
            for tq, tk, splits in ((128, 128, None), (1, 2048, 4)):
                q, k, v = torch.randn(1, 4, tq, D).to(dtype), torch.randn(1, 2, tk, D).to(dtype), \
                    torch.randn(1, 2, tk, D).to(dtype)
                keep, scope = torch.rand(1, tk) > 0.5, torch.rand(1, tq) > 0.5
                variants = (dict(), dict(key_keep=keep), dict(key_keep=keep, query_scope=scope))
                for kw in variants[::2] if quick else variants:
                    yield (f"masked_attention {dtype} D={D} Tq={tq} splits={splits} {sorted(kw)}",
                           lambda q=q, k=k, v=v, kw=kw, s=splits: masked_attention_triton(q, k, v, num_splits=s, **kw))
                    if splits is None:
                        lse = torch.zeros(1, 4, tq)
                        yield (f"masked_attention bwd {dtype} D={D} Tq={tq} {sorted(kw)}",
                               lambda q=q, k=k, v=v, kw=kw, lse=lse: _backward(
                                   q, q, k, v, q, lse, kw.get("key_keep"), kw.get("query_scope"), True, 0.125))


CASES = {"damo_step": _damo_cases, "sequence_logps": _logps_cases, "masked_attention": _attention_cases}


def check(archs=DEFAULT_ARCHS, ops=tuple(CASES), quick: bool = False, log=print) -> list[tuple[str, int, str]]:
    """Compile every case for every arch (``quick``: a subset that still covers every kernel and branch
    kind, about a minute per arch on 2 cores); returns the failures as (case, cc, error)."""
    from ._triton import interpreting

    if interpreting():
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels are interpreted, there is nothing to compile")
    failures = []
    for cc in archs:
        for op in ops:
            t0, n = time.time(), 0
            for name, launch in CASES[op](quick):
                with compile_only(cc):
                    try:
                        launch()
                        n += 1
                    except Exception as e:  # noqa: BLE001 (reported, then the next case)
                        failures.append((name, cc, f"{type(e).__name__}: {e}"))
                        log(f"FAIL sm_{cc} {name}\n{traceback.format_exc(limit=3)}")
            log(f"sm_{cc} {op}: {n} cases compiled in {time.time() - t0:.1f} s")
    return failures


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in argv
    argv = [a for a in argv if a != "--quick"]
    archs = tuple(int(a) for a in argv[0].split(",")) if argv else DEFAULT_ARCHS
    failures = check(archs, quick=quick)
    print(f"{len(failures)} failures" if failures else "every Triton kernel compiles for " +
          ", ".join(f"sm_{a}" for a in archs))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
