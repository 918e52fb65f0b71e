"""Which client should serve s3://: s3fs or obstore (FsspecStore), through dckpt's object
store layer (dckpt/storage/objectstore.py), against a real S3 server on loopback.

    python benchmarks/bench_remote_clients.py [--mb 256] [--rounds 3] [--endpoint URL]

Per client, interleaved round by round: put_file of one file (multipart, the ETag check
off and on), a parallel ranged download of it (16 threads x 8 MiB ranges into one
buffer, as the remote backend reads), and dckpt.save / dckpt.load of a state of the same
size. Prints wall seconds, MB/s and this process's CPU seconds per GB (the server's CPU
is not counted; moto_server runs in Python, usually the limit). Without --endpoint a
moto_server is started on loopback (tests/helpers/s3server.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--endpoint")
    ap.add_argument("--clients", default="s3fs,obstore")
    args = ap.parse_args()
    import numpy as np
    from helpers import s3server
    proc = None
    endpoint = args.endpoint
    if endpoint is None:
        endpoint, proc = s3server.start()
    os.environ.update(s3server.client_env(endpoint))
    import torch

    import dckpt
    from dckpt.storage import objectstore
    try:
        bucket = s3server.new_bucket(endpoint)
        nbytes = args.mb << 20
        data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
        tmp = tempfile.mkdtemp()
        src = os.path.join(tmp, "src")
        data.tofile(src)
        state = {"w": torch.from_numpy(data.view(np.float32).copy())}
        live = {"w": torch.zeros_like(state["w"])}
        clients = args.clients.split(",")
        results: dict = {}
        for rnd in range(args.rounds):
            for client in clients:
                st = objectstore.connect(f"s3://{bucket}", {"client": client})
                url = f"s3://{bucket}/{client}/obj"
                buf = np.empty(nbytes, np.uint8)
                step = 8 << 20

                def get():
                    with ThreadPoolExecutor(16) as ex:
                        list(ex.map(lambda a: st.get_into(url, a, buf[a:a + step]),
                                    range(0, nbytes, step)))
                opts = {"client": client}
                ck = f"s3://{bucket}/{client}/ck"
                runs = {
                    "put": lambda: st.put_file(src, url, check=False),
                    "put+etag": lambda: st.put_file(src, url, check=True),
                    "get (16x8MiB)": get,
                    "dckpt.save": lambda: dckpt.save(state, ck, overwrite=True,
                                                     storage_options=opts),
                    "dckpt.load": lambda: dckpt.load(ck, into=live, storage_options=opts),
                }
                for name, fn in runs.items():
                    wall, cpu = timed(fn)
                    results.setdefault((name, client), []).append((wall, cpu))
                assert np.array_equal(buf, data)
                assert torch.equal(live["w"].view(torch.int32), state["w"].view(torch.int32))
                st.delete([o.url for o in st.list(f"s3://{bucket}/{client}")])
            print(f"round {rnd + 1} done", file=sys.stderr)
        gb = nbytes / 1e9
        print(f"| operation ({args.mb} MiB) | client | MB/s (median of {args.rounds}) "
              "| client CPU s/GB |")
        print("|---|---|---|---|")
        for (name, client), runs in results.items():
            wall = statistics.median(w for w, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            print(f"| {name} | {client} | {nbytes / wall / 1e6:.0f} | {cpu / gb:.2f} |")
    finally:
        if proc is not None:
            proc.kill()


if __name__ == "__main__":
    main()
