"""What save_on= costs per step without a signal: one TCPStore.check of an absent key
(docs/preemption.md). Client and server in this process, over loopback.

    .venv/bin/python scripts/bench_preempt_poll.py
"""
import resource
import time

import torch.distributed as tdist

server = tdist.TCPStore("127.0.0.1", 0, 1, True)
client = tdist.TCPStore("127.0.0.1", server.port, 1, False)
key = ["dckpt/preempt/default"]
for _ in range(1000):
    client.check(key)
n = 20000
t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
for _ in range(n):
    client.check(key)
t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
print(f"store.check of an absent key: {(t1 - t0) / n * 1e6:.1f} us wall, "
      f"{cpu / n * 1e6:.1f} us CPU (client and server thread) per call, {n} calls")
