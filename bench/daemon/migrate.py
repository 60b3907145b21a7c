#!/usr/bin/env python3
"""Live migration through two `migrated` daemons over loopback (issue 4).

Starts a source and a destination daemon, boots the test guest
(guest/build/guest.elf, memstress) on the source with `migratectl vm start`,
waits until it has written its working set, migrates it with
`migratectl migrate --json` and reports, per scenario and configuration:
total time, downtime, bytes on the wire, throughput and CPU seconds of both
daemons. The scenarios are those of bench/qemu/migrate.py (imported), so the
two scripts can be run one after the other and compared row by row.

Configurations (--configs, comma-separated):
  tls-lz4-2ch       mutual TLS 1.3, lz4, 2 channels         (default)
  tls-adaptive-2ch  mutual TLS 1.3, adaptive, 2 channels    (default)
  tls-zstd-2ch      mutual TLS 1.3, zstd, 2 channels
  tcp-lz4-2ch       plaintext (asked for by name), lz4, 2 channels
  tcp-none-1ch      plaintext, uncompressed, 1 channel: QEMU default's shape
  tls-none-2ch      mutual TLS 1.3, uncompressed, 2 channels

Usage: bench/daemon/migrate.py [--repeat N] [--configs a,b] [--json out.json] [--perf DIR] [--dry-run-first] [scenario ...]
       bench/daemon/migrate.py --table daemon.json [qemu.json]   (markdown tables only)
Standard library only. Needs root (private network namespace for exact
loopback byte counts, /dev/kvm), openssl, and the release builds of
migrated and migratectl (see --bin).
"""

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
ELF = os.path.join(REPO, "guest", "build", "guest.elf")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = 4096
NETNS_ENV = "DAEMON_MIGRATE_BENCH_NETNS"
DEFAULT_BIN = os.path.join(REPO, ".build-daemonbench", "release")

# The QEMU script's scenarios and helpers (it has no side effects on import). Loaded by path: its
# module name, "migrate", is also ours. No bytecode is written into bench/qemu.
sys.dont_write_bytecode = True
_spec = importlib.util.spec_from_file_location("qemu_migrate_bench",
                                               os.path.join(REPO, "bench", "qemu", "migrate.py"))
qemu_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qemu_bench)
SCENARIOS = qemu_bench.SCENARIOS      # name -> (guest RAM MiB, command line, working set MiB)
ALIASES = qemu_bench.ALIASES
STATUS_RE = qemu_bench.STATUS_RE
lo_bytes = qemu_bench.lo_bytes
set_pdeathsig = qemu_bench.set_pdeathsig
log = qemu_bench.log
sys.path.insert(0, os.path.join(REPO, "bench"))
from testhosts import UnixHTTPConnection, free_port, make_certificates  # noqa: E402  (bench/testhosts.py)

# name -> (security, compression, channels)
CONFIGS = {
    "tls-lz4-2ch": ("tls", "lz4", 2),
    "tls-adaptive-2ch": ("tls", "adaptive", 2),
    "tls-zstd-2ch": ("tls", "zstd", 2),
    "tcp-lz4-2ch": ("plaintext", "lz4", 2),
    "tcp-none-1ch": ("plaintext", "none", 1),
    "tls-none-2ch": ("tls", "none", 2),
}
DEFAULT_CONFIGS = ["tls-lz4-2ch", "tls-adaptive-2ch"]


def parse_status(line):
    m = STATUS_RE.match(line or "")
    if not m:
        return None
    return {"t": int(m[1]), "gen": int(m[2]), "pages": int(m[3]), "ticks": int(m[4]), "verify": m[5]}


# --------------------------------------------------------------------------- control API
def api(sock, method, path, body=None):
    """(status, JSON document) of one request to a daemon's control socket."""
    conn = UnixHTTPConnection(sock)
    try:
        headers = {"Connection": "close"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if raw else None)
    finally:
        conn.close()


# --------------------------------------------------------------------------- CPU accounting
def _stat_fields(path):
    with open(path) as f:
        s = f.read()
    return s[s.rindex(")") + 2:].split()  # fields from 3 (state) on


def process_cpu(pid):
    """utime+stime of the whole process (live and exited threads), seconds."""
    f = _stat_fields(f"/proc/{pid}/stat")
    return (int(f[11]) + int(f[12])) / CLK_TCK


def thread_cpu(pid):
    """{tid: (utime+stime ticks, guest_time ticks)} of the live threads."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            f = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
            out[int(tid)] = (int(f[11]) + int(f[12]), int(f[40]))  # utime, stime; guest_time (field 43)
        except (OSError, IndexError, ValueError):
            pass
    return out


class CPUWatch:
    """CPU of one daemon over an interval, with its vCPU threads split out. A vCPU thread is one that has
    run guest code (guest_time > 0; migrated's threads carry no names). Threads are sampled while the
    migration runs, because the source's vCPU thread exits at switchover and takes its counters with it:
    its time after the last sample (at most one poll interval) is counted as the daemon's own."""

    def __init__(self, pid):
        self.pid = pid
        self.start_total = process_cpu(pid)
        self.first = thread_cpu(pid)
        self.last = dict(self.first)
        self.vcpu_tids = {t for t, (_, g) in self.first.items() if g > 0}
        self.end_total = None

    def sample(self):
        now = thread_cpu(self.pid)
        self.last.update(now)
        self.vcpu_tids |= {t for t, (_, g) in now.items() if g > 0}

    def stop(self):
        self.sample()
        self.end_total = process_cpu(self.pid)

    def result(self):
        total = self.end_total - self.start_total
        vcpu = sum(self.last[t][0] - self.first.get(t, (0, 0))[0] for t in self.vcpu_tids) / CLK_TCK
        return round(total, 3), round(vcpu, 3), round(total - vcpu, 3)


# --------------------------------------------------------------------------- certificates
class Daemon:
    def __init__(self, args, rundir, name, peer, certdir, listen=None, plaintext=False):
        self.name = name
        self.sock = os.path.join(rundir, f"{name}.sock")
        self.logpath = os.path.join(rundir, f"{name}.log")
        cmd = [os.path.join(args.bin, "migrated"), "--socket", self.sock, "--log-level", "warning",
               "--memory-budget", args.memory_budget, "--guest-memory", args.guest_memory,
               "--tls-certificate", os.path.join(certdir, f"{name}.pem"),
               "--tls-key", os.path.join(certdir, f"{name}.key"),
               "--tls-ca", os.path.join(certdir, "ca.pem"), "--allow-peer", peer]
        if listen:
            cmd += ["--incoming-listen", listen]
            if plaintext:
                cmd.append("--incoming-plaintext")
        err = open(self.logpath, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                     preexec_fn=set_pdeathsig)
        err.close()
        self.pid = self.proc.pid
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon {name} exited ({self.proc.returncode}): {self.log_tail()}")
            if os.path.exists(self.sock):
                try:
                    if api(self.sock, "GET", "/vms")[0] == 200:
                        break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon {name} did not come up: {self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, n=600):
        try:
            with open(self.logpath, "rb") as f:
                return f.read().decode("utf-8", "replace")[-n:]
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # stops its VMs, removes the socket
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Run:
    def __init__(self, args, tmp, certdir, scenario, config, rep):
        self.args, self.certdir, self.scenario, self.config, self.rep = args, certdir, scenario, config, rep
        self.dir = os.path.join(tmp, f"{scenario}-{config}-{rep}")
        os.makedirs(self.dir)
        self.daemons = []
        self.children = []

    def ctl(self, sock, *argv, check=True, timeout=60):
        cmd = [os.path.join(self.args.bin, "migratectl"), *argv, "--socket", sock, "--json"]
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"migratectl {' '.join(argv[:2])} failed ({r.returncode}): "
                               f"{(r.stderr or r.stdout).strip()[-400:]}")
        return json.loads(r.stdout) if r.stdout.strip() else None

    def start_profilers(self, src, dst):
        """With --perf DIR: `perf record` on each daemon for the migration alone (setup to the destination
        running), so that a profile shows where each side spends its CPU without the guest's fill."""
        if not self.args.perf:
            return []
        os.makedirs(self.args.perf, exist_ok=True)
        profilers = []
        for side, daemon in (("src", src), ("dst", dst)):
            out = os.path.join(self.args.perf, f"{self.scenario}-{self.config}-{self.rep}-{side}.data")
            p = subprocess.Popen(["perf", "record", "-q", "-g", "-F", "1999", "-p", str(daemon.pid), "-o", out],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.children.append(p)
            profilers.append(p)
        time.sleep(0.5)  # perf needs a moment to attach to every thread
        return profilers

    def stop_profilers(self, profilers):
        for p in profilers:
            p.send_signal(signal.SIGINT)
        for p in profilers:
            p.wait(timeout=60)

    def cleanup(self):
        for p in self.children:
            if p.poll() is None:
                p.kill()
                p.wait()
        for d in self.daemons:
            d.stop()

    def execute(self):
        mem, cmdline, ws_mib = SCENARIOS[self.scenario]
        security, compression, channels = CONFIGS[self.config]
        res = {"scenario": self.scenario, "config": self.config, "repeat": self.rep,
               "guest_mem_mib": mem, "cmdline": cmdline, "security": security,
               "compression": compression, "channels": channels, "status": "error"}
        port = free_port()
        src = Daemon(self.args, self.dir, "host-a", "host-b", self.certdir)
        self.daemons.append(src)
        dst = Daemon(self.args, self.dir, "host-b", "host-a", self.certdir,
                     listen=f"127.0.0.1:{port}", plaintext=security == "plaintext")
        self.daemons.append(dst)
        vm = "bench"

        t_boot = time.monotonic()
        self.ctl(src.sock, "vm", "start", "--id", vm, "--image", ELF, "--memory", f"{mem}M",
                 "--cmdline", cmdline)
        want = ws_mib * 256
        while True:
            st, doc = api(src.sock, "GET", f"/vms/{vm}")
            line = parse_status((doc or {}).get("last_console_line"))
            if doc and doc.get("state") != "running":
                raise RuntimeError(f"source VM is {doc.get('state')}: {doc.get('stop_reason')}")
            if line and line["pages"] >= want and line["verify"] == "ok":
                break
            if line and line["verify"] != "ok":
                raise RuntimeError(f"source guest reports {doc.get('last_console_line')!r}")
            if time.monotonic() - t_boot > self.args.fill_timeout:
                raise RuntimeError(f"guest did not fill {want} pages in {self.args.fill_timeout}s "
                                   f"(last line {doc.get('last_console_line')!r})")
            time.sleep(0.05)
        res["fill_s"] = round(time.monotonic() - t_boot, 2)

        if self.args.dry_run_first:
            # The dry run's prediction (issue 16 item 6), with the migration's own options, just before it.
            dry = ["migrate", vm, "--to", f"127.0.0.1:{port}", "--channels", str(channels),
                   "--compression", compression, "--dry-run"] + (["--plaintext"] if security == "plaintext" else [])
            prediction = self.ctl(src.sock, *dry)
            res["prediction"] = prediction
            res["pred_converges"] = prediction.get("converges")
            res["pred_total_s"] = prediction.get("total_seconds")
            res["pred_downtime_ms"] = prediction.get("downtime_ms")

        argv = [os.path.join(self.args.bin, "migratectl"), "migrate", vm,
                "--to", f"127.0.0.1:{port}", "--channels", str(channels),
                "--compression", compression, "--interval", str(self.args.poll),
                "--socket", src.sock, "--json"]
        if security == "plaintext":
            argv.append("--plaintext")
        res["migratectl"] = " ".join(argv[1:])

        cpu_src, cpu_dst = CPUWatch(src.pid), CPUWatch(dst.pid)
        profilers = self.start_profilers(src, dst)
        lo0 = lo_bytes()
        t0 = time.monotonic()
        out = open(os.path.join(self.dir, "migrate.out"), "w+")
        mp = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.children.append(mp)
        cancelled = False
        while mp.poll() is None:
            cpu_src.sample()
            cpu_dst.sample()
            if not cancelled and time.monotonic() - t0 > self.args.timeout:
                cancelled = True
                self.ctl(src.sock, "migration", "cancel", vm, check=False)
            if time.monotonic() - t0 > self.args.timeout + 60:
                raise RuntimeError("migratectl migrate did not return after the cancel")
            time.sleep(self.args.poll)
        t_end = time.monotonic()
        cpu_src.stop()
        out.seek(0)
        text = out.read()
        out.close()
        try:
            status = json.loads(text)
        except ValueError:
            raise RuntimeError(f"migratectl migrate ({mp.returncode}): {text.strip()[-500:]}")
        report = status.get("report") or {}
        res["phase"] = status.get("phase")

        # Destination: until it runs the guest.
        dst_doc = None
        if status.get("phase") == "completed":
            deadline = time.monotonic() + 20
            while True:
                cpu_dst.sample()
                st, dst_doc = api(dst.sock, "GET", f"/vms/{vm}")
                if st == 200 and dst_doc.get("state") == "running":
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"destination VM not running after the migration: {dst_doc}")
                time.sleep(0.01)
        cpu_dst.stop()
        lo1 = lo_bytes()
        self.stop_profilers(profilers)

        res["status"] = ("completed" if status.get("phase") == "completed" else
                         "not converged" if cancelled else f"failed ({status.get('phase')})")
        if report.get("error"):
            res["error"] = report["error"]
        res["wall_s"] = round(t_end - t0, 3)
        res["total_s"] = report.get("total_seconds")
        res["setup_s"] = report.get("setup_seconds")
        res["downtime_ms"] = report.get("downtime_ms")
        res["report_wire_bytes"] = report.get("wire_bytes")
        res["wire_bytes"] = (lo1 - lo0) if lo0 is not None and lo1 is not None else None
        passes = report.get("passes") or []
        res["passes"] = len(passes)
        res["pages_sent"] = report.get("pages_sent")
        # Guest memory carried: pages sent with content (zero pages are a descriptor), as QEMU's ram.normal.
        payload_pages = sum(p.get("pages_sent", 0) - p.get("zero_pages", 0) for p in passes)
        res["page_payload_bytes"] = payload_pages * PAGE
        res["max_throttle"] = max((p.get("throttle", 0) for p in passes), default=0)
        tt = res["total_s"] or res["wall_s"]
        wb = res["wire_bytes"] if res["wire_bytes"] is not None else res["report_wire_bytes"]
        res["wire_GBps"] = round(wb / tt / 1e9, 3) if wb and tt else None
        res["payload_GBps"] = round(res["page_payload_bytes"] / tt / 1e9, 3) if tt else None
        (res["cpu_src_s"], res["cpu_src_vcpu_s"], res["cpu_src_excl_vcpu_s"]) = cpu_src.result()
        (res["cpu_dst_s"], res["cpu_dst_vcpu_s"], res["cpu_dst_excl_vcpu_s"]) = cpu_dst.result()
        res["report"] = report

        src_doc = self.ctl(src.sock, "vm", "show", vm, check=False)
        res["source_state"] = (src_doc or {}).get("state")
        if res["status"] == "completed":
            res["guest"] = self.check_guest(dst, vm, src_doc or {})
            if res["source_state"] != "migrated":
                res["guest"] = f"FAILED: source VM is {res['source_state']!r}, not 'migrated'"
            if not res["guest"].startswith("ok"):
                res["status"] = "completed, guest check failed"
        else:
            time.sleep(1.5)
            doc = api(src.sock, "GET", f"/vms/{vm}")[1] or {}
            line = parse_status(doc.get("last_console_line"))
            ok = doc.get("state") == "running" and line and line["verify"] == "ok"
            res["guest"] = ("source still running, verify=ok" if ok
                            else f"source NOT healthy: {doc.get('state')} {doc.get('last_console_line')!r}")
        res["src_last_line"] = (src_doc or {}).get("last_console_line")
        res["dst_last_line"] = (dst_doc or {}).get("last_console_line")
        return res

    def check_guest(self, dst, vm, src_doc):
        """The guest carries on at the destination: fresh status lines (ticks beyond the source's last),
        all verify=ok. Only the last console line is visible through the API, so it is polled."""
        src_line = parse_status(src_doc.get("last_console_line"))
        src_ticks = src_line["ticks"] if src_line else 0
        seen = []
        deadline = time.monotonic() + 10
        while True:
            st, doc = api(dst.sock, "GET", f"/vms/{vm}")
            if st != 200 or doc.get("state") != "running":
                return f"FAILED: destination VM {doc}"
            raw = doc.get("last_console_line")
            line = parse_status(raw)
            if line and (not seen or seen[-1] != line):
                seen.append(line)
            if "FAIL" in (raw or ""):
                return f"FAILED on destination: {raw!r}"
            fresh = [l for l in seen if l["ticks"] > src_ticks]
            if len(fresh) >= 2 and all(l["verify"] == "ok" for l in seen):
                return (f"ok ({len(fresh)} fresh status lines verify=ok on destination, ticks "
                        f"{src_ticks} -> {fresh[-1]['ticks']}; source state migrated)")
            if time.monotonic() > deadline:
                return f"FAILED: no fresh verify=ok lines on destination (seen {seen})"
            time.sleep(0.1)


# --------------------------------------------------------------------------- summaries and tables
SUMMARY_KEYS = ["total_s", "downtime_ms", "wire_bytes", "report_wire_bytes", "wire_GBps", "payload_GBps",
                "cpu_src_s", "cpu_dst_s", "cpu_src_excl_vcpu_s", "cpu_dst_excl_vcpu_s", "passes",
                "max_throttle", "fill_s"]


def summarize(results):
    groups = {}
    for r in results:
        groups.setdefault((r["scenario"], r["config"]), []).append(r)
    out = []
    for (scenario, config), rs in groups.items():
        ok = [r for r in rs if r.get("status") == "completed"]
        s = {"scenario": scenario, "config": config, "runs": len(rs), "completed": len(ok),
             "statuses": [r.get("status") for r in rs]}
        # Figures come from the completed runs; when none completed (a migration that did not converge),
        # from all of them, so that the time until it was cancelled still shows.
        for k in SUMMARY_KEYS:
            vals = [r[k] for r in (ok or rs) if r.get(k) is not None]
            if vals:
                s[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        out.append(s)
    return out


def fmt(v, f="{:.0f}"):
    return "-" if v is None else f.format(v)


def cell(s, key, f="{:.2f}", scale=1.0, spread=True):
    m = s.get(key)
    if not m:
        return "-"
    text = fmt(m["median"] * scale, f)
    if spread and s.get("completed", 1) > 1 and m["min"] != m["max"]:
        text += f" ({fmt(m['min'] * scale, f)}–{fmt(m['max'] * scale, f)})"
    return text


def qemu_summaries(qemu_doc):
    """bench/qemu/migrate.py's results, summarized as this script's are: keyed by (scenario, config)."""
    results = [dict(r, total_s=r["total_time_ms"] / 1000 if r.get("total_time_ms") is not None else None)
               for r in (qemu_doc or {}).get("results", [])]
    return {(s["scenario"], s["config"]): s for s in summarize(results)}


def tables(daemon_docs, qemu_doc=None):
    """Markdown, one table per scenario: each migrated configuration, then QEMU's rows from a
    bench/qemu/migrate.py JSON file; medians, with the min–max of the total and the downtime."""
    summaries = []
    for d in daemon_docs:
        summaries += d.get("summary") or summarize(d["results"])
    qemu = qemu_summaries(qemu_doc)
    scenarios = [s for s in SCENARIOS if any(x["scenario"] == s for x in summaries)]
    lines = prediction_table(daemon_docs)
    head = ["side / config", "runs ok", "total s", "downtime ms", "wire MB", "payload GB/s",
            "CPU s src / dst", "CPU s excl. vCPU src / dst", "passes", "QEMU time ÷ this (default / tls)"]
    for sc in scenarios:
        mem, cmdline, ws = SCENARIOS[sc]
        lines.append(f"**{sc}** ({mem} MiB guest, `{cmdline}`)")
        lines.append("")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        rows = [(f"migrated {s['config']}", s) for s in summaries if s["scenario"] == sc]
        rows += [(f"QEMU {c}", qemu[(sc, c)]) for c in ("default", "tls") if (sc, c) in qemu]
        for label, s in rows:
            ratio = ""
            if label.startswith("migrated") and s.get("total_s") and qemu_doc:
                mt = s["total_s"]["median"]
                parts = []
                for c in ("default", "tls"):
                    q = qemu.get((sc, c))
                    if not q or not q.get("total_s") or not mt:
                        parts.append("-")
                    else:
                        # A QEMU run that did not converge counts with the time until it was cancelled.
                        parts.append(("> " if not q["completed"] else "") + f"{q['total_s']['median'] / mt:.2f}")
                ratio = " / ".join(parts)
            ok = f"{s['completed']}/{s['runs']}"
            if s["completed"] < s["runs"]:
                bad = [x for x in s["statuses"] if x != "completed"]
                ok += " (" + ", ".join(sorted(set(str(b) for b in bad))) + ")"
            cpu = f"{cell(s, 'cpu_src_s', spread=False)} / {cell(s, 'cpu_dst_s', spread=False)}"
            cpux = (f"{cell(s, 'cpu_src_excl_vcpu_s', spread=False)} / "
                    f"{cell(s, 'cpu_dst_excl_vcpu_s', spread=False)}")
            lines.append("| " + " | ".join([
                label, ok, cell(s, "total_s", "{:.2f}"), cell(s, "downtime_ms", "{:.0f}"),
                cell(s, "wire_bytes", "{:.0f}", 1e-6, spread=False), cell(s, "payload_GBps", "{:.2f}", spread=False),
                cpu, cpux, cell(s, "passes", "{:.0f}", spread=False), ratio]) + " |")
        lines.append("")
    return "\n".join(lines)


def prediction_table(daemon_docs):
    """Markdown: each run with a dry run before it (--dry-run-first), its prediction against what the migration
    took, and how many runs fall within 25 %; empty when no run had one."""
    runs = [r for d in daemon_docs for r in d["results"] if r.get("pred_total_s") is not None]
    if not runs:
        return []

    def err(pred, actual):
        return None if pred is None or not actual else (pred - actual) / actual * 100

    lines = ["Dry run (`migratectl migrate --dry-run`) just before each migration, predicted against actual:", "",
             "| scenario | config | run | predicted passes | passes | predicted total s | total s | error | "
             "predicted downtime ms | downtime ms | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    within = {"total": 0, "downtime": 0}
    for r in runs:
        et, ed = err(r["pred_total_s"], r.get("total_s")), err(r.get("pred_downtime_ms"), r.get("downtime_ms"))
        within["total"] += et is not None and abs(et) <= 25
        within["downtime"] += ed is not None and abs(ed) <= 25
        pred_passes = len((r.get("prediction") or {}).get("passes") or []) + 1
        lines.append("| " + " | ".join([
            r["scenario"], r["config"], str(r["repeat"]), str(pred_passes), str(r.get("passes")),
            fmt(r["pred_total_s"], "{:.2f}"), fmt(r.get("total_s"), "{:.2f}"), fmt(et, "{:+.0f} %"),
            fmt(r.get("pred_downtime_ms")), fmt(r.get("downtime_ms")), fmt(ed, "{:+.0f} %")]) + " |")
    lines += ["", f"Within 25 %: total time {within['total']} of {len(runs)} runs, downtime {within['downtime']} of {len(runs)}.", ""]
    return lines


# --------------------------------------------------------------------------- main
def enter_netns():
    """Re-run inside a private network namespace, as bench/qemu/migrate.py does."""
    qemu_bench.enter_netns(__file__, NETNS_ENV)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("scenarios", nargs="*",
                    help="idle4g random1g text1g dirty50 dirty200 dirty800, or 1 2 3 4 (default: all)")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help=f"comma-separated, of {', '.join(CONFIGS)} (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per scenario and config (default 3)")
    ap.add_argument("--json", help="write all figures to this file")
    ap.add_argument("--table", nargs="+", metavar="JSON",
                    help="only print the markdown tables of earlier runs of this script, side by side "
                         "with one bench/qemu/migrate.py JSON file among them")
    ap.add_argument("--timeout", type=float, default=120,
                    help="cancel a migration after this many seconds (default 120)")
    ap.add_argument("--fill-timeout", type=float, default=120,
                    help="seconds to wait for the guest to fill its working set")
    ap.add_argument("--poll", type=float, default=0.05,
                    help="migratectl --interval and CPU sampling interval, s (default 0.05)")
    ap.add_argument("--bin", default=DEFAULT_BIN,
                    help="directory with migrated and migratectl (default: %(default)s)")
    ap.add_argument("--memory-budget", default="6G", help="each daemon's --memory-budget")
    ap.add_argument("--guest-memory", default="shared-memory", choices=["shared-memory", "huge-pages"],
                    help="each daemon's --guest-memory; huge-pages needs the source's and the destination's RAM "
                         "in /proc/sys/vm/nr_hugepages (2 MiB pages)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (daemon logs, certs)")
    ap.add_argument("--perf", metavar="DIR",
                    help="profile both daemons during each migration with perf record, into DIR "
                         "(timings are then not comparable with unprofiled runs)")
    ap.add_argument("--dry-run-first", action="store_true",
                    help="run `migratectl migrate --dry-run` before each migration and report its prediction against it")
    ap.add_argument("--note", help="free text stored in the JSON's meta (e.g. what the binaries were built from)")
    args = ap.parse_args()

    if args.table:
        daemon_docs, qemu_doc = [], None
        for p in args.table:
            with open(p) as f:
                d = json.load(f)
            if "qemu" in d.get("meta", {}):
                qemu_doc = d
            else:
                daemon_docs.append(d)
        print(tables(daemon_docs, qemu_doc))
        return 0

    names = []
    for s in args.scenarios or list(SCENARIOS):
        if s in ALIASES:
            names += ALIASES[s]
        elif s in SCENARIOS:
            names.append(s)
        else:
            ap.error(f"unknown scenario {s!r}")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown configuration {c!r} (known: {', '.join(CONFIGS)})")
    for tool in ("migrated", "migratectl"):
        if not os.access(os.path.join(args.bin, tool), os.X_OK):
            ap.error(f"{tool} not found in {args.bin}: swift build -c release --scratch-path "
                     f".build-daemonbench --product {tool}")
    if args.json:
        args.json = os.path.abspath(args.json)

    enter_netns()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    r = subprocess.run(["make", "-s", "-C", os.path.join(REPO, "guest")],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        sys.exit(f"make -C guest failed:\n{r.stdout}")

    tmp = tempfile.mkdtemp(prefix="daemon-migrate-bench-")
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bin": args.bin,
            "git_head": subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, text=True).stdout.strip(),
            "loadavg_start": open("/proc/loadavg").read().split()[:3],
            "netns": os.environ.get(NETNS_ENV) == "1", "repeat": args.repeat, "configs": configs,
            "timeout_s": args.timeout, "poll_s": args.poll, "command": sys.argv, "note": args.note,
            "guest_memory": args.guest_memory,
            "bin_mtime": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(
                os.path.getmtime(os.path.join(args.bin, "migrated"))))}
    results = []
    t_all = time.monotonic()
    try:
        certdir = os.path.join(tmp, "certs")
        os.makedirs(certdir)
        make_certificates(certdir, "demo-ca")
        for name in names:
            for rep in range(args.repeat):
                for config in configs:
                    log(f"== {name} / {config} / run {rep + 1} of {args.repeat}")
                    run = Run(args, tmp, certdir, name, config, rep)
                    try:
                        res = run.execute()
                    except Exception as e:
                        res = {"scenario": name, "config": config, "repeat": rep, "status": "error",
                               "error": f"{type(e).__name__}: {e}",
                               "daemon_logs": {d.name: d.log_tail() for d in run.daemons}}
                    finally:
                        run.cleanup()
                    log(f"   {res['status']}: total {res.get('total_s')} s, downtime "
                        f"{res.get('downtime_ms')} ms, wire {res.get('wire_bytes')} B (report "
                        f"{res.get('report_wire_bytes')}), passes {res.get('passes')}, CPU src "
                        f"{res.get('cpu_src_s')} dst {res.get('cpu_dst_s')}; "
                        f"guest: {res.get('guest', res.get('error'))}")
                    results.append(res)
    finally:
        doc = qemu_bench.finish_run(meta, t_all, tmp, args.keep, args.json,
                                    summary=summarize(results), results=results)
    print(f"migrated over loopback; wire bytes "
          f"{'from a private netns loopback' if meta['netns'] else 'from the migration report'}; "
          f"run {meta['run_s']} s, load average {' '.join(meta['loadavg_start'])} -> "
          f"{' '.join(meta['loadavg_end'])}")
    print(tables([doc]))
    for r in results:
        if r.get("error"):
            print(f"{r['scenario']}/{r['config']}/{r.get('repeat')}: {r['error']}")
    return 0 if all(r["status"] in ("completed", "not converged") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
