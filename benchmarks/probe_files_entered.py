"""How many times one save and one load of a one-tensor state enter dckpt's files over time
(issue 18): each change of the innermost dckpt frame's file, on calls and on returns, so a
return into a file left earlier counts as entering it again. The stack at pwrite/pread is
tests/test_layers.py's count; this one is the whole call's path. Imports are left out (a
warm-up save and load run first). Counts only: no timing.

    python benchmarks/probe_files_entered.py [-v]   # -v: the sequence of files too
"""
from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import dckpt  # noqa: E402

PKG = str(Path(dckpt.__file__).resolve().parent)


def _dckpt_file(frame) -> str | None:
    """The package-relative file of the innermost dckpt frame (module bodies left out)."""
    while frame is not None:
        f = frame.f_code.co_filename
        if f.startswith(PKG) and frame.f_code.co_name != "<module>":
            return f[len(PKG) + 1:]
        frame = frame.f_back
    return None


def files_entered(fn) -> list[str]:
    seq: list[str] = []

    def profile(frame, event, arg):
        if event == "call":
            cur = _dckpt_file(frame)
        elif event == "return":
            cur = _dckpt_file(frame.f_back)
        else:
            return
        if cur is not None and (not seq or seq[-1] != cur):
            seq.append(cur)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seq


def main() -> None:
    d = Path(tempfile.mkdtemp())
    state = {"w": torch.arange(4.0)}
    dckpt.save(state, d / "warm")
    dckpt.load(d / "warm", into={"w": torch.zeros(4)})
    runs = {"save": files_entered(lambda: dckpt.save(state, d / "c")),
            "load": files_entered(lambda: dckpt.load(d / "c", into={"w": torch.zeros(4)}))}
    for what, seq in runs.items():
        count = collections.Counter(seq)
        print(f"{what}: {len(seq)} file entries, {len(count)} distinct files; "
              + ", ".join(f"{n} {name}" for name, n in count.most_common()))
        if "-v" in sys.argv:
            print("    " + " -> ".join(seq))


if __name__ == "__main__":
    main()
