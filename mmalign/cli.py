"""The ``mmalign`` command (also ``python -m mmalign``)."""
from __future__ import annotations

import argparse
import json
import sys


def _env(args) -> int:
    from ._env import collect, format_report

    info = collect()
    print(json.dumps(info, indent=2, default=str) if args.json else format_report(info))
    return 0


def _demo(args) -> int:
    from . import demo

    print(demo.run(device=args.device, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmalign", description="Fused kernels for aligning multimodal LLMs (DAMO, BDHS).")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env", help="versions, devices, and which backends run each op here (and why not)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(fn=_env)
    d = sub.add_parser("demo", help="the fused ops against eager PyTorch on this machine")
    d.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
