#!/usr/bin/env python3
"""Signed webhooks under connection abuse, on 127.0.0.1 only, bounded in time.

Holds 2,000 idle connections (no bytes sent) and 200 slow-body connections (headers for a
1 MiB body, then one byte a second) open against the engine for `--seconds` (30 by default),
reopening any the engine closes, so the pressure stays for the whole window. Meanwhile the
load generator sends signed webhooks at a fixed rate (`--rate`, 200/s) and reports their
status and latency; the engine's RSS is sampled every second. Prints one Markdown table.

    bench/hostile.py [--seconds 30] [--idle 2000] [--slow 200] [--rate 200] [--skip-build]

The engine runs with its default limits (docs/operations.md: limits).
"""

import argparse
import os
import resource
import selectors
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the harness's build, engine, sink and load generator helpers)


class Pressure(threading.Thread):
    """Keeps `idle` idle and `slow` slow-body connections open until `stop` is set."""

    def __init__(self, port, idle, slow):
        super().__init__(daemon=True)
        self.port, self.idle_n, self.slow_n = port, idle, slow
        self.stop = threading.Event()
        self.reopened = 0
        self.open_max = 0

    def connect(self, slow):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", self.port))
        except BlockingIOError:
            pass
        return {"sock": s, "slow": slow, "sent_head": False}

    def run(self):
        sel = selectors.DefaultSelector()
        conns = [self.connect(False) for _ in range(self.idle_n)] + [self.connect(True) for _ in range(self.slow_n)]
        for c in conns:
            sel.register(c["sock"], selectors.EVENT_READ, c)
        head = b"POST /hooks/port HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1048576\r\n\r\n"
        last_trickle = 0.0
        while not self.stop.is_set():
            for key, _ in sel.select(timeout=0.2):
                c = key.data
                try:
                    data = c["sock"].recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:  # closed by the engine: reopen, the attacker does not give up
                    sel.unregister(c["sock"])
                    c["sock"].close()
                    n = self.connect(c["slow"])
                    c.update(n)
                    sel.register(c["sock"], selectors.EVENT_READ, c)
                    self.reopened += 1
            now = time.time()
            if now - last_trickle >= 1.0:
                last_trickle = now
                for c in conns:
                    if not c["slow"]:
                        continue
                    try:
                        if not c["sent_head"]:
                            c["sock"].send(head)
                            c["sent_head"] = True
                        else:
                            c["sock"].send(b" ")
                    except OSError:
                        pass
            self.open_max = max(self.open_max, len(conns))
        for c in conns:
            c["sock"].close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--slow", type=int, default=200)
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--skip-build", action="store_true")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if not args.skip_build:
        print("building (release)…", file=sys.stderr)
        run.build("release")
    tmp = tempfile.mkdtemp(prefix="switchyard-hostile-")
    sink_p = run.start([os.path.join(run.BIN, "sink")])
    sink = run.first_line(sink_p)
    p, port, _ = run.engine(tmp, 100, sink, "hostile")
    rss_samples = []
    stop_sampling = threading.Event()

    def sample():
        while not stop_sampling.is_set():
            rss_samples.append(run.proc_stats(p.pid)[2])
            time.sleep(1)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        rss0 = run.proc_stats(p.pid)[2]
        calm = run.loadgen(f"http://127.0.0.1:{port}/hooks/port", 5, rate=args.rate, start_seq=1)
        pressure = Pressure(port, args.idle, args.slow)
        pressure.start()
        sampler.start()
        time.sleep(2)  # let the connections open
        print(f"{args.idle} idle + {args.slow} slow-body connections, {args.rate} signed webhooks/s for {args.seconds:.0f} s…", file=sys.stderr)
        under = run.loadgen(f"http://127.0.0.1:{port}/hooks/port", args.seconds, rate=args.rate, start_seq=1_000_000)
        pressure.stop.set()
        stop_sampling.set()
        pressure.join(timeout=10)
        sampler.join(timeout=5)
        health_ok = run.http_json(f"http://127.0.0.1:{port}/healthz")["status"] == "ok"
        peak = max(rss_samples) if rss_samples else 0
        print()
        print("| | webhooks accepted | failed | p50 ms | p99 ms | p99.9 ms | engine RSS MB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, lg, rss in (("calm", calm, rss0), ("under pressure", under, peak)):
            lat = lg["latency_us"]
            print(f"| {name} | {lg['accepted']} | {lg['failed']} | {lat['p50'] / 1000:.2f} | {lat['p99'] / 1000:.2f} | {lat['p999'] / 1000:.2f} | {rss:.0f} |")
        print()
        print(f"connections the engine closed and the attacker reopened: {pressure.reopened}; /healthz after: {'ok' if health_ok else 'FAILED'}")
    finally:
        stop_sampling.set()
        run.stop(p)
        run.stop(sink_p)


if __name__ == "__main__":
    main()
