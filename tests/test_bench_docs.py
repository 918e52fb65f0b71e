"""docs/BENCHMARKS.md is generated from committed commands (dckpt/bench/docs.py).

The committed doc must be exactly what its records and notes give; each section's command
really runs (tiny sizes), records machine, commit, date and load, and its notes survive
every rerun; a failing command keeps the old record; new sections plug in by registration.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dckpt.bench import docs
from helpers import REPO, env

ENV = env()


def test_committed_doc_is_what_the_records_and_notes_give():
    assert docs.render(charts=False) == (REPO / "docs" / "BENCHMARKS.md").read_text(), \
        "docs/BENCHMARKS.md was edited by hand: edit benchmarks/notes/, then run " \
        "python -m dckpt.bench.docs"


def test_every_section_has_a_command_and_every_script_takes_record():
    for s in docs.SECTIONS:
        script = s.command[0]
        if script.endswith(".py"):
            assert (REPO / script).is_file(), s.slug
            assert "--record" in (REPO / script).read_text(), script
        assert (REPO / "benchmarks" / "notes" / f"{s.slug}.md").is_file(), s.slug


def _notes(tmp_path: Path, sentinel: str) -> Path:
    notes = tmp_path / "notes"
    shutil.copytree(REPO / "benchmarks" / "notes", notes)
    for slug in ("verify", "incremental", "native", "distributed", "async"):
        with open(notes / f"{slug}.md", "a") as f:
            f.write(f"\n{sentinel} {slug}\n")
    return notes


def _run(tmp_path: Path, notes: Path, only: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dckpt.bench.docs", "--run", "--quick", "--only", only,
         "--results", str(tmp_path / "results"), "--notes", str(notes),
         "--doc", str(tmp_path / "BENCHMARKS.md")],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)


def _check_section(text: str, title: str, script: str, sentinel: str, slug: str) -> None:
    body = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    assert f"Produced by `python {script}" in body and "--record" not in body
    assert "cores (" in body and "GiB memory" in body and "Load average " in body
    assert "at end" in body and "UTC" in body and "commit " in body
    assert "A quick run (tiny sizes)" in body
    assert f"{sentinel} {slug}" in body  # the notes, verbatim
    assert "Not regenerated yet" not in body


def test_quick_run_records_and_renders_sections_and_keeps_their_notes(tmp_path):
    notes = _notes(tmp_path, "NOTE-KEPT")
    proc = _run(tmp_path, notes, "save-load,verify,incremental,native")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "BENCHMARKS.md").read_text()
    _check_section(text, "Verify", "benchmarks/bench_verify.py", "NOTE-KEPT", "verify")
    _check_section(text, "Incremental checkpoints", "benchmarks/bench_incremental.py",
                   "NOTE-KEPT", "incremental")
    _check_section(text, "Native core", "benchmarks/bench_native.py", "NOTE-KEPT", "native")
    assert "| sha256sum |" in text and "| dckpt verify |" in text
    assert "| python write+fsync, one write() call |" in text
    save_load = text.split("## Save and load\n", 1)[1].split("\n## ", 1)[0]
    assert "A quick run (tiny sizes)" in save_load and "Reproduce: `python -m dckpt bench" in save_load
    assert "load average" in save_load and "commit " in save_load
    assert (REPO / "benchmarks" / "notes" / "save-load.md").read_text().strip() in save_load
    assert "dckpt manager, first save GB/s" in save_load
    assert (tmp_path / "bench_save_load.png").read_bytes()[:4] == b"\x89PNG"
    rec = json.loads((tmp_path / "results" / "verify.json").read_text())
    assert rec["quick"] is True and rec["machine"]["cores"] >= 1
    # a section with no record yet says so, and keeps its notes
    assert "## Distributed\n\n*Not measured yet" in text
    assert "NOTE-KEPT distributed" in text
    # rendering again from the records changes nothing and deletes no note
    again = docs.render(tmp_path / "results", notes, tmp_path)
    assert again == text


def test_distributed_and_async_sections_record_peers_at_their_best(tmp_path):
    notes = _notes(tmp_path, "NOTE-KEPT")
    proc = _run(tmp_path, notes, "distributed,async")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "BENCHMARKS.md").read_text()
    _check_section(text, "Distributed", "benchmarks/bench_dist.py", "NOTE-KEPT", "distributed")
    _check_section(text, "Async saves", "benchmarks/bench_async.py", "NOTE-KEPT", "async")
    assert "| save wall ms | user CPU ms | system CPU ms |" in text  # the CPU breakdown
    assert "thread_count=" in text and "sync_files=True" in text
    assert "DCP async_save, thread: blocked" in text
    assert "DCP async_save, process: blocked" in text


def test_a_failing_command_keeps_the_old_record_and_a_registered_section_renders(tmp_path):
    results = tmp_path / "results"
    ok = docs.Section("extra", "Extra", ["-c", (
        "import sys\nfrom dckpt.bench.record import recording\n"
        "with recording(sys.argv[2], kind='markdown'):\n    print('| figure |\\n|---|\\n| 42 |')")])
    bad = docs.Section("extra", "Extra", ["-c", (
        "import sys\nfrom dckpt.bench.record import recording\n"
        "with recording(sys.argv[2]):\n    print('half a table')\n    sys.exit(3)")])
    saved = list(docs.SECTIONS)
    try:
        docs.register(ok)
        assert docs.run_section(ok, results, quick=False, log=lambda m: None)
        docs.register(bad)
        assert not docs.run_section(bad, results, quick=False, log=lambda m: None)
        text = docs.render(results, REPO / "benchmarks" / "notes", tmp_path)
    finally:
        docs.SECTIONS[:] = saved
    section = text.split("## Extra\n", 1)[1]
    assert "| 42 |" in section and "half a table" not in section
    assert text.index("## Extra") > text.index("## GPU")  # after the sections already there


def test_a_section_that_needs_other_hardware_is_skipped_and_keeps_its_figures(tmp_path):
    gpu = next(s for s in docs.SECTIONS if s.slug == "gpu")
    if gpu.available():
        pytest.skip("a GPU is visible here: the section would run")
    assert not docs.run_section(gpu, tmp_path, quick=True, log=lambda m: None)
    assert not (tmp_path / "gpu.json").exists()
    text = docs.render(tmp_path, REPO / "benchmarks" / "notes", tmp_path)
    assert "## GPU\n\n*Not regenerated yet" in text and "NVIDIA H200" in text
