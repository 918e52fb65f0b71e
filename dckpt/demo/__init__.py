"""`dckpt demo` (and `make demo`): the main job, on CPU, with no configuration.

1. trains a small transformer with accelerate on 2 processes (gloo), uninterrupted: the
   reference;
2. trains it again, checkpointing every K steps with dckpt, and kills it mid-run with SIGKILL;
3. verifies the newest committed checkpoint by checksum;
4. resumes it on 2 processes, and the same checkpoint on 1 process (resharded);
5. prints the per-step losses of the reference next to the resumed runs, says whether they are
   identical bit for bit, and plots them to a PNG;
6. times save_state/load_state of the same state: accelerate's own against dckpt's.

The training itself is dckpt/demo/train.py, started with torch.distributed.run.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..format.layout import is_staging


def add_arguments(parser) -> None:
    parser.add_argument("--dir", default=None, help="work directory (default: a new temp dir)")
    parser.add_argument("--steps", type=int, help="training steps (default 60; 16 when CI is set)")
    parser.add_argument("--every", type=int,
                        help="checkpoint every K steps (default 10; 4 with CI)")
    parser.add_argument("--kill-at", type=int, help="step at which the run is killed")
    parser.add_argument("--readme", metavar="PATH",
                        help="write this run's output into PATH's demo section (README.md)")


def run(args) -> int:
    if not args.readme:
        return _run(args)
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    load_before = os.getloadavg()
    try:
        code = _run(args)
    finally:
        sys.stdout = tee.out
    _write_readme(Path(args.readme), tee.text(), load_before)
    return code


class _Tee:
    """stdout, remembered: the README excerpt is this run's own output."""

    def __init__(self, out):
        self.out, self.parts = out, []

    def write(self, s: str) -> int:
        self.parts.append(s)
        return self.out.write(s)

    def flush(self) -> None:
        self.out.flush()

    def text(self) -> str:
        return "".join(self.parts)


BEGIN, END = "<!-- dckpt demo --readme: begin -->", "<!-- dckpt demo --readme: end -->"


def _write_readme(path: Path, output: str, load_before: tuple) -> None:
    """Replace what lies between BEGIN and END in `path` with this run's output from step
    [2/6] on (work-directory paths shortened) and the machine, date and load it ran under."""
    body = output[output.index("[2/6]"):] if "[2/6]" in output else output
    if "work directory: " in output:
        work = output.split("work directory: ", 1)[1].split("\n", 1)[0]
        body = body.replace(work + "/", "").replace(work, ".")
    lines = [ln for ln in body.splitlines() if not ln.startswith("loss curve plot")]
    load = os.getloadavg()
    head = (f"`dckpt demo --readme README.md` on {time.strftime('%Y-%m-%d %H:%M')} UTC, "
            f"{os.cpu_count()} cores, load average {load_before[0]:.1f} before and "
            f"{load[0]:.1f} after the run:")
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"dckpt demo: {path} has no {BEGIN} ... {END} section to write")
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    path.write_text(f"{before}{BEGIN}\n{head}\n\n```\n" + "\n".join(lines).rstrip()
                    + f"\n```\n{END}{after}")


def _run(args) -> int:
    ci = bool(os.environ.get("CI"))
    steps = args.steps or (16 if ci else 60)
    every = args.every or (4 if ci else 10)
    kill_at = args.kill_at or (steps // every // 2 * every + every // 2)
    if not every < kill_at < steps:
        print(f"dckpt demo: --kill-at must lie between {every} and {steps}", file=sys.stderr)
        return 2
    work = Path(args.dir or tempfile.mkdtemp(prefix="dckpt-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    print(f"dckpt demo: a small transformer, accelerate on 2 CPU processes (gloo), {steps} steps,"
          f" a dckpt checkpoint every {every} steps.\nwork directory: {work}\n")

    print("[1/6] reference run, uninterrupted")
    ref = _train(work, "reference", 2, steps, every, ["--no-save"])

    print(f"\n[2/6] the same run with checkpoints; killed with SIGKILL at step {kill_at}")
    killed = _train(work, "run", 2, steps, every, [], kill_at=kill_at)
    root = work / "run" / "checkpoints"
    committed = sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file())
    leftovers = sorted(p.name for p in root.iterdir() if is_staging(p.name))
    print(f"      committed checkpoints: {', '.join(committed)} (total_limit=3 keeps the newest 3)"
          + (f"; half-written, ignored and cleaned up on resume: {', '.join(leftovers)}"
             if leftovers else ""))
    latest = root / committed[-1]

    print(f"\n[3/6] verify {latest.name} by checksum")
    verified = _verify(latest)

    resharded = work / "for-one-process" / latest.name
    shutil.copytree(latest, resharded)
    print(f"\n[4/6] resume on 2 processes from the latest checkpoint ({latest.name})")
    two = _train(work, "run", 2, steps, every, ["--resume", "--bench", str(work / "bench.json")])
    print(f"\n[5/6] resume {latest.name} on 1 process (resharded from 2)")
    one = _train(work, "one", 1, steps, every, ["--resume", str(resharded), "--no-save"])

    print("\n[6/6] results")
    resumed_at = two["resumed"]["step"]
    same = _compare(ref["losses"], killed["losses"], two["losses"], one["losses"], resumed_at,
                    kill_at)
    png = _plot(work / "dckpt-demo.png", ref["losses"], killed["losses"], two["losses"],
                one["losses"], resumed_at, kill_at)
    _print_bench(json.loads((work / "bench.json").read_text()))
    print(f"\nloss curve plot: {png}" if png else "\n(no plot: matplotlib is not installed)")
    print(f"demo finished in {time.perf_counter() - t_start:.0f} s; files in {work}")
    return 0 if same and verified else 1


# ---- running the training job -------------------------------------------------------------
def _train(work: Path, project: str, procs: int, steps: int, every: int, extra: list[str],
           kill_at: int | None = None) -> dict:
    """Run dckpt.demo.train on `procs` processes, showing progress; kill it at `kill_at`."""
    name = f"{project}-{procs}p-{len(list(work.glob('*.log')))}"
    result = work / f"{name}.json"
    job = ["-m", "dckpt.demo.train", "--project", str(work / project), "--steps", str(steps),
           "--every", str(every), "--result", str(result), *extra]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(procs), *job]
    else:
        cmd = [sys.executable, *job]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                           os.environ.get("PYTHONPATH", "")]))
    env.pop("CI", None)  # the job takes its sizes from the arguments only
    log = open(work / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                            start_new_session=True)  # its own process group, to kill it whole
    out: dict = {"losses": []}
    t0 = time.perf_counter()
    for line in proc.stdout:
        if not line.startswith("@dckpt "):
            log.write(line)
            continue
        ev = json.loads(line[7:])
        kind = ev["event"]
        if kind == "start":
            print(f"      {ev['processes']} process(es), {ev['params'] / 1e6:.2f} M parameters, "
                  f"{ev['batches_per_epoch']} batches per epoch; started in "
                  f"{time.perf_counter() - t0:.1f} s")
        elif kind == "resumed":
            out["resumed"] = ev
            print(f"      resumed step {ev['step']} from {Path(ev['path']).name}: "
                  f"{ev['mb']:.1f} MB read and verified in {ev['seconds'] * 1e3:.0f} ms; restored "
                  f"{', '.join(ev['components'])}; RNG streams {', '.join(ev['rng'])}")
        elif kind == "step":
            out["losses"].append(ev["loss"])
            s = ev["step"]
            if s % 5 == 0 or s == kill_at or s == steps:
                print(f"      step {s:3d}/{steps}  loss {ev['loss']:.4f}  "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        elif kind == "saved":
            print(f"      step {ev['step']:3d}: {Path(ev['path']).name} committed in "
                  f"{ev['seconds'] * 1e3:.0f} ms")
        if kill_at is not None and kind == "step" and ev["step"] >= kill_at:
            os.killpg(proc.pid, signal.SIGKILL)
            print(f"      SIGKILL sent to torchrun and its workers at step {ev['step']}")
            break
    rc = proc.wait()
    log.close()
    if kill_at is None:
        if rc != 0:
            tail = (work / f"{name}.log").read_text()[-3000:]
            raise SystemExit(f"dckpt demo: the training job failed (exit {rc}):\n{tail}")
        out.update(json.loads(result.read_text()))  # full loss history, restored part included
    return out


# ---- verification -------------------------------------------------------------------------
def _verify(path: Path) -> bool:
    from ..cli import COMMANDS
    if "verify" in COMMANDS:
        cmd = ["dckpt", "verify", "--deep", "--no-progress", "--color", "never", str(path)]
        print(f"      $ {' '.join(cmd)}")
        out = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True)
        for line in (out.stdout + out.stderr).strip().splitlines()[1:]:
            print(f"      {line}" if line.strip() else "")
        return out.returncode == 0
    return _verify_chunks(path)


def _verify_chunks(path: Path) -> bool:
    """Check every chunk's stored and raw hashes (decompressing) against the manifest."""
    from ..storage import local as io
    from ..engine.checkpoint import read_manifest
    t0 = time.perf_counter()
    m = read_manifest(path)
    paths = [str(path / f.name) for f in m.files]
    chunks, sizes, names = [], [], []
    for name, t in m.tensors.items():
        for shard in t.shards:
            for c in shard.chunks:
                chunks.append(c)
                sizes.append(t.itemsize)
                names.append(name)
    failures = io.verify_chunks(paths, chunks, sizes, deep=True)
    mb = sum(f.size for f in m.files) / 1e6
    if failures:
        for index, kind, _, _, message in failures[:5]:
            print(f"      BAD chunk {index} of tensor {names[index]}: {kind}: {message}")
        return False
    print(f"      {len(chunks)} chunks of {len(m.tensors)} tensors in {len(paths)} files "
          f"({mb:.1f} MB): every stored and raw XXH3 hash matches "
          f"({(time.perf_counter() - t0) * 1e3:.0f} ms)")
    return True


# ---- the comparison -----------------------------------------------------------------------
def _compare(ref, killed, two, one, resumed_at: int, kill_at: int) -> bool:
    first = killed[:resumed_at] == ref[:resumed_at]
    print(f"      steps 1-{resumed_at} of the killed run equal the reference: {first}")
    print(f"      after the kill at step {kill_at}, training resumed from step {resumed_at}:\n")
    print("       step   reference    resumed, 2 processes    resumed, 1 process (diff)")
    for s in range(resumed_at + 1, len(ref) + 1):
        r, a, b = ref[s - 1], two[s - 1], one[s - 1]
        mark = "identical" if a == r else f"DIFFERS by {a - r:+.2e}"
        print(f"       {s:4d}   {r:.7f}    {a:.7f} {mark:<12}   {b:.7f} ({b - r:+.1e})")
    tail = range(resumed_at, len(ref))
    same = len(two) == len(ref) and all(two[i] == ref[i] for i in tail)
    worst = max(abs(one[i] - ref[i]) for i in tail)
    print(f"\n      resumed on 2 processes: {'BITWISE IDENTICAL' if same else 'NOT identical'} to "
          f"the uninterrupted run ({len(tail)} steps, every loss compared bit for bit)")
    print(f"      resumed on 1 process: same batches in the same order, losses within {worst:.1e};"
          " not bitwise, as expected: one process sums the gradients in another order and "
          "draws dropout from one RNG stream instead of two")
    return same and first


def _plot(png: Path, ref, killed, two, one, resumed_at: int, kill_at: int) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = range(1, len(ref) + 1)
    after = range(resumed_at + 1, len(ref) + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.4]})
    top.plot(steps, ref, color="black", lw=2.5, label="uninterrupted reference (2 processes)")
    top.plot(range(1, len(killed) + 1), killed, color="tab:red", lw=1.2,
             label=f"run killed with SIGKILL at step {kill_at}")
    top.plot(after, two[resumed_at:], "o", ms=3.5, color="tab:green",
             label=f"resumed from step {resumed_at}, 2 processes")
    top.plot(after, one[resumed_at:], color="tab:blue", lw=1, ls="--",
             label="resumed from the same checkpoint, 1 process")
    for ax in (top, bottom):
        ax.axvline(resumed_at, color="grey", ls=":", lw=1)
        ax.axvline(kill_at, color="tab:red", ls=":", lw=1)
    top.annotate(f"checkpoint\nstep {resumed_at}", (resumed_at, max(ref)), ha="right",
                 va="top", fontsize=8, color="grey", xytext=(-3, 0), textcoords="offset points")
    top.annotate("SIGKILL", (kill_at, max(ref)), ha="left", va="top", fontsize=8,
                 color="tab:red", xytext=(3, 0), textcoords="offset points")
    top.set_ylabel("training loss")
    top.set_title("dckpt: a killed accelerate run resumes exactly")
    top.legend(loc="center right", fontsize=8)
    bottom.plot(after, [two[i - 1] - ref[i - 1] for i in after], "o-", ms=3, color="tab:green",
                label="2 processes minus reference (all exactly 0)")
    bottom.plot(after, [one[i - 1] - ref[i - 1] for i in after], color="tab:blue", ls="--",
                label="1 process minus reference")
    bottom.axhline(0, color="black", lw=0.8)
    bottom.set_xlabel("step")
    bottom.set_ylabel("loss difference")
    bottom.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _print_bench(b: dict) -> None:
    mb = b["state_bytes"] / 1e6
    print(f"\n      save_state / load_state of this state ({mb:.1f} MB of model and optimizer "
          f"tensors per process, {b['processes']} processes; median of {b.get('repeats', 3)}, "
          "interleaved in a balanced order):")
    print("       system                save                 load            on disk")
    for name, s in b["systems"].items():
        print(f"       {name:<18} {s['save'] * 1e3:5.0f} ms {mb / s['save']:6.0f} MB/s   "
              f"{s['load'] * 1e3:5.0f} ms {mb / s['load']:6.0f} MB/s   "
              f"{s['disk_bytes'] / 1e6:6.1f} MB")
    print("      dckpt commits atomically, verifies every chunk on load and also saves the data "
          "position and RNG streams of every process; accelerate neither fsyncs nor checksums "
          "(\"accelerate + fsync\": its files fsynced after its save, for a durable save).")
    if mb < 100:
        print(f"      At {mb:.0f} MB fixed costs per call (process collectives, the manifest) "
              "outweigh the I/O; `make bench` measures large states.")
