#!/usr/bin/env python3
"""Tables of the post-copy benchmark of issue 15 from the JSON of both engines.

Usage: bench/migration/postcopy_table.py FILE.json...

Each file is either `migration-bench --postcopy ... --json` output (a list of runs) or
`bench/qemu/migrate.py --postcopy --json` output ({"meta": ..., "results": [...]}).
Prints, per row and engine: medians and min-max over the runs of the time until the destination runs,
total time, downtime and wire bytes, and the guest's stalls (memstress stall lines, accesses of 20 us or
more) in the post-copy window (the destination's stall lines up to and including the first printed after
post-copy ended), pooled over the runs: p50 and p99 as the half-octave bucket they fall in, and the max.
The same for the baseline (the 3 s before each migration) and for the source during pre-copy.
"""

import json
import re
import statistics
import sys

ROWS = {"dirty800": "dirty-800", "hot2g": "hot-2g"}
STALLS_RE = re.compile(r"stalls=(\S+) max_stall_us=(\d+) stall_total_us=(\d+)")
TICKS_RE = re.compile(r"ticks=(\d+)")


def bucket_high(low):
    """Upper bound of the half-octave bucket with lower bound `low` (1, 2, 3, 4, 6, 8, 12, ...)."""
    if low < 2:
        return 2
    k = low.bit_length() - 1
    return (3 << k) >> 1 if low == 1 << k else 1 << (k + 1)


def parse(lines):
    """(histogram {low: count}, max us, total us, lines, guest ticks covered) of stall lines."""
    hist, mx, total = {}, 0, 0
    ticks = [int(TICKS_RE.search(l)[1]) for l in lines if TICKS_RE.search(l)]
    for line in lines:
        m = STALLS_RE.search(line)
        if not m:
            continue
        if m[1] != "none":
            for pair in m[1].split(","):
                low, count = pair.split(":")
                hist[int(low)] = hist.get(int(low), 0) + int(count)
        mx = max(mx, int(m[2]))
        total += int(m[3])
    return hist, mx, total, len(lines), (ticks[-1] - ticks[0] + 10) if ticks else 0


def percentile(hist, q):
    n = sum(hist.values())
    if not n:
        return None
    need, seen = q * n, 0
    for low in sorted(hist):
        seen += hist[low]
        if seen >= need:
            return low
    return max(hist)


def fmt_bucket(low):
    return "-" if low is None else f"{low}–{bucket_high(low)}"


def fmt_us(us):
    return f"{us / 1000:.1f} ms" if us >= 1000 else f"{us} µs"


def fmt_num(v):
    return "-" if v is None else f"{v:.0f}"


def summary(values, f="{:.3f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return f.format(med)
    return f"{f.format(med)} ({f.format(min(values))}–{f.format(max(values))})"


def normalise(path):
    with open(path) as f:
        doc = json.load(f)
    out = []
    m = re.search(r"-r(\d+)\.json$", path)
    round_no = int(m[1]) if m else None
    if isinstance(doc, list):
        for r in doc:
            pc = (r.get("sender") or {}).get("postCopy") or {}
            out.append({
                "engine": "migrated" + ("" if r.get("mode", "postcopy") == "postcopy" else " (pre-copy)"),
                "row": r["row"], "ok": r["succeeded"] and r["destinationVerified"],
                "until": r.get("secondsUntilDestinationRuns"), "total": r.get("totalSeconds"),
                "downtime": (r["downtimeSeconds"] * 1000) if r.get("downtimeSeconds") is not None else None,
                "wire": r["wireBytes"] / 1e6 if r.get("wireBytes") is not None else None,
                "missing": pc.get("missingPages"), "requested": pc.get("requestedPages"), "requests": pc.get("requests"),
                "postcopy_s": pc.get("seconds"), "cpu": r.get("cpuSeconds"),
                "baseline": r["baselineLines"], "precopy": r["sourceLinesDuring"],
                "postcopy": r["destinationLinesDuringPostCopy"], "after": r["destinationLinesAfter"],
                "load": r.get("loadavgStart"), "round": round_no,
            })
    else:
        for r in doc["results"]:
            if r.get("mode") != "postcopy":
                continue
            tt = r.get("total_time_ms")
            out.append({
                "engine": "QEMU 7.2" + (" (preempt)" if "preempt" in r.get("config", "") else ""),
                "row": ROWS.get(r["scenario"], r["scenario"]),
                "ok": r["status"] == "completed" and r.get("guest") == "ok",
                "until": r.get("until_destination_runs_s"), "total": tt / 1000 if tt else None,
                "downtime": r.get("downtime_ms"),
                "wire": r["wire_bytes"] / 1e6 if r.get("wire_bytes") is not None else None,
                "missing": None, "requested": None, "requests": r.get("postcopy_requests"),
                "postcopy_s": (tt / 1000 - r["until_destination_runs_s"]) if tt and r.get("until_destination_runs_s") else None,
                "cpu": (r.get("cpu_src_s") or 0) + (r.get("cpu_dst_s") or 0),
                "baseline": r.get("baseline_lines", []), "precopy": r.get("source_lines_during", []),
                "postcopy": r.get("destination_lines_during_postcopy", []), "after": r.get("destination_lines_after", []),
                "load": r.get("loadavg_start"), "round": round_no,
            })
    return out


def main():
    runs = []
    for path in sorted(sys.argv[1:], key=lambda p: (re.sub(r"-r\d+\.json$", "", p),
                                                    int((re.search(r"-r(\d+)\.json$", p) or [0, 0])[1]))):
        runs += normalise(path)
    groups = {}
    for r in runs:
        groups.setdefault((r["row"], r["engine"]), []).append(r)

    print("| row | engine | runs ok | until the destination runs, s | total s | downtime ms | wire MB | "
          "pages missing at start | pages asked for / requests | post-copy s | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (row, engine), rs in sorted(groups.items()):
        req = "-"
        if any(r["requested"] is not None for r in rs):
            req = summary([r["requested"] for r in rs], "{:.0f}") + " / " + summary([r["requests"] for r in rs], "{:.0f}")
        elif any(r["requests"] is not None for r in rs):
            req = "? / " + summary([r["requests"] for r in rs], "{:.0f}")
        print(f"| {row} | {engine} | {sum(r['ok'] for r in rs)}/{len(rs)} | {summary([r['until'] for r in rs])} | "
              f"{summary([r['total'] for r in rs])} | {summary([r['downtime'] for r in rs], '{:.0f}')} | "
              f"{summary([r['wire'] for r in rs], '{:.0f}')} | {summary([r['missing'] for r in rs], '{:.0f}')} | {req} | "
              f"{summary([r['postcopy_s'] for r in rs])} | {summary([r['cpu'] for r in rs], '{:.2f}')} |")

    print()
    print("Guest stalls (accesses of 20 µs or more), pooled over the runs. p50/p99: the half-octave bucket, µs.")
    print()
    print("| row | engine | window | stall lines (guest ticks) per run | stalls per run | stalled ms per run | "
          "p50 µs | p99 µs | max per run |")
    print("|---|---|---|---|---|---|---|---|---|")
    hists = {}
    for (row, engine), rs in sorted(groups.items()):
        for window in ("baseline", "precopy", "postcopy"):
            parsed = [parse(r[window]) for r in rs]
            pooled = {}
            for h, *_ in parsed:
                for k, v in h.items():
                    pooled[k] = pooled.get(k, 0) + v
            hists[(row, engine, window)] = pooled
            name = {"baseline": "3 s before", "precopy": "source, during pre-copy",
                    "postcopy": "destination, post-copy"}[window]
            print(f"| {row} | {engine} | {name} | {summary([p[3] for p in parsed], '{:.0f}')} "
                  f"({summary([p[4] for p in parsed], '{:.0f}')}) | {summary([sum(p[0].values()) for p in parsed], '{:.0f}')} | "
                  f"{summary([p[2] / 1000 for p in parsed], '{:.0f}')} | {fmt_bucket(percentile(pooled, 0.5))} | "
                  f"{fmt_bucket(percentile(pooled, 0.99))} | {summary([p[1] / 1000 for p in parsed], '{:.1f}')} ms |")

    print()
    print("Histograms of the post-copy window (destination), stalls per bucket pooled over the runs; "
          "the baseline (3 s before each migration) in brackets.")
    print()
    lows = sorted({k for (_, _, w), h in hists.items() if w in ("postcopy", "baseline") for k in h})
    print("| row | engine | " + " | ".join(f"≥{fmt_us(l)}" for l in lows) + " |")
    print("|---|---|" + "---|" * len(lows))
    for (row, engine), rs in sorted(groups.items()):
        h, b = hists[(row, engine, "postcopy")], hists[(row, engine, "baseline")]
        print(f"| {row} | {engine} | " + " | ".join(f"{h.get(l, 0)} ({b.get(l, 0)})" for l in lows) + " |")
    print()
    print("Per run: the downtime and the longest access the guest timed in the post-copy window (the guest's TSC may or "
          "may not run through the pause), and that window's accesses of 1 ms or more without the longest.")
    print()
    print("| row | engine | round | downtime ms | longest access ms | other accesses ≥ 1 ms | requests |")
    print("|---|---|---|---|---|---|---|")
    for (row, engine), rs in sorted(groups.items()):
        for i, r in enumerate(rs):
            h, mx, *_ = parse(r["postcopy"])
            slow = sum(c for low, c in h.items() if low >= 1024) - (1 if mx >= 1024 else 0)
            print(f"| {row} | {engine} | {r['round'] or i + 1} | {fmt_num(r['downtime'])} | {mx / 1000:.1f} | {slow} | "
                  f"{fmt_num(r['requests'])} |")
    loads = [float(r["load"][0]) for r in runs if r.get("load")]
    if loads:
        print(f"\nLoad average (1 min) at the start of the runs: {min(loads):.1f}–{max(loads):.1f}.")


if __name__ == "__main__":
    main()
