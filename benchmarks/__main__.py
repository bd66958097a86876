"""Run psrv's benchmarks and write RESULTS.md and results.json (and PNG plots when matplotlib is installed).

    python -m benchmarks                 # everything, full size (several minutes)
    python -m benchmarks --quick         # everything, small (about a minute or two)
    python -m benchmarks --only pushpull,memory --out /tmp/bench

Every figure is measured in this run: psrv and its baseline side by side, medians over repeats.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time
import traceback

from .common import CpuMeter, log, machine

BENCHMARKS = ["pushpull", "training", "scaling", "defaultjob", "serverload", "overhead", "stragglers", "memory", "peers", "seed",
              "accuracy", "csvread", "keyserver", "sparse", "shards"]
HERE = os.path.dirname(os.path.abspath(__file__))
RATIO_KEYS = ["pushpull_small_vs_raw_zmq", "pull_large_shm_vs_memcpy", "pull_large_zmq_vs_raw_zmq",
              "bsp2_vs_single_process", "pss_vs_dataset_bytes", "pss_vs_dataset_bytes_worker_copy",
              "samples_per_s_vs_torch_ddp"]


def _table(columns: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _plots(result: dict, out: str) -> list[tuple[str, str]]:
    """PNG plots of a result: its "plot" (written as NAME.png) and each of its "plots" (each names its "file" and
    may give a "title", a matplotlib format per series in "styles", and "xticks": true to mark each x; a None in a
    series is a gap). Returns
    (file, title) of those written; none without matplotlib."""
    specs = [({**result["plot"], "file": f"{result['name']}.png"})] if result.get("plot") else []
    specs += result.get("plots", [])
    if not specs:
        return []
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for spec in specs:
        fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
        for label, ys in spec["series"].items():
            ys = [float("nan") if v is None else v for v in ys]
            ax.plot(spec["x"], ys, spec.get("styles", {}).get(label, "o-"), label=label)
        if spec.get("log"):
            ax.set_xscale("log")
            ax.set_yscale("log")
        elif spec.get("xticks"):
            ax.set_xticks(spec["x"])
        ax.set_xlabel(spec["xlabel"])
        ax.set_ylabel(spec["ylabel"])
        ax.grid(True, alpha=0.3)
        ax.legend()
        title = spec.get("title", result["title"])
        ax.set_title(title)
        fig.savefig(os.path.join(out, spec["file"]), dpi=100)
        plt.close(fig)
        written.append((spec["file"], title))
    return written


def write(results: list[dict], out: str, quick: bool, argv: list[str]) -> None:
    """results.json and RESULTS.md. With --only, the other benchmarks' sections of an earlier results.json in the
    same folder are kept, each with the command and date that produced it."""
    info = machine()
    stamp = {"command": " ".join(["python -m benchmarks", *argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    for r in results:
        r.update(stamp)
    old_path = os.path.join(out, "results.json")
    if os.path.exists(old_path) and "--only" in " ".join(argv):
        with open(old_path) as fh:
            old = json.load(fh)
        kept = [{"command": old["command"], "date": old["date"], **r} for r in old["benchmarks"]
                if r["name"] not in {x["name"] for x in results}]
        order = {name: i for i, name in enumerate(BENCHMARKS)}
        results = sorted(kept + results, key=lambda r: order.get(r["name"], 99))
    ratios = {k: None for k in RATIO_KEYS}
    for r in results:
        ratios.update(r.get("ratios", {}))
    doc = {"command": stamp["command"], "quick": quick, "date": stamp["date"], "machine": info, "ratios": ratios,
           "benchmarks": results}
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(doc, fh, indent=1, default=str)
        fh.write("\n")
    runs = sorted({(r["command"], r["date"]) for r in results}, key=lambda x: x[1])
    made_by = "; ".join(f"`{c}` on {d}" for c, d in runs)
    md = ["# psrv benchmark results", "",
          f"Written by {made_by}; every figure below comes from "
          f"{'that run' if len(runs) == 1 else 'the run named in its section'}. "
          f"Machine: {info['cores']} usable cores ({info['cpu']}), Python {info['python']}, numpy {info['numpy']}, "
          f"pyzmq {info['pyzmq']} (libzmq {info['libzmq']}), msgpack {info['msgpack']}. "
          "Times are medians over repeats; these machines are shared and noisy, so expect ±10-20 % between runs.",
          "", "## Targets", ""]
    rows = []
    for r in results:
        for t in r.get("targets", []):
            val = ratios.get(t["key"])
            verdict = "n/a" if val is None else ("met" if t["met"] else "**missed**")
            rows.append([t["what"], t["target"], "-" if val is None else f"{val:.3g}", verdict])
    md += [_table(["what", "target", "measured", "verdict"], rows), ""]
    for r in results:
        md += [f"## {r['title']}", "", r["method"].strip(), ""]
        if len(runs) > 1:
            md += [f"Measured by `{r['command']}` on {r['date']}.", ""]
        if r.get("error"):
            md += [f"This benchmark failed: `{r['error']}`", ""]
            continue
        if r.get("rows"):
            md += [_table(r["columns"], r["rows"]), ""]
        for note in r.get("notes", []):
            md += [note, ""]
        cpu = r.get("cpu_during")
        if cpu and cpu.get("others_s") is not None:
            md += [f"While this benchmark ran ({cpu['wall_s']:.0f} s), other processes took {cpu['others_s']:.0f} "
                   f"CPU-seconds on the {info['cores']} usable cores ({100 * cpu['others_frac']:.0f} % of their "
                   f"time; /proc/stat's busy time on those cores minus our own processes').", ""]
        for file, title in _plots(r, out):
            md += [f"![{title}]({file})", ""]
    with open(os.path.join(out, "RESULTS.md"), "w") as fh:
        fh.write("\n".join(md))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (about a minute or two)")
    p.add_argument("--out", default=HERE, help="where RESULTS.md, results.json and plots go (default benchmarks/)")
    p.add_argument("--only", help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    p.add_argument("--budget-s", type=float, help="seconds a benchmark that sizes itself may take (scaling: its whole "
                                                  "run; default 500, --quick 100)")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else BENCHMARKS
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name in names:
        log(f"== {name}")
        t0 = time.monotonic()
        meter = CpuMeter()
        try:
            run = importlib.import_module(f"benchmarks.{name}").run
            budget = {"budget_s": args.budget_s} if args.budget_s and "budget_s" in inspect.signature(run).parameters \
                else {}
            results.append(run(quick=args.quick, **budget))
        except Exception as e:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            results.append({"name": name, "title": name, "method": "", "error": f"{type(e).__name__}: {e}"})
        results[-1]["cpu_during"] = meter.stop()
        log(f"   {name}: {time.monotonic() - t0:.1f} s")
    write(results, args.out, args.quick, argv)
    log(f"wrote {os.path.join(args.out, 'RESULTS.md')} and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
