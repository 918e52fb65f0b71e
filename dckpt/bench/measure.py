"""Timing, peak memory, page-cache control and machine facts for the benchmark."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

_CLEAR_REFS = "/proc/self/clear_refs"
_DROP_CACHES = "/proc/sys/vm/drop_caches"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


class PeakRss:
    """Peak resident memory above the level at entry, over a block of code.

    Linux resets the process's high-water mark (VmHWM) when "5" is written to
    /proc/self/clear_refs, which measures the true peak with no overhead. Where that is not
    allowed, a thread samples VmRSS every millisecond (it may miss very short peaks).
    """

    def __init__(self):
        self.extra = 0
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._peak = 0

    def __enter__(self) -> "PeakRss":
        self._base = rss_bytes()
        if _reset_hwm():
            return self
        self._peak = self._base
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        if self._sampler is None:
            peak = _status_kb("VmHWM") * 1024
        else:
            self._stop.set()
            self._sampler.join()
            peak = max(self._peak, rss_bytes())
        self.extra = max(0, peak - self._base)


def _reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def can_drop_caches() -> bool:
    """Cold-cache runs need root (writing to /proc/sys/vm/drop_caches)."""
    return os.geteuid() == 0 and os.access(_DROP_CACHES, os.W_OK) and drop_caches()


def drop_caches() -> bool:
    """Write back dirty pages, then evict clean page cache (system wide)."""
    os.sync()
    try:
        with open(_DROP_CACHES, "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def fsync_tree(path: Path) -> None:
    """fsync every file under path and every directory up to and including its parent,
    so a peer that does not sync itself is held to the same durability as dckpt."""
    path = Path(path)
    if path.is_file():
        _fsync(path, os.O_RDONLY)
    else:
        for root, dirs, files in os.walk(path):
            for name in files:
                _fsync(Path(root) / name, os.O_RDONLY)
            _fsync(Path(root), os.O_RDONLY | os.O_DIRECTORY)
    _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(p: Path, flags: int) -> None:
    fd = os.open(p, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_usage(path: Path) -> int:
    """Bytes of the files under path (apparent sizes: what a copy would move)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove(path: Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine(dirs: dict[str, Path]) -> dict:
    """Cores, memory, CPU model and the file systems the regimes write to."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem = _meminfo("MemTotal")
    return {"cores": len(os.sched_getaffinity(0)), "cpu": cpu, "memory_bytes": mem,
            "kernel": platform.release(), "python": platform.python_version(),
            "filesystems": {regime: _filesystem(p) for regime, p in dirs.items()}}


def available_memory() -> int:
    return _meminfo("MemAvailable")


def _meminfo(field: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _filesystem(path: Path) -> dict:
    """The mount holding path: device, type, and whether the device is rotational."""
    info = {"path": str(path)}
    try:
        out = subprocess.run(["df", "-PT", str(path)], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[-1].split()
        info.update(device=out[0], type=out[1], size_bytes=int(out[2]) * 1024)
        dev = Path(out[0]).name
        rot = Path(f"/sys/block/{dev}/queue/rotational")
        if rot.exists():
            info["rotational"] = rot.read_text().strip() == "1"
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        pass
    return info


__all__ = ["PeakRss", "can_drop_caches", "drop_caches", "fsync_tree", "disk_usage", "remove",
           "machine", "load_average", "available_memory", "rss_bytes"]
