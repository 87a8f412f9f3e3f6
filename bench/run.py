#!/usr/bin/env python3
"""End-to-end benchmark of switchyard against the floor, on 127.0.0.1 only.

Runs, in one go: (a) the floor (a minimal forwarder: accept, answer 202, POST to the sink)
and (b) switchyard with 100 rules, signature verification and the durable outbox, both at a
fixed concurrency, in alternating rounds, once per event mix (`--mixes`): `default` (70% of
events match nothing, 20% one rule, 10% three; the floor forwards one message per event),
`one` (every event makes one message) and `three` (every event makes three; the floor forwards
as many as switchyard delivers); (c) switchyard at a fixed rate of 5,000 events/s for
the ingest-latency target; (d) a reload of 1,000 rules under load. Prints one Markdown table.
Needs only python3 and the workspace's binaries (built first, in release mode).

    bench/run.py [--seconds 15] [--rounds 3] [--concurrency 64] [--mixes default,one,three]
                 [--profile release|dist] [--skip-build] [--binary PATH] [--only-mixes]

`--seconds` is the load time per side and mix, split into `--rounds` alternating rounds.
`--only-mixes` skips (c) and (d). `--guide` adds (e): the FastAPI listener of Port's guide
(bench/guide/listener.py, one uvicorn worker, `slack_sdk`), the code switchyard replaces,
against switchyard in alternating rounds of the `one` mix; it installs FastAPI, uvicorn and
slack_sdk into target/bench-py first.

`--store postgres://user@host:5432/db` measures the PostgreSQL store instead (and only that),
mix `one`, in alternating rounds: the SQLite engine, one replica on PostgreSQL, and two
replicas on PostgreSQL sharing the database (the load generator splits its connections over
them). The database `db` is dropped and made anew first. Besides throughput it reports the
database's own cost from `pg_stat_database` (commits per second, rows written per message) and
the at-least-once window: how long a delivered message waits for its outcome's commit
(`switchyard_outcome_commit_seconds`). Needs `psql`.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
BIN = os.path.join(TARGET, "release")
SECRET = "bench-secret"
TICK = os.sysconf("SC_CLK_TCK")


def build(profile="release"):
    # Without the Kafka feature: librdkafka and OpenSSL are not needed to measure the HTTP path,
    # and leaving them out keeps a cold build of the harness within a few minutes.
    subprocess.run(["cargo", "build", "--profile", profile, "--quiet", "--no-default-features", "-p", "switchyard", "-p", "switchyard-bench"], cwd=ROOT, check=True)


def start(args, **kw):
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=kw.pop("stderr", subprocess.DEVNULL), text=True, **kw)
    return p


def first_line(p):
    return p.stdout.readline().strip()


def http_json(url, data=None, method=None, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
        return json.loads(body) if body else None


def wait_ready(url, secs=30):
    end = time.time() + secs
    while time.time() < end:
        try:
            http_json(url)
            return
        except Exception:
            time.sleep(0.05)
    raise SystemExit(f"not ready: {url}")


def proc_stats(pid):
    """(cpu seconds, peak RSS in MB, current RSS in MB) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    cpu = (int(parts[11]) + int(parts[12])) / TICK
    hwm = rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return cpu, hwm, rss


def loadgen(url, seconds, concurrency=None, rate=None, unsigned=False, start_seq=1, mix="default"):
    args = [os.path.join(BIN, "loadgen"), "--url", url, "--secret", SECRET, "--duration", str(seconds), "--start-seq", str(start_seq), "--mix", mix]
    if rate:
        args += ["--rate", str(rate)]
    else:
        args += ["--concurrency", str(concurrency)]
    if unsigned:
        args.append("--unsigned")
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def wait_delivered(sink, expected, secs=60):
    end = time.time() + secs
    while time.time() < end:
        s = http_json(f"http://{sink}/stats")
        if s["messages"] >= expected:
            return s
        time.sleep(0.2)
    return http_json(f"http://{sink}/stats")


def engine(tmp, rules_n, sink, name, wrap=(), ready_secs=30, binary=None, store=None):
    """Starts `switchyard serve` on `rules_n` bench rules sending to `sink`; `wrap` is a command
    to run it under (valgrind, for bench/instructions.py); `store` a PostgreSQL URL."""
    rules = os.path.join(tmp, f"rules-{name}")
    subprocess.run([os.path.join(BIN, "benchrules"), rules, str(rules_n), f"http://{sink}/hook"], check=True)
    data = os.path.join(tmp, f"data-{name}")
    port = free_port()
    env = dict(os.environ, PORT_CLIENT_SECRET=SECRET, SWITCHYARD_LOG="warn", SWITCHYARD_ADMIN_TOKEN="bench-admin")
    if store:
        env["SWITCHYARD_DATABASE_URL"] = store
    log = open(os.path.join(tmp, f"{name}.log"), "w")
    p = subprocess.Popen(
        [*wrap, binary or os.path.join(BIN, "switchyard"), "serve", "--rules", rules, "--data-dir", data, "--listen", f"127.0.0.1:{port}", "--no-watch"],
        env=env, stdout=subprocess.DEVNULL, stderr=log,
    )
    wait_ready(f"http://127.0.0.1:{port}/readyz", ready_secs)
    return p, port, rules


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


def segment(sink, pid, url, seconds, concurrency, unsigned=False, start_seq=1, mix="default", per_event=False):
    """One timed run against `url`: the load generator's and the sink's figures, and the CPU
    seconds the process `pid` used meanwhile (until the last message arrived). `per_event`:
    one message per accepted event is expected (the default mix's floor)."""
    http_json(f"http://{sink}/reset", data=b"", method="POST")
    cpu0 = proc_stats(pid)[0]
    lg = loadgen(url, seconds, concurrency=concurrency, unsigned=unsigned, start_seq=start_seq, mix=mix)
    s = wait_delivered(sink, lg["accepted"] if per_event else lg["expected_messages"])
    return lg, s, proc_stats(pid)[0] - cpu0


def combine(runs, one_per_event=False):
    """Totals over rounds: rates from summed counts and times, latencies as the median round's."""
    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]
    accepted = sum(lg["accepted"] for lg, _, _ in runs)
    msgs = sum(s["messages"] for _, s, _ in runs)
    return {
        "accepted": accepted,
        "expected": sum(lg["accepted"] if one_per_event else lg["expected_messages"] for lg, _, _ in runs),
        "accepted_per_s": accepted / sum(lg["seconds"] for lg, _, _ in runs),
        "messages": msgs,
        "duplicates": sum(s["duplicates"] for _, s, _ in runs),
        "per_s": msgs / sum(s["messages"] / s["per_s"] for _, s, _ in runs if s["per_s"]),
        "latency_ms": {q: med([lg["latency_us"][q] for lg, _, _ in runs]) / 1000 for q in ("p50", "p99", "p999")},
        "e2e_ms": {q: med([s["e2e_us"][q] for _, s, _ in runs]) / 1000 for q in ("p50", "p99")},
        "cpu_per_1k": sum(c for _, _, c in runs) / max(accepted, 1) * 1000,
    }


def guide(args, tmp, sink, sy_pid, sy_port, seg, seq):
    """(e) The guide's FastAPI listener against switchyard, alternating rounds of mix `one`."""
    venv = os.path.join(TARGET, "bench-py")
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r",
                    os.path.join(ROOT, "bench", "guide", "requirements.txt")], check=True)
    gport = free_port()
    env = dict(os.environ, PORT_CLIENT_SECRET=SECRET, SLACK_WEBHOOK_URL=f"http://{sink}/hook")
    g = subprocess.Popen([py, "-m", "uvicorn", "listener:app", "--workers", "1", "--host", "127.0.0.1",
                          "--port", str(gport), "--log-level", "warning", "--no-access-log"],
                         cwd=os.path.join(ROOT, "bench", "guide"), env=env,
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "guide.log"), "w"))
    try:
        end = time.time() + 30
        while time.time() < end:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{gport}/docs", timeout=1).read()
                break
            except Exception:
                time.sleep(0.2)
        g_runs, s_runs = [], []
        for r in range(args.rounds):
            print(f"guide, round {r + 1} of {args.rounds}: the FastAPI listener, then switchyard…", file=sys.stderr)
            gr = segment(sink, g.pid, f"http://127.0.0.1:{gport}/hooks/port", seg, args.concurrency, start_seq=seq, mix="one")
            seq = gr[0]["next_seq"]
            sr = segment(sink, sy_pid, f"http://127.0.0.1:{sy_port}/hooks/port", seg, args.concurrency, start_seq=seq, mix="one")
            seq = sr[0]["next_seq"]
            g_runs.append(gr)
            s_runs.append(sr)
        return combine(g_runs), combine(s_runs), [s[1]["per_s"] / x[1]["per_s"] if x[1]["per_s"] else 0 for x, s in zip(g_runs, s_runs)], proc_stats(g.pid)[1]
    finally:
        stop(g)


def print_guide(args, rows):
    gl, sy, ratios, hwm = rows
    med = sorted(ratios)[len(ratios) // 2] if ratios else 0
    print(f"\nthe guide's FastAPI listener (one uvicorn worker, slack_sdk), mix `one`, {args.rounds} alternating rounds:\n")
    print("| | FastAPI listener | switchyard |")
    print("|---|---|---|")
    print(f"| delivered messages/s | {gl['per_s']:,.0f} | {sy['per_s']:,.0f} |")
    print(f"| messages delivered / expected | {gl['messages']:,} / {gl['expected']:,} | {sy['messages']:,} / {sy['expected']:,} |")
    print(f"| ingest latency p50 / p99 | {gl['latency_ms']['p50']:.2f} / {gl['latency_ms']['p99']:.2f} ms | {sy['latency_ms']['p50']:.2f} / {sy['latency_ms']['p99']:.2f} ms |")
    print(f"| CPU seconds per 1,000 events | {gl['cpu_per_1k']:.3f} | {sy['cpu_per_1k']:.3f} |")
    print(f"| peak RSS | {hwm:.0f} MB | |")
    print(f"| switchyard vs the listener (delivered messages) | 1.0 | {sy['per_s'] / gl['per_s'] if gl['per_s'] else 0:.1f}×; median round {med:.1f}× (rounds: {', '.join(f'{x:.1f}' for x in ratios)}) |")


def psql(url, sql):
    out = subprocess.run(["psql", url, "-Atc", sql], capture_output=True, text=True, check=True).stdout
    return out.strip()


def pg_counts(url):
    """(commits, rows written) of the database so far, from pg_stat_database."""
    time.sleep(1.2)  # backends report their counts at most once a second
    row = psql(url, "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted FROM pg_stat_database WHERE datname = current_database()")
    c, w = row.split("|")
    return int(c), int(w)


def commit_window(port):
    """The outcome-commit histogram's (count, sum) from an engine's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    count = total = 0.0
    for line in text.splitlines():
        if line.startswith("switchyard_outcome_commit_seconds_count"):
            count += float(line.split()[-1])
        elif line.startswith("switchyard_outcome_commit_seconds_sum"):
            total += float(line.split()[-1])
    return count, total


def window_quantile(port, q):
    """A quantile of the outcome-commit histogram, from its buckets (upper bound of the bucket)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    buckets = []
    for line in text.splitlines():
        if line.startswith("switchyard_outcome_commit_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    for le, n in buckets:
        if n >= q * total:
            return le
    return None


def multi_segment(sink, pids, urls, seconds, concurrency, start_seq):
    """Like `segment`, with the load split over `urls` (one load generator each, run at once)."""
    import threading
    http_json(f"http://{sink}/reset", data=b"", method="POST")
    cpu0 = sum(proc_stats(p)[0] for p in pids)
    out = [None] * len(urls)

    def run(i):
        out[i] = loadgen(urls[i], seconds, concurrency=max(1, concurrency // len(urls)), start_seq=start_seq + i * 5_000_000, mix="one")

    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(urls))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    accepted = sum(lg["accepted"] for lg in out)
    s = wait_delivered(sink, accepted)
    lg = dict(out[0])
    lg["accepted"] = accepted
    lg["expected_messages"] = sum(x["expected_messages"] for x in out)
    lg["latency_us"] = {q: max(x["latency_us"][q] for x in out) for q in ("p50", "p99", "p999")}
    lg["next_seq"] = start_seq + len(urls) * 5_000_000
    return lg, s, sum(proc_stats(p)[0] for p in pids) - cpu0


def store_bench(args, tmp, sink):
    """SQLite against one and two PostgreSQL replicas, alternating rounds of mix `one`."""
    url = args.store
    base, _, dbname = url.rpartition("/")
    dbname = dbname.split("?")[0]
    admin = f"{base}/postgres"
    psql(admin, f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
    psql(admin, f"CREATE DATABASE {dbname}")
    procs = []
    try:
        lite, lite_port, _ = engine(tmp, 100, sink, "sqlite", binary=args.binary)
        procs.append(lite)
        pg1, pg1_port, _ = engine(tmp, 100, sink, "pg1", binary=args.binary, store=url)
        procs.append(pg1)
        pg2, pg2_port, _ = engine(tmp, 100, sink, "pg2", binary=args.binary, store=url)
        procs.append(pg2)
        seg = args.seconds / args.rounds
        seq = 40_000_000
        rows = {"sqlite": [], "pg1": [], "pg2": []}
        db = []
        for r in range(args.rounds):
            print(f"store, round {r + 1} of {args.rounds}: SQLite, one PostgreSQL replica, two…", file=sys.stderr)
            e = segment(sink, lite.pid, f"http://127.0.0.1:{lite_port}/hooks/port", seg, args.concurrency, start_seq=seq, mix="one")
            seq = e[0]["next_seq"]
            rows["sqlite"].append(e)
            c0 = pg_counts(url)
            e = segment(sink, pg1.pid, f"http://127.0.0.1:{pg1_port}/hooks/port", seg, args.concurrency, start_seq=seq, mix="one")
            c1 = pg_counts(url)
            seq = e[0]["next_seq"]
            rows["pg1"].append(e)
            db.append((c1[0] - c0[0], c1[1] - c0[1], e[1]["messages"], e[0]["seconds"]))
            e = multi_segment(sink, [pg1.pid, pg2.pid], [f"http://127.0.0.1:{pg1_port}/hooks/port", f"http://127.0.0.1:{pg2_port}/hooks/port"], seg, args.concurrency, seq)
            seq = e[0]["next_seq"]
            rows["pg2"].append(e)
        win = commit_window(pg1_port)
        lite_win = commit_window(lite_port)
        quant = {q: window_quantile(pg1_port, q) for q in (0.5, 0.99)}
        lite_quant = {q: window_quantile(lite_port, q) for q in (0.5, 0.99)}
        rss = {"sqlite": proc_stats(lite.pid)[1], "pg1": proc_stats(pg1.pid)[1], "pg2": max(proc_stats(pg1.pid)[1], proc_stats(pg2.pid)[1])}
    finally:
        for p in procs:
            stop(p)
    lite_c, one, two = combine(rows["sqlite"]), combine(rows["pg1"]), combine(rows["pg2"])
    r1 = [b[1]["per_s"] / a[1]["per_s"] for a, b in zip(rows["sqlite"], rows["pg1"]) if a[1]["per_s"]]
    r2 = [b[1]["per_s"] / a[1]["per_s"] for a, b in zip(rows["sqlite"], rows["pg2"]) if a[1]["per_s"]]
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else 0
    commits = sum(d[0] for d in db)
    written = sum(d[1] for d in db)
    msgs = sum(d[2] for d in db)
    secs = sum(d[3] for d in db)
    print(f"\nstores, mix `one` (one message per event), 100 rules, concurrency {args.concurrency}, {args.rounds} alternating rounds of {seg:.0f} s each; latencies are the median round's\n")
    print("| | SQLite (one engine) | PostgreSQL, one replica | PostgreSQL, two replicas |")
    print("|---|---|---|---|")
    print(f"| delivered messages/s | {lite_c['per_s']:,.0f} | {one['per_s']:,.0f} | {two['per_s']:,.0f} |")
    print(f"| vs SQLite, median round | 1.00 | {med(r1):.2f} (rounds: {', '.join(f'{x:.2f}' for x in r1)}) | {med(r2):.2f} (rounds: {', '.join(f'{x:.2f}' for x in r2)}) |")
    print(f"| messages delivered / expected | {lite_c['messages']:,} / {lite_c['expected']:,} (dup {lite_c['duplicates']}) | {one['messages']:,} / {one['expected']:,} (dup {one['duplicates']}) | {two['messages']:,} / {two['expected']:,} (dup {two['duplicates']}) |")
    lat = lambda x: f"{x['latency_ms']['p50']:.2f} / {x['latency_ms']['p99']:.2f} ms"
    print(f"| ingest latency p50 / p99 | {lat(lite_c)} | {lat(one)} | {lat(two)} |")
    print(f"| engine CPU seconds per 1,000 events | {lite_c['cpu_per_1k']:.3f} | {one['cpu_per_1k']:.3f} | {two['cpu_per_1k']:.3f} (both) |")
    print(f"| peak RSS | {rss['sqlite']:.0f} MB | {rss['pg1']:.0f} MB | {rss['pg2']:.0f} MB (the larger) |")
    fmt_q = lambda qs: " / ".join("-" if v is None else (f"≤ {v * 1000:.0f} ms" if v != float('inf') else "> 30 s") for v in qs.values())
    print(f"| at-least-once window (Slack answered → outcome committed) mean; p50 / p99 bucket | {lite_win[1] / max(lite_win[0], 1) * 1000:.2f} ms; {fmt_q(lite_quant)} | {win[1] / max(win[0], 1) * 1000:.2f} ms; {fmt_q(quant)} | |")
    print(f"\nthe database's cost (one replica): {commits / secs:,.0f} commits/s, {commits / max(msgs, 1):.2f} commits and {written / max(msgs, 1):.2f} rows written per delivered message (pg_stat_database)")


MIX_TEXT = {
    "default": "70% no match / 20% one rule / 10% three rules; the floor forwards one message per event",
    "one": "every event matches one rule (one message per event); the floor forwards one",
    "three": "every event matches three rules (three messages per event); the floor forwards three",
}


def report(args, results, rss0):
    """One Markdown table per mix: the floor against switchyard."""
    lat = lambda x: f"{x['latency_ms']['p50']:.2f} / {x['latency_ms']['p99']:.2f} / {x['latency_ms']['p999']:.2f} ms"
    for mix, fl, sy, ratios, floor_hwm, hwm in results:
        delivered_ratio = sy["per_s"] / fl["per_s"] if fl["per_s"] else 0
        med = sorted(ratios)[len(ratios) // 2] if ratios else 0
        rows = [
            ("accepted events/s", f"{fl['accepted_per_s']:,.0f}", f"{sy['accepted_per_s']:,.0f}"),
            ("delivered messages/s", f"{fl['per_s']:,.0f}", f"{sy['per_s']:,.0f}"),
            ("messages delivered / expected", f"{fl['messages']:,} / {fl['expected']:,}", f"{sy['messages']:,} / {sy['expected']:,} (duplicates {sy['duplicates']})"),
            ("ingest latency p50 / p99 / p99.9", lat(fl), lat(sy)),
            ("end-to-end (sent → delivered) p50 / p99", f"{fl['e2e_ms']['p50']:.1f} / {fl['e2e_ms']['p99']:.1f} ms", f"{sy['e2e_ms']['p50']:.1f} / {sy['e2e_ms']['p99']:.1f} ms"),
            ("peak RSS (so far)", f"{floor_hwm:.0f} MB", f"{hwm:.0f} MB (at start {rss0:.0f} MB)"),
            ("CPU seconds per 1,000 events", f"{fl['cpu_per_1k']:.3f}", f"{sy['cpu_per_1k']:.3f}"),
            ("throughput vs the floor (delivered messages)", "1.00", f"{delivered_ratio:.2f}; median round {med:.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})"),
            ("throughput vs the floor (accepted events)", "1.00", f"{sy['accepted_per_s'] / fl['accepted_per_s']:.2f}" if fl["accepted_per_s"] else "-"),
        ]
        print(f"\nmix `{mix}`: {MIX_TEXT.get(mix, mix)}. Concurrency {args.concurrency}, {args.rounds} alternating rounds of "
              f"{args.seconds / args.rounds:.0f} s per side; latencies are the median round's\n")
        print("| | floor | switchyard (100 rules, verify, durable outbox) |")
        print("|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating floor/switchyard rounds (the time is split)")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--profile", default="release", help="cargo profile to build and measure (`dist`: the deployment build)")
    ap.add_argument("--binary", help="the switchyard binary to measure (default: the build's); for A/B runs against another commit")
    ap.add_argument("--mixes", default="default,one,three", help="event mixes to compare with the floor, in order")
    ap.add_argument("--only-mixes", action="store_true", help="skip the fixed-rate and reload parts")
    ap.add_argument("--guide", action="store_true", help="also measure the guide's FastAPI listener (mix one)")
    ap.add_argument("--store", help="a postgres:// URL: measure SQLite against one and two PostgreSQL replicas (only that)")
    args = ap.parse_args()
    global BIN
    BIN = os.path.join(TARGET, args.profile)
    if not args.skip_build:
        print(f"building ({args.profile})…", file=sys.stderr)
        build(args.profile)
    tmp = tempfile.mkdtemp(prefix="switchyard-bench-")
    sink_p = start([os.path.join(BIN, "sink")])
    sink = first_line(sink_p)
    procs = [sink_p]
    if args.store:
        try:
            store_bench(args, tmp, sink)
        finally:
            stop(sink_p)
            shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        # (a) the floor and (b) switchyard, in alternating rounds: this VM's speed drifts by 10% and
        # more within minutes, and alternating gives both sides the same share of the drift.
        floor_p = start([os.path.join(BIN, "floor"), "--sink", f"http://{sink}/hook"])
        procs.append(floor_p)
        floor = first_line(floor_p)
        kind_p = start([os.path.join(BIN, "floor"), "--sink", f"http://{sink}/hook", "--per-kind"])
        procs.append(kind_p)
        kind_floor = first_line(kind_p)
        p, port, _ = engine(tmp, 100, sink, "main", binary=args.binary)
        procs.append(p)
        rss0 = proc_stats(p.pid)[2]
        seg = args.seconds / args.rounds
        seq = 10_000_000
        results = []
        for mix in args.mixes.split(","):
            fp, furl = (floor_p, floor) if mix == "default" else (kind_p, kind_floor)
            floor_runs, sy_runs, ratios = [], [], []
            for r in range(args.rounds):
                print(f"mix {mix}, round {r + 1} of {args.rounds}: floor, then switchyard (100 rules, durable outbox)…", file=sys.stderr)
                f = segment(sink, fp.pid, f"http://{furl}/hooks/port", seg, args.concurrency, unsigned=True, start_seq=seq, mix=mix, per_event=mix == "default")
                e = segment(sink, p.pid, f"http://127.0.0.1:{port}/hooks/port", seg, args.concurrency, start_seq=seq, mix=mix)
                seq = e[0]["next_seq"]
                floor_runs.append(f)
                sy_runs.append(e)
                ratios.append(e[1]["per_s"] / f[1]["per_s"] if f[1]["per_s"] else 0)
            results.append((mix, combine(floor_runs, one_per_event=mix == "default"), combine(sy_runs), ratios,
                            proc_stats(fp.pid)[1], proc_stats(p.pid)[1]))
        if args.guide:
            guide_rows = guide(args, tmp, sink, p.pid, port, seg, seq)
        stop(floor_p)
        stop(kind_p)
        stop(p)
        if args.only_mixes:
            report(args, results, rss0)
            if args.guide:
                print_guide(args, guide_rows)
            return

        # (c) fixed rate 5,000/s for the latency target
        print("switchyard at 5,000 events/s…", file=sys.stderr)
        http_json(f"http://{sink}/reset", data=b"", method="POST")
        p, port, _ = engine(tmp, 100, sink, "rate", binary=args.binary)
        rate_lg = loadgen(f"http://127.0.0.1:{port}/hooks/port", 10, rate=5000, start_seq=20_000_000)
        rate_s = wait_delivered(sink, rate_lg["expected_messages"])
        stop(p)

        # (d) reload 1,000 rules under load
        print("reload of 1,000 rules under load…", file=sys.stderr)
        http_json(f"http://{sink}/reset", data=b"", method="POST")
        p, port, rules = engine(tmp, 1000, sink, "reload", binary=args.binary)
        lg_proc = subprocess.Popen(
            [os.path.join(BIN, "loadgen"), "--url", f"http://127.0.0.1:{port}/hooks/port", "--secret", SECRET, "--duration", "8", "--rate", "2000", "--start-seq", "30000000"],
            stdout=subprocess.PIPE, text=True,
        )
        time.sleep(3)
        reloads = []
        for _ in range(3):
            r = http_json(f"http://127.0.0.1:{port}/-/reload", data=b"", method="POST", headers={"Authorization": "Bearer bench-admin"})
            st = http_json(f"http://127.0.0.1:{port}/status")
            reloads.append(st["reload"]["duration_ms"])
            assert r["ok"], r
            time.sleep(0.5)
        reload_lg = json.loads(lg_proc.communicate()[0])
        stop(p)
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)

    report(args, results, rss0)
    if args.guide:
        print_guide(args, guide_rows)
    print(f"\nat a fixed 5,000 events/s: accepted {rate_lg['accepted_per_s']:,.0f}/s, ingest p50 / p99 / p99.9 = "
          f"{rate_lg['latency_us']['p50']/1000:.2f} / {rate_lg['latency_us']['p99']/1000:.2f} / {rate_lg['latency_us']['p999']/1000:.2f} ms, "
          f"delivered {rate_s['messages']:,} of {rate_lg['expected_messages']:,}, failed requests {rate_lg['failed']}")
    print(f"reload of 1,000 rules under 2,000 events/s: swap took {', '.join(f'{x:.0f}' for x in reloads)} ms; "
          f"failed requests during the run: {reload_lg['failed']} of {reload_lg['accepted'] + reload_lg['failed']}")


if __name__ == "__main__":
    main()
