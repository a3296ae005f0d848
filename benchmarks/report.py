"""Turn pytest-benchmark JSON files into a Markdown report (and PNG plots when matplotlib exists).

    python benchmarks/report.py RESULT.json [MORE.json ...] --out DIR

For every group (op, mode, shape): each provider's median time, speedup over eager, peak memory above
the inputs and its ratio to eager, and the effective bandwidth (bytes_moved_min / time) as a share of the
`copy` case of the same run when there is one. The header names device, versions, date and commit."""
from __future__ import annotations

import argparse
import json
import pathlib
from collections import defaultdict


def _load(paths):
    benches, machine, commit, when = [], {}, {}, ""
    for p in paths:
        data = json.loads(pathlib.Path(p).read_text())
        benches += data["benchmarks"]
        machine, commit, when = data.get("machine_info", {}), data.get("commit_info", {}), data.get("datetime", "")
    return benches, machine, commit, when


def _shape_key(b):
    return b["extra_info"].get("op"), b["extra_info"].get("shape"), b["extra_info"].get("dtype")


def _fmt_bytes(n):
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def build(paths, commit_id: str | None = None) -> tuple[str, dict]:
    benches, machine, commit, when = _load(paths)
    if commit_id:
        commit = {"id": commit_id, "dirty": commit.get("dirty", "?")}
    groups: dict[str, list] = defaultdict(list)
    for b in benches:
        groups[b["group"]].append(b)
    first = benches[0]["extra_info"] if benches else {}
    lines = ["# mmalign benchmark report", "",
             f"- device: {first.get('device', '?')}",
             f"- date: {when}",
             f"- commit: {commit.get('id', '?')} (dirty: {commit.get('dirty', '?')})",
             f"- python {machine.get('python_version', '?')}, cpu {machine.get('cpu', {}).get('brand_raw', '?')}",
             f"- versions: {first.get('versions', '?')}",
             "- time: median of pedantic rounds, synchronized inside the timed function; memory: peak "
             "allocated above the inputs during one call (CUDA caching-allocator peak, CPU profiler events)",
             ""]
    ratios = {}
    copy_bandwidth = {_shape_key(b): b["extra_info"]["bytes_moved_min"] / b["stats"]["median"]
                      for b in benches if b["extra_info"].get("provider") == "copy"}
    for name in sorted(groups):
        rows = groups[name]
        by = {r["extra_info"]["provider"]: r for r in rows}
        eager = by.get("eager")
        copy_bw = copy_bandwidth.get(_shape_key(rows[0]))
        # the baseline: eager PyTorch; the released DAMO code's style; SDPA with a boolean mask; generate() per sentence
        eager = eager or by.get("released-style") or by.get("sdpa-mask") or by.get("per-sentence") or by.get("trl")
        base = eager["extra_info"]["provider"] if eager else "eager"
        ref = by.get("reference") if base != "reference" else None  # the eager transcription of docs/math.md
        whole = any("held_bytes" in r["extra_info"] for r in rows)  # inputs' own memory counted (trainers)
        mem_col = "peak mem, inputs included" if whole else "peak mem above inputs"
        lines += [f"## {name}", "", f"| provider | median | speedup vs {base} |"
                  + (" speedup vs reference |" if ref else "")
                  + f" {mem_col} | mem vs {base} | GB/s | % of copy bandwidth | CUDA launches | host syncs |",
                  "|---|---:|---:|" + ("---:|" if ref else "") + "---:|---:|---:|---:|---:|---:|"]
        for prov, r in sorted(by.items(), key=lambda kv: kv[1]["stats"]["median"]):
            med = r["stats"]["median"]
            ei = r["extra_info"]
            sp = eager["stats"]["median"] / med if eager else float("nan")
            mem = ei.get("peak_mem_bytes", 0)
            memr = mem / eager["extra_info"]["peak_mem_bytes"] if eager and eager["extra_info"].get("peak_mem_bytes") else float("nan")
            bw = ei.get("bytes_moved_min", 0) / med
            pct = f"{100 * bw / copy_bw:.0f}%" if copy_bw and prov != "copy" else ""
            launches, syncs = ei.get("cuda_launches"), ei.get("host_syncs")
            vs_ref = f" {ref['stats']['median'] / med:.2f}x |" if ref else ""
            lines.append(f"| {prov} | {med * 1e3:,.3f} ms | {sp:.2f}x |{vs_ref} {_fmt_bytes(mem)} | {memr:.3f} | "
                         f"{bw / 1e9:,.0f} | {pct} | {'' if launches is None else launches} | "
                         f"{'' if syncs is None else syncs} |")
            ratios[(name, prov)] = (sp, memr)
        lines.append("")
    return "\n".join(lines), ratios


def caption(paths, commit_id: str | None = None) -> str:
    """device, versions, date and commit in one line (for figures)."""
    benches, machine, commit, when = _load(paths)
    first = benches[0]["extra_info"] if benches else {}
    return (f"{first.get('device', '?')} | {first.get('versions', '?')} | {when[:19]} | "
            f"commit {commit_id or commit.get('id', '?')[:12]}")


def plot(paths, out: pathlib.Path, caption_text: str = "") -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    benches = _load(paths)[0]
    groups: dict[str, list] = defaultdict(list)
    for b in benches:
        groups[b["group"]].append(b)
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.5 * len(groups) + 3))
    names = sorted(groups)
    provs = sorted({b["extra_info"]["provider"] for b in benches})
    for ax, key, label in ((axes[0], "time", "median time (ms, log)"), (axes[1], "mem", "peak memory above inputs (MiB, log)")):
        for i, prov in enumerate(provs):
            ys, xs = [], []
            for j, n in enumerate(names):
                r = next((b for b in groups[n] if b["extra_info"]["provider"] == prov), None)
                if r is None:
                    continue
                v = r["stats"]["median"] * 1e3 if key == "time" else max(r["extra_info"]["peak_mem_bytes"], 1) / 2**20
                xs.append(v)
                ys.append(j + (i - len(provs) / 2) * 0.8 / len(provs))
            ax.barh(ys, xs, height=0.8 / len(provs), label=prov)
        ax.set_xscale("log")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names if ax is axes[0] else [""] * len(names), fontsize=7)
        ax.set_xlabel(label)
    axes[1].legend(fontsize=7)
    if caption_text:
        fig.suptitle(caption_text, fontsize=8)
    fig.tight_layout()
    path = out / "bench.png"
    fig.savefig(path, dpi=110)
    files.append(str(path))
    return files


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None, help="commit id to print (when the run had no git)")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text, _ = build(args.json, args.commit)
    (out / "report.md").write_text(text)
    plot(args.json, out, caption(args.json, args.commit))
    print(text)


if __name__ == "__main__":
    main()
