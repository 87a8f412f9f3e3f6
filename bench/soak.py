#!/usr/bin/env python3
"""Soak: switchyard under steady load for a few minutes while the fake Slack injects faults
(500s and 429s with Retry-After), loopback only and bounded in time. Prints events in,
messages delivered, dead letters, lost (must be 0) and RSS at start and end.

    bench/soak.py [--minutes 3] [--rate 500] [--fail-rate 0.05] [--throttle-rate 0.02]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=3)
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--fail-rate", type=float, default=0.05)
    ap.add_argument("--throttle-rate", type=float, default=0.02)
    ap.add_argument("--skip-build", action="store_true")
    a = ap.parse_args()
    if not a.skip_build:
        run.build()
    tmp = tempfile.mkdtemp(prefix="switchyard-soak-")
    sink_p = run.start([os.path.join(run.BIN, "sink"), "--fail-rate", str(a.fail_rate), "--throttle-rate", str(a.throttle_rate)])
    sink = run.first_line(sink_p)
    eng, port, _ = run.engine(tmp, 100, sink, "soak")
    try:
        _, _, rss_start = run.proc_stats(eng.pid)
        seconds = a.minutes * 60
        samples = []
        lg = subprocess.Popen(
            [os.path.join(run.BIN, "loadgen"), "--url", f"http://127.0.0.1:{port}/hooks/port", "--secret", run.SECRET,
             "--duration", str(seconds), "--rate", str(a.rate), "--start-seq", "1"],
            stdout=subprocess.PIPE, text=True,
        )
        while lg.poll() is None:
            time.sleep(15)
            samples.append(run.proc_stats(eng.pid)[2])
            print(f"  t={len(samples) * 15:>4}s rss={samples[-1]:.0f} MB", file=sys.stderr)
        import json
        summary = json.loads(lg.communicate()[0])
        # Let retries drain (429 waits 1 s, 500 backs off to at most 2 s).
        deadline = time.time() + 60
        while time.time() < deadline:
            st = run.http_json(f"http://127.0.0.1:{port}/status")
            if st["queue_depth"] == 0:
                break
            time.sleep(1)
        st = run.http_json(f"http://127.0.0.1:{port}/status")
        s = run.http_json(f"http://{sink}/stats")
        dead = sum(d["dead_letters"] for d in st["destinations"].values())
        _, _, rss_end = run.proc_stats(eng.pid)
    finally:
        run.stop(eng)
        run.stop(sink_p)
    expected = summary["expected_messages"]
    lost = expected - s["unique"] - dead
    print(f"\nsoak: {a.minutes:g} min at {a.rate:g} events/s, sink faults {a.fail_rate:.0%} 500 + {a.throttle_rate:.0%} 429")
    print(f"events in:          {summary['accepted']:,} (failed requests {summary['failed']})")
    print(f"messages expected:  {expected:,}")
    print(f"delivered (unique): {s['unique']:,} (duplicates {s['duplicates']}, faults injected {s['faults_injected']:,})")
    print(f"dead letters:       {dead}")
    print(f"still queued:       {st['queue_depth']}")
    print(f"lost:               {lost}")
    print(f"RSS start / end:    {rss_start:.0f} MB / {rss_end:.0f} MB (samples: {', '.join(f'{x:.0f}' for x in samples)})")
    sys.exit(0 if lost == 0 else 1)


if __name__ == "__main__":
    main()
