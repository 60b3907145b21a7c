#!/usr/bin/env python3
"""Snapshot benchmark, migrated and QEMU side by side in one session (issue 16).

Runs snapshot-bench and bench/qemu/snapshot.py one after the other, --rounds times, alternating, each with
--repeat 1, so that both engines see the same machine load; keeps every run's JSON in --out, and prints each
compared row as the median over the rounds with (min-max). Times are wall seconds; "before fsync" is a
save's time to the page cache (QEMU's `total-time`; migrated's total less its fsync), and the fsync is shown
apart, as issue 16 item 3 asks.

  swift build -c release --scratch-path .build-bench --product snapshot-bench
  bench/snapshot/side_by_side.py --rounds 3 --out bench/snapshot/results/side-by-side-DATE
  bench/snapshot/side_by_side.py --out DIR --report-only     # the table again from the JSON files

With --baseline PATH (a snapshot-bench built from an older commit), that binary runs too, before the current
one in every round, and the table gets a column for it: an A/B of a change with QEMU as the yardstick.
"""

import argparse
import glob
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# (label, migrated row, migrated metric, QEMU row, QEMU metric); metric "before fsync s" is derived.
COMPARED = [
    ("paused save, plain: s before fsync", ("save", "full plain, paused"), "before fsync s", ("save", "exec:cat, paused"), "seconds"),
    ("paused save, plain: fsync s", ("save", "full plain, paused"), "fsync s", ("save", "exec:cat, paused"), "fsync s"),
    ("live save, plain: s before fsync", ("save", "full plain, live"), "before fsync s", ("save", "exec:cat, live"), "seconds"),
    ("live save, plain: fsync s", ("save", "full plain, live"), "fsync s", ("save", "exec:cat, live"), "fsync s"),
    ("live save, zstd (QEMU: `exec:zstd -3`): s", ("save", "full zstd, live"), "seconds", ("save", "exec:zstd -3, live"), "seconds"),
    ("live save, zstd: file MB", ("save", "full zstd, live"), "file MB", ("save", "exec:zstd -3, live"), "file MB"),
    ("live save, zstd: pause / downtime ms", ("save", "full zstd, live"), "pause ms", ("save", "exec:zstd -3, live"), "downtime ms"),
    ("eager restore, plain, warm cache: s", ("eager restore", "plain, warm cache"), "seconds", ("load", "-incoming defer + migrate-incoming plain, warm cache"), "seconds"),
    ("eager restore, plain, cold cache: s", ("eager restore", "plain, cold cache"), "seconds", ("load", "-incoming defer + migrate-incoming plain, cold cache"), "seconds"),
    ("eager restore, zstd, warm cache: s", ("eager restore", "zstd, warm cache"), "seconds", ("load", "-incoming zstd, warm cache"), "seconds"),
    ("lazy restore, zstd, warm: first instruction ms", ("lazy restore", "zstd, warm cache"), "first instruction ms", None, None),
]


def samples(runs, key, metric):
    values = []
    for run in runs:
        for row in run["rows"]:
            if (row["group"], row["name"]) != key:
                continue
            m = row["metrics"]
            if metric == "before fsync s" and "seconds" in m and "fsync s" in m:
                values += [s - f for s, f in zip(m["seconds"]["samples"], m["fsync s"]["samples"])]
            elif metric == "file MB" and "file bytes" in m:
                values += [v / 1e6 for v in m["file bytes"]["samples"]]
            elif metric in m:
                values += m[metric]["samples"]
    return values


def spread(values, fmt):
    if not values:
        return "-"
    v = sorted(values)
    n = len(v)
    med = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
    return fmt.format(med) if n == 1 else f"{fmt.format(med)} ({fmt.format(v[0])}–{fmt.format(v[-1])})"


def report(out):
    def load(engine):
        return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, f"{engine}-*.json")))]
    ours, before, qemu = load("migrated"), load("baseline"), load("qemu")
    loads = [r["meta"].get("loadavg_start", "?") for r in ours]
    print(f"\n{len(ours)} rounds of migrated, {len(before)} of the baseline and {len(qemu)} of QEMU, alternating; "
          f"loadavg at the start of migrated's runs: {'; '.join(loads)}\n")
    print("| row | migrated |" + (" migrated, baseline |" if before else "") + " QEMU 7.2 |")
    print("|---|---|" + ("---|" if before else "") + "---|")
    for label, mine, my_metric, theirs, their_metric in COMPARED:
        fmt = "{:.0f}" if "MB" in label else "{:.1f}" if "ms" in label else "{:.3f}"
        q = spread(samples(qemu, theirs, their_metric), fmt) if theirs else "none"
        b = f" {spread(samples(before, mine, my_metric), fmt)} |" if before else ""
        print(f"| {label} | {spread(samples(ours, mine, my_metric), fmt)} |{b} {q} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True, help="directory for the JSON of every run")
    ap.add_argument("--pattern", default="text", choices=["text", "random", "mixed"])
    ap.add_argument("--rows", default="paused-plain,live-plain,live-zstd,eager,lazy", help="snapshot-bench --rows")
    ap.add_argument("--baseline", help="another snapshot-bench binary to run in every round (an A/B)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not args.report_only:
        bench = os.path.join(ROOT, ".build-bench", "release", "snapshot-bench")
        ours = ["--repeat", "1", "--skip-diff", "--rows", args.rows, "--pattern", args.pattern]
        engines = [("baseline", [args.baseline] + ours)] if args.baseline else []
        engines += [("migrated", [bench] + ours),
                    ("qemu", [sys.executable, os.path.join(ROOT, "bench", "qemu", "snapshot.py"), "--repeat", "1", "--pattern", args.pattern])]
        for i in range(1, args.rounds + 1):
            for engine, command in engines:
                path = os.path.join(args.out, f"{engine}-{i}.json")
                print(f"round {i}/{args.rounds}: {engine}", flush=True)
                subprocess.run(command + ["--json", path], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    report(args.out)


if __name__ == "__main__":
    main()
