"""Checkpoint metadata at scale: run the simulation (dckpt.bench.scale) over 8..16,384 ranks
x 200..2,000 tensors per rank, the real gloo runs at 2, 4 and 8 processes beside the
simulation of the same jobs, and draw the chart of docs/SCALE.md.

    python benchmarks/sim_scale.py run  [--out benchmarks/results/scale.json] [--quick]
    python benchmarks/sim_scale.py plot [--json benchmarks/results/scale.json] [--png docs/scale.png]
    python benchmarks/sim_scale.py table [--json ...]      the tables of docs/SCALE.md

Times are CPU seconds of this process (time.process_time): the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "scale.json"
DEFAULT_PNG = ROOT / "docs" / "scale.png"
REAL_WORLDS = (2, 4, 8)
REAL_TENSORS = 200


def run(out: Path, quick: bool) -> None:
    from dckpt.bench import scale
    grid = [(8, 200), (64, 1000), (512, 1000)] if quick else scale.GRID
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    rows = scale.run(grid, log)
    # The first save's assign: measured where it fits, extrapolated per offer beyond.
    measured = [r for r in rows if "assign_cpu_s" in r["plan_first_full"]]
    per_offer = max(r["plan_first_full"]["assign_cpu_s"] / r["plan_first_full"]["offers"]
                    for r in measured if r["plan_first_full"]["offers"] >= 10_000)
    for r in rows:
        if "assign_cpu_s" not in r["plan_first_full"]:
            r["plan_first_full"]["assign_cpu_s_estimated"] = \
                per_offer * r["plan_first_full"]["offers"]
    real = []
    with tempfile.TemporaryDirectory() as d:
        for w in REAL_WORLDS:
            log(f"real run: {w} gloo processes x {REAL_TENSORS} tensors")
            ranks = scale.real_run(w, REAL_TENSORS)
            sim = scale.simulate(scale.Job(w, REAL_TENSORS), Path(d))
            real.append({"world": w, "tensors": REAL_TENSORS, "ranks": ranks, "sim": sim})
    doc = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()}, {platform.python_version()}, shared 2-core "
                      "machine (CPU time, not wall time)",
           "grid": rows, "real": real}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    log(f"wrote {out}")


def plot(src: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    doc = json.loads(src.read_text())
    rows = doc["grid"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for t, style in ((200, ":"), (1000, "-"), (2000, "--")):
        rs = sorted((r for r in rows if r["tensors"] == t), key=lambda r: r["world"])
        if not rs:
            continue
        w = [r["world"] for r in rs]
        a.plot(w, [r["restore"]["bytes"] / 1e6 for r in rs], "o" + style, color="C0",
               label=f"split: index + own record, {t} tensors/rank")
        a.plot(w, [r["single_manifest_bytes"] / 1e6 for r in rs], "s" + style, color="C3",
               label=f"single manifest (v1-2), {t} tensors/rank")
        b.plot(w, [r["restore"]["cpu_s"] * 1e3 for r in rs], "o" + style, color="C0",
               label=f"restore lookup, {t}/rank")
        b.plot(w, [r["commit"]["cpu_s"] * 1e3 for r in rs], "^" + style, color="C2",
               label=f"rank 0 commit, {t}/rank")
    a.axhline(1.0, color="grey", lw=0.8)
    a.text(9, 1.15, "goal: 1 MB", color="grey", fontsize=8)
    b.axhline(50, color="grey", lw=0.8)
    b.text(9, 57, "goal: 50 ms restore", color="grey", fontsize=8)
    b.axhline(5000, color="grey", lw=0.8)
    b.text(9, 5700, "goal: 5 s commit", color="grey", fontsize=8)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks")
        ax.grid(True, which="both", alpha=0.2)
    a.set_ylabel("metadata a rank reads to restore (MB)")
    b.set_ylabel("CPU ms (one core)")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.suptitle("dckpt checkpoint metadata per rank, simulated with the real code "
                 f"({doc['when']})", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}", file=sys.stderr)


def table(src: Path) -> None:
    doc = json.loads(src.read_text())
    print("| ranks | tensors/rank | restore: bytes read | restore CPU | record file | index |"
          " rank 0 commit CPU | repeated save: sent / received per rank | first save: "
          "sent / received per rank, plan CPU | first save, every offer: received, assign CPU "
          "| single manifest |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in doc["grid"]:
        pf, full = r["plan_first"], r["plan_first_full"]
        assign = (f"{full['assign_cpu_s']:.2f} s" if "assign_cpu_s" in full
                  else f"~{full['assign_cpu_s_estimated']:.0f} s (est.)")
        single = _size(r["single_manifest_bytes"]) + (" (est.)" if r["single_estimated"] else "")
        print(f"| {r['world']:,} | {r['tensors']:,} | {_size(r['restore']['bytes'])} | "
              f"{r['restore']['cpu_s'] * 1e3:.1f} ms | {_size(r['record_bytes'])} | "
              f"{_size(r['commit']['index_bytes'])} | {r['commit']['cpu_s'] * 1e3:.0f} ms | "
              f"{_size(r['save_repeat']['sent'])} / {_size(r['save_repeat']['received'])} | "
              f"{_size(pf['sent'])} / {_size(pf['received'])}, {pf['cpu_s'] * 1e3:.0f} ms | "
              f"{_size(full['received'])}, {assign} | {single} |")
    print()
    print("| ranks | figure | real gloo run (rank min..max) | simulation |")
    print("|---:|---|---:|---:|")
    for x in doc["real"]:
        ranks, sim = x["ranks"], x["sim"]
        mid = x["world"] // 2

        def span(vals, fmt):
            return f"{fmt(min(vals))} .. {fmt(max(vals))}"
        rows = [
            ("record file bytes", span([k["saves"][1]["record_bytes"] for k in ranks], _size),
             _size(sim["record_bytes"])),
            ("metadata read to restore", span([k["restore"]["bytes"] for k in ranks], _size),
             _size(sim["restore"]["bytes"])),
            ("record files read to restore", span([k["restore"]["records_read"] for k in ranks], str),
             str(sim["restore"]["records_read"])),
            ("repeated save, sent", span([k["saves"][1]["sent"] for k in ranks], _size),
             _size(sim["save_repeat"]["sent"]) + f" (rank {mid})"),
            ("repeated save, received (ranks > 0)",
             span([k["saves"][1]["received"] for k in ranks[1:]], _size),
             _size(sim["save_repeat"]["received"])),
            ("first save, received (ranks > 0)",
             span([k["saves"][0]["received"] for k in ranks[1:]], _size),
             _size(sim["plan_first"]["received"] + sim["world"] * 0)),
            ("plan reused on the second save", str(all(k["saves"][1]["reused"] for k in ranks)),
             "-"),
            ("restore metadata CPU (read_manifest)",
             span([k["restore"]["metadata_cpu_s"] * 1e3 for k in ranks], lambda v: f"{v:.1f} ms"),
             f"{sim['restore']['cpu_s'] * 1e3:.1f} ms (with lookups)"),
            ("restored bitwise", str(all(k["restore"]["bitwise"] for k in ranks)), "-"),
        ]
        for name, real, s in rows:
            print(f"| {x['world']} | {name} | {real} | {s} |")


def _size(n: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{int(n)} B"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["run", "plot", "table"])
    p.add_argument("--out", "--json", dest="json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--png", type=Path, default=DEFAULT_PNG)
    p.add_argument("--quick", action="store_true", help="a few grid points (a smoke run)")
    a = p.parse_args()
    if a.what == "run":
        run(a.json, a.quick)
    elif a.what == "plot":
        plot(a.json, a.png)
    else:
        table(a.json)


if __name__ == "__main__":
    main()
