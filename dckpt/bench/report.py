"""Turn a run's raw seconds into figures, ratios, goals, a table, JSON and a chart.

Throughput is logical state (the bytes of every tensor) per second, so compressed
checkpoints are compared on what they restore, not on what they store. Every figure is
the median over the repeats, with min and max.
"""
from __future__ import annotations

import json
import re
import shutil
import statistics
from pathlib import Path

from .runner import LIMIT_WRITE

OPS = ("save", "load", "load_cold", "verify", "verify_cold")
DCKPT = "dckpt"
DCKPT_RANKS = "dckpt 2 ranks"
ZSTD1 = "dckpt zstd-1"
MANAGER = ("dckpt manager, first save", "dckpt manager, every tensor changed")
SHA256 = "sha256sum"  # a verify peer: the coreutils tool over the plain write's file
LIMITS = ("plain write", "plain read", "memcpy")
RSS_LIMIT = 300 << 20
REGIME_TITLES = {"disk": "durable: project disk, fsync", "shm": "RAM-backed: /dev/shm"}
OP_TITLES = {"save": "save", "load": "load into model (warm)", "load_cold": "load (cold cache)",
             "verify": "verify (warm)", "verify_cold": "verify (cold cache)"}


def rate(nbytes: int, seconds: list[float] | None) -> dict | None:
    """GB/s: median, min and max over repeats."""
    if not seconds:
        return None
    return {"median": nbytes / statistics.median(seconds) / 1e9,
            "min": nbytes / max(seconds) / 1e9, "max": nbytes / min(seconds) / 1e9,
            "n": len(seconds)}


def figures(result: dict) -> dict:
    """workload -> regime -> system -> {op: rate, size_bytes, peak_rss_save, errors};
    the limits appear as systems named "plain write", "plain read", "memcpy"."""
    out = {}
    for w in result["workloads"]:
        per_regime = {}
        for regime, systems in w["regimes"].items():
            rows = {}
            for name, s in systems.items():
                nbytes = w["rank_bytes"] if name.endswith("ranks") and w["rank_bytes"] else w["bytes"]
                if name == LIMIT_WRITE:
                    # One run writes, reads and sha256sums the plain file: its failure is
                    # each of the three rows' (a goal against it fails, never drops it).
                    errors = s["errors"]
                    rows["plain write"] = {"save": rate(w["bytes"], s["seconds"].get("save")),
                                           "errors": errors}
                    rows["plain read"] = {
                        "load": rate(w["bytes"], s["seconds"].get("load")),
                        "load_cold": rate(w["bytes"], s["seconds"].get("load_cold")),
                        "verify": rate(w["bytes"], s["seconds"].get("load")),
                        "verify_cold": rate(w["bytes"], s["seconds"].get("load_cold")),
                        "errors": errors}
                    if s["seconds"].get("sha256sum") or errors:
                        rows[SHA256] = {"verify": rate(w["bytes"], s["seconds"].get("sha256sum")),
                                        "errors": errors}
                    continue
                row = {op: rate(nbytes, s["seconds"].get(op)) for op in OPS}
                row["size_bytes"] = s["size_bytes"]
                rss = s["peak_rss"].get("save")
                row["peak_rss_save"] = max(rss) if rss else None
                rss = s["peak_rss"].get("load")
                row["peak_rss_load"] = max(rss) if rss else None
                row["errors"] = s["errors"]
                rows[name] = row
            rows["memcpy"] = {"save": rate(w["bytes"], w["memcpy_seconds"])}
            per_regime[regime] = rows
        out[w["name"]] = per_regime
    return out


def _median(row: dict | None, op: str) -> float | None:
    r = (row or {}).get(op)
    return r["median"] if r else None


def _failure(name: str, row: dict | None) -> str | None:
    """Why a system's figures cannot count: any failed or inexact run voids all of them."""
    errors = (row or {}).get("errors")
    return f"{name} failed: {errors[0]}" if errors else None


def _peers(rows: dict, name: str) -> list[str]:
    """Whom `name` is compared with: single-process peers, or DCP 2 ranks for dckpt's
    (sha256sum checks files, it saves and loads nothing: a peer of verify only)."""
    if name == DCKPT_RANKS:
        return [n for n in rows if n == "DCP 2 ranks"]
    return [n for n in rows if not n.startswith("dckpt") and not n.endswith("ranks")
            and n not in LIMITS and n != SHA256]


def _verify_peers(rows: dict) -> list[tuple[str, str, str]]:
    """(label, row, op) of every integrity check a user could run instead of dckpt verify:
    a peer's own check (torch.save's zip CRCs), sha256sum of the files, and reading the
    checkpoint with each peer's own loader (it fails on a file it cannot parse)."""
    out = []
    for n in _peers(rows, DCKPT) + ([SHA256] if SHA256 in rows else []):
        row = rows.get(n)
        if _failure(n, row):
            # Any failed run voids all of a peer's figures: one failed case, so that the
            # goal is not met over the peers that are left.
            out.append((n, n, "verify") if n == SHA256 else (f"{n} (its loader)", n, "load"))
            continue
        if _median(row, "verify"):
            out.append((n, n, "verify"))
        if n != SHA256 and _median(row, "load"):
            out.append((f"{n} (its loader)", n, "load"))
    return out


# A case: (where, value, threshold, why it failed or None). Value >= threshold is wanted
# (> for goals that say "faster"); a failed case is never met and never dropped.
Case = tuple[str, "float | None", float, "str | None"]


def goals(result: dict) -> list[dict]:
    """The goals of issue 8 / issue 3, each with met / not met and the figures behind it."""
    figs = figures(result)
    out = []

    def check(goal: str, cases: list[Case], strict: bool = False) -> None:
        failed = [c for c in cases if c[3]]
        known = [c for c in cases if not c[3] and c[1] is not None]
        if not known and not failed:
            out.append({"goal": goal, "met": None, "detail": "not measured in this run"})
            return
        below = [c for c in known if (c[1] <= c[2] if strict else c[1] < c[2])]
        parts = []
        if known:
            worst = min(known, key=lambda c: c[1] / c[2])
            parts.append(f"worst {_figure(worst[1], worst[2])} ({worst[0]})")
        if failed:
            parts.append(f"{len(failed)} of {len(cases)} cases failed ({failed[0][0]}: "
                         f"{failed[0][3]})")
        if below:
            parts.append(f"{len(below)} of {len(cases)} cases below")
        if not failed and not below:
            parts.append(f"all {len(cases)} cases")
        out.append({"goal": goal, "met": not failed and not below, "detail": "; ".join(parts)})

    for regime in _regimes(figs):
        title = REGIME_TITLES.get(regime, regime)
        for op in ("save", "load", "load_cold", "verify"):
            cases = []
            for wname, per in figs.items():
                rows = per.get(regime, {})
                for name in (DCKPT, DCKPT_RANKS):
                    if name not in rows:
                        continue
                    mine = _median(rows[name], op)
                    peers = ([(p, p, op) for p in _peers(rows, name)] if op != "verify"
                             or name != DCKPT else _verify_peers(rows))
                    for label, peer, their_op in peers:
                        why = _failure(name, rows[name]) or _failure(peer, rows[peer])
                        theirs = _median(rows[peer], their_op)
                        if why:
                            cases.append((f"{wname} vs {label}", None, 1.0, why))
                        elif mine is not None and theirs:
                            cases.append((f"{wname} vs {label}", mine / theirs, 1.0, None))
            if cases:
                check(f"{title}: dckpt {OP_TITLES[op]} faster than every peer (ratio > 1)",
                      cases, strict=True)
        for manager in MANAGER:  # what users call: CheckpointManager.save
            cases = []
            for wname, per in figs.items():
                rows = per.get(regime, {})
                if manager not in rows:
                    continue
                mine = _median(rows[manager], "save")
                for peer in _peers(rows, DCKPT):
                    why = _failure(manager, rows[manager]) or _failure(peer, rows[peer])
                    theirs = _median(rows[peer], "save")
                    if why:
                        cases.append((f"{wname} vs {peer}", None, 1.0, why))
                    elif mine is not None and theirs:
                        cases.append((f"{wname} vs {peer}", mine / theirs, 1.0, None))
            if cases:
                check(f"{title}: {manager} faster than every peer (ratio > 1)", cases,
                      strict=True)
        for op, limit, want in (("save", "plain write", 0.9), ("load", "plain read", 0.8),
                                ("load_cold", "plain read", 0.8),
                                ("verify", "plain read", 0.9)):
            cases = []
            for wname, per in figs.items():
                rows = per.get(regime, {})
                if DCKPT not in rows:
                    continue
                mine, lim = _median(rows[DCKPT], op), _median(rows.get(limit), op)
                why = _failure(DCKPT, rows[DCKPT]) or _failure(limit, rows.get(limit))
                if why or (mine is not None and lim):
                    cases.append((wname, None if why else mine / lim, want, why))
            if cases:
                check(f"{title}: dckpt {OP_TITLES[op]} >= {want}x {limit}", cases)
    for dtype, want in (("fp32", 0.85), ("bf16", 0.72)):
        cases = []
        for wname, per in figs.items():
            if not wname.startswith("transformer") or not wname.endswith(dtype):
                continue
            rows = next(iter(per.values()))
            why = _failure(DCKPT, rows.get(DCKPT)) or _failure(ZSTD1, rows.get(ZSTD1))
            raw, z = rows.get(DCKPT, {}).get("size_bytes"), rows.get(ZSTD1, {}).get("size_bytes")
            if why or (raw and z):  # >= 1 when z/raw <= want
                cases.append((wname, None if why else want / (z / raw), 1.0, why))
        check(f"shuffle+zstd-1 size <= {want}x raw ({dtype}; figure: {want} / ratio)", cases)
    cases = []
    for wname, per in figs.items():
        for regime, rows in per.items():
            why = _failure(DCKPT, rows.get(DCKPT))
            rss = rows.get(DCKPT, {}).get("peak_rss_save")
            if why:
                cases.append((f"{wname} {regime}", None, 1.0, why))
            elif rss is not None:
                cases.append((f"{wname} {regime}: {rss / 2**20:.0f} MB",
                              RSS_LIMIT / max(rss, 1), 1.0, None))
    check("peak extra RSS of a synchronous dckpt save < 300 MB (figure: 300 MB / peak)", cases)
    return out


def _figure(value: float, threshold: float) -> str:
    """Two decimals, or as many more as it takes not to print the threshold itself: a
    ratio of 1.004 met "> 1" and must not read as 1.00."""
    for digits in range(2, 7):
        text = f"{value:.{digits}f}"
        if value == threshold or text != f"{threshold:.{digits}f}":
            return text
    return repr(value)


def _regimes(figs: dict) -> list[str]:
    seen = []
    for per in figs.values():
        seen += [r for r in per if r not in seen]
    return seen


def _fmt_rate(r: dict | None) -> str:
    if not r:
        return "-"
    return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"


def _fmt_ratio(mine: float | None, theirs: float | None) -> str:
    if mine is None or not theirs:
        return "-"
    return f"{mine / theirs:.2f}x"


def tables(result: dict) -> str:
    """One markdown table per workload and regime: GB/s (min-max), size, peak RSS, and
    dckpt's ratio over each row (peers and limits)."""
    figs = figures(result)
    parts = []
    for wl in result["workloads"]:
        head = (f"#### {wl['name']}: {wl['bytes'] / 1e9:.3f} GB, {wl['tensors']} tensors"
                + (f" (2 ranks: {wl['rank_bytes'] / 1e9:.3f} GB)" if wl.get("rank_bytes") else ""))
        parts.append(head)
        for regime, rows in figs[wl["name"]].items():
            cold = any(r.get("load_cold") for r in rows.values())
            cols = ["save", "load"] + (["load_cold"] if cold else []) + ["verify"]
            hdr = (["system"] + [f"{OP_TITLES[c]} GB/s" for c in cols]
                   + ["size vs raw", "peak extra RSS save"]
                   + [f"dckpt x ({c})" for c in cols])
            lines = [f"\n{REGIME_TITLES.get(regime, regime)}\n",
                     "| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
            raw_size = rows.get(DCKPT, {}).get("size_bytes")
            for name, row in rows.items():
                ref = rows.get(DCKPT_RANKS if name.endswith("ranks") else DCKPT, {})
                size = row.get("size_bytes")
                rss = row.get("peak_rss_save")
                cells = [name + (" (FAILED)" if row.get("errors") else "")]
                cells += [_fmt_rate(row.get(c)) for c in cols]
                cells.append(f"{size / raw_size:.3f}" if size and raw_size else "-")
                cells.append(f"{rss / 2**20:.0f} MB" if rss is not None else "-")
                ratios = ["-" if name in (DCKPT, DCKPT_RANKS)
                          else _fmt_ratio(_median(ref, c), _median(row, c)) for c in cols]
                lines.append("| " + " | ".join(cells + ratios) + " |")
            parts.append("\n".join(lines))
        errs = [f"{regime} {name}: {e}" for regime, per in wl["regimes"].items()
                for name, s in per.items() for e in s["errors"]]
        if errs:
            parts.append("Errors: " + "; ".join(errs[:6]))
    return "\n\n".join(parts)


def headline_workload(result: dict) -> str:
    """The largest float32 transformer of the run (issue 3's >= 1 GB model + AdamW)."""
    names = [w["name"] for w in result["workloads"]]
    fp32 = [w for w in result["workloads"] if w["name"].startswith("transformer")
            and w["name"].endswith("fp32")]
    return max(fp32, key=lambda w: w["bytes"])["name"] if fp32 else names[0]


def headline(result: dict) -> str:
    """One row per regime and operation: dckpt's GB/s, then each peer's and the limit's
    GB/s with dckpt's ratio over it, on the headline workload."""
    figs = figures(result)
    name = headline_workload(result)
    per = figs[name]
    peers = [n for n in result["systems"] if not n.startswith("dckpt") and not n.endswith("ranks")]
    managers = [n for n in MANAGER if n in result["systems"]]
    if any(SHA256 in rows for rows in per.values()):
        peers.append(SHA256)
    hdr = (["regime", "operation", "dckpt GB/s"] + [f"{m} GB/s" for m in managers]
           + ["plain write / read"] + peers)
    lines = [f"{name} ({next(w for w in result['workloads'] if w['name'] == name)['tensors']} "
             "tensors): GB/s, median (min-max) for dckpt, (dckpt x that) for the others, whose "
             "spreads are in the figures below. The manager columns are CheckpointManager.save, "
             "what a training loop calls (the first save into an empty root; a save where "
             "every tensor changed since the previous checkpoint, in a run's steady state: "
             "keep_last=2, three saves before it, the files retention retired written over), "
             "and its restore. Verify "
             "peers: torch.save's zip CRC check and sha256sum of the files here; each peer's "
             "own loader (its load figure) in the goals.", "",
             "| " + " | ".join(hdr) + " |",
             "|" + "---|" * len(hdr)]
    for regime, rows in per.items():
        for op in ("save", "load", "load_cold", "verify"):
            mine = _median(rows.get(DCKPT), op)
            if mine is None:
                continue
            limit = "plain write" if op == "save" else "plain read"
            cells = [REGIME_TITLES.get(regime, regime), OP_TITLES[op],
                     _fmt_rate(rows[DCKPT].get(op))]
            for m in managers:
                cells.append(_fmt_rate((rows.get(m) or {}).get(op)))
            for n in [limit] + peers:
                theirs = _median(rows.get(n), op)
                cells.append(f"{theirs:.2f} ({mine / theirs:.2f}x)" if theirs else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals_markdown(gs: list[dict]) -> str:
    lines = ["| goal | this run | figure |", "|---|---|---|"]
    for g in gs:
        met = {True: "met", False: "**not met**", None: "not measured"}[g["met"]]
        lines.append(f"| {g['goal']} | {met} | {g['detail']} |")
    return "\n".join(lines)


def machine_markdown(result: dict) -> str:
    m = result["machine"]
    fs = "; ".join(f"{r}: {f.get('path')} on {f.get('device', '?')} ({f.get('type', '?')}"
                   + (", rotational" if f.get("rotational") else
                      ", non-rotational" if "rotational" in f else "") + ")"
                   for r, f in m["filesystems"].items())
    o = result["options"]
    return (f"{m['cores']} cores ({m['cpu']}), {m['memory_bytes'] / 2**30:.1f} GiB memory, "
            f"Linux {m['kernel']}, Python {m['python']}. Directories: {fs}. "
            f"{o['repeats']} interleaved repeats in a balanced order (dckpt/bench/order.py), "
            f"after one untimed warm-up save and load by every system; a load counts only "
            f"when bit-exact and a failed system fails every goal it is part of; cold-cache loads "
            f"{'measured (page cache dropped before each)' if o['cold'] else 'not measured'}; "
            f"load average {result['load_average_start']} at start, "
            f"{result.get('load_average_end')} at end; run took {result.get('seconds')} s "
            f"on {result['started']}"
            + (f", commit {result['commit']}." if result.get("commit") else "."))


def markdown(result: dict, chart_name: str | None = None, command: str = "",
             notes: str = "") -> str:
    gs = result.get("goals") or goals(result)
    parts = ["## Save and load", ""]
    if command:
        parts += [f"Reproduce: `{command}`", ""]
    parts += ["Machine: " + machine_markdown(result), "",
              "Throughput is GB/s of logical state (every tensor's bytes) per second, median "
              "of the repeats (min-max). `dckpt x` is dckpt's median over that row's: above 1 "
              "dckpt is faster; on the limit rows it is the fraction of the limit reached. "
              "Sizes are relative to dckpt raw; peak extra RSS is the rise of the process's "
              "resident memory during a save.", "", "### Headline", "", headline(result), "",
              "### Goals", "", goals_markdown(gs), ""]
    if chart_name:
        parts += [f"![save and load throughput]({chart_name})", ""]
    if notes:
        parts += [notes.strip(), ""]
    parts += ["### Figures", "", tables(result), ""]
    return "\n".join(parts)


def chart(result: dict, path: Path) -> None:
    """Grouped bars: a row per regime (save, warm load, verify), then sizes per codec,
    peak extra RSS of saves, and cold-cache loads."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = figures(result)
    workloads = list(figs)
    regimes = _regimes(figs)
    systems = [n for n in result["systems"]]
    colors = {n: plt.cm.tab20(i / max(len(systems) + 2, 1)) for i, n in enumerate(systems)}
    colors["plain write"] = colors["plain read"] = (0.25, 0.25, 0.25, 1.0)
    fig, axes = plt.subplots(len(regimes) + 1, 3, figsize=(19, 5.2 * (len(regimes) + 1)),
                             squeeze=False)

    def bars(ax, names: list[str], value, title: str, ylabel: str) -> None:
        width = 0.8 / max(len(names), 1)
        for i, n in enumerate(names):
            xs, hs, lo, hi = [], [], [], []
            for j, wl in enumerate(workloads):
                v = value(wl, n)
                if v is None:
                    continue
                med, vmin, vmax = v
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                hs.append(med)
                lo.append(med - vmin)
                hi.append(vmax - med)
            if xs:
                ax.bar(xs, hs, width, yerr=[lo, hi], capsize=1.5, label=n, color=colors.get(n),
                       hatch="//" if n.startswith("plain") else None, edgecolor="white",
                       linewidth=0.3)
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels(workloads, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)

    def rate_of(regime: str, op: str):
        def value(wl, n):
            r = figs[wl].get(regime, {}).get(n, {}).get(op)
            return (r["median"], r["min"], r["max"]) if r else None
        return value

    for row, regime in enumerate(regimes):
        for col, (op, limit) in enumerate((("save", "plain write"), ("load", "plain read"),
                                           ("verify", "plain read"))):
            names = [n for n in systems if any(figs[w].get(regime, {}).get(n, {}).get(op)
                                               for w in workloads)] + [limit]
            bars(axes[row][col], names, rate_of(regime, op),
                 f"{REGIME_TITLES.get(regime, regime)}: {OP_TITLES[op]}", "GB/s")
        axes[row][0].legend(fontsize=7, ncol=2)

    base = axes[-1]
    first = regimes[0]

    def size_of(wl, n):
        rows = figs[wl][first]
        raw, s = rows.get(DCKPT, {}).get("size_bytes"), rows.get(n, {}).get("size_bytes")
        return (s / raw,) * 3 if raw and s else None
    codecs = [n for n in systems if n.startswith("dckpt") and not n.endswith("ranks")]
    bars(base[0], codecs, size_of, "size on disk per codec (relative to raw)", "size / raw")
    base[0].legend(fontsize=7)

    def rss_of(wl, n):
        vals = [figs[wl][r].get(n, {}).get("peak_rss_save") for r in regimes]
        vals = [v for v in vals if v is not None]
        return (max(vals) / 2**20,) * 3 if vals else None
    single = [n for n in systems if not n.endswith("ranks")]
    bars(base[1], single, rss_of, "peak extra RSS of a save (max over regimes)", "MB")
    base[1].axhline(RSS_LIMIT / 2**20, color="red", linestyle="--", linewidth=0.8)
    if "disk" in regimes and any(figs[w]["disk"].get(DCKPT, {}).get("load_cold")
                                 for w in workloads):
        names = [n for n in systems if any(figs[w]["disk"].get(n, {}).get("load_cold")
                                           for w in workloads)] + ["plain read"]
        bars(base[2], names, rate_of("disk", "load_cold"),
             f"{REGIME_TITLES['disk']}: load (cold cache)", "GB/s")
    else:
        base[2].set_axis_off()
    fig.suptitle(f"dckpt vs peers, {result['machine']['cores']} cores, "
                 f"{result['started']}", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_outputs(result: dict, out_dir: Path, command: str = "") -> dict[str, Path]:
    """results.json, chart.png and report.md in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result["figures"] = figures(result)
    result["goals"] = goals(result)
    paths = {"json": out_dir / "results.json", "chart": out_dir / "chart.png",
             "markdown": out_dir / "report.md"}
    paths["json"].write_text(json.dumps(result, indent=1))
    chart(result, paths["chart"])
    paths["markdown"].write_text(markdown(result, paths["chart"].name, command))
    return paths


def update_docs(doc: Path, result: dict, chart_png: Path, command: str,
                notes: str = "") -> None:
    """Replace (or append) the '## Save and load' section of doc, chart beside it."""
    doc = Path(doc)
    chart_name = "bench_save_load.png"
    shutil.copyfile(chart_png, doc.parent / chart_name)
    section = markdown(result, chart_name, command, notes).rstrip() + "\n"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\n"
    pattern = re.compile(r"^## Save and load\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    doc.write_text(text)


__all__ = ["figures", "goals", "tables", "markdown", "chart", "write_outputs", "update_docs"]
