#!/usr/bin/env python3
"""Instructions per event of the engine, under callgrind: a measure that repeats to 0.1% on a
shared VM whose wall-clock speed drifts by 10% (used for the round-2 table in docs/performance.md).

Starts `switchyard serve` (100 bench rules, a fake Slack) under `valgrind --tool=callgrind`,
warms it up, zeroes the counters, sends EVENTS events at 300/s, waits for delivery, dumps, and
prints the user-space instructions per event summed over all threads. valgrind runs SHA-256 in
software, so about 86,000 of the figure is the HMAC and body hash that SHA-NI does in a few
thousand on the CPU. `--floor` measures the floor the same way. Needs valgrind.

    bench/instructions.py [--events 1500] [--floor] [--mix default|one|three] [--binary PATH] [--skip-build]

With `--mix one` every event makes one message, so the figure is also the cost of a delivered
message; `--keep DIR` keeps the callgrind output there (for callgrind_annotate).
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1500)
    ap.add_argument("--floor", action="store_true", help="measure the floor instead of switchyard")
    ap.add_argument("--binary", help="the switchyard binary to measure (default: the release build)")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--mix", default="default", choices=["default", "one", "three"])
    ap.add_argument("--keep", help="directory to keep the callgrind output in")
    a = ap.parse_args()
    if not a.skip_build:
        run.build()
    tmp = tempfile.mkdtemp(prefix="switchyard-instr-")
    sink_p = run.start([os.path.join(run.BIN, "sink")])
    sink = run.first_line(sink_p)
    out = os.path.join(tmp, "callgrind.out")
    cg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    if a.keep:
        # Each dump self-contained, so callgrind_annotate can read the measured one on its own.
        cg += ["--compress-strings=no", "--compress-pos=no"]
    try:
        if a.floor:
            port = run.free_port()
            per_kind = [] if a.mix == "default" else ["--per-kind"]
            p = subprocess.Popen(cg + [os.path.join(run.BIN, "floor"), "--sink", f"http://{sink}/hook", "--listen", f"127.0.0.1:{port}", *per_kind],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            p.stdout.readline()
        else:
            p, port, _ = run.engine(tmp, 100, sink, "instr", wrap=cg, ready_secs=120, binary=a.binary)
        url = f"http://127.0.0.1:{port}/hooks/port"
        run.loadgen(url, 2, rate=200, unsigned=a.floor, start_seq=1, mix=a.mix)  # warm-up
        time.sleep(1)
        subprocess.run(["callgrind_control", "-z", str(p.pid)], capture_output=True, check=True)
        lg = run.loadgen(url, a.events / 300, rate=300, unsigned=a.floor, start_seq=1_000_000, mix=a.mix)
        time.sleep(2)  # let deliveries finish
        subprocess.run(["callgrind_control", "-d", str(p.pid)], capture_output=True, check=True)
        time.sleep(1)
        run.stop(p)
        total = 0
        for f in glob.glob(out + "*"):
            with open(f, errors="replace") as fh:
                for line in fh:
                    if line.startswith("totals:"):
                        total += int(line.split()[1])
        what = "floor" if a.floor else "switchyard"
        msgs = lg["expected_messages"] if not a.floor or a.mix != "default" else lg["accepted"]
        print(f"{what} (mix {a.mix}): {lg['accepted']} events, {total / max(1, lg['accepted']):,.0f} instructions per event, "
              f"{total / max(1, msgs):,.0f} per message ({msgs} messages)")
        if a.keep:
            os.makedirs(a.keep, exist_ok=True)
            for f in glob.glob(out + "*"):
                shutil.copy(f, a.keep)
    finally:
        run.stop(sink_p)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
