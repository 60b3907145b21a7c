#!/usr/bin/env python3
"""Soak (issue 17 item 2): one guest migrates back and forth between two daemons, many times, over mutual TLS.

Two `migrated` daemons (host-a, host-b) are started as scripts/demo starts them: each with its own certificate
from one throw-away CA, a Unix control socket, a migration listener on 127.0.0.1 and the other as its only
allowed peer. One memstress guest boots on host-a and moves A->B, B->A, ... for --rounds rounds, the
compression cycling none, lz4, zstd (so each direction sees all three). After every landing the destination's
console must show the guest verifying its whole working set again (a `verify=ok` status line whose guest time
is at least two seconds past the source's last line: one full verification ran entirely after the switchover)
and the guest must still be running (a failed verification makes it exit with 0x11). The source's record of the
migrated VM is then deleted (its id must be free there for the guest to come back under it).

After every round each daemon's open descriptors (/proc/PID/fd), threads (/proc/PID/status Threads) and
resident memory (VmRSS, with its anonymous and shared parts) are sampled, along with the migration's total time
and downtime from its report. At the end the last round is compared with round --check-from (same parity, so
the guest sits on the same daemon in both): descriptors and threads must be within --fd-margin/--thread-margin
(default ±2: Dispatch's idle workers come and go), RSS within max(--rss-margin-pct %, --rss-margin-mib) (default
max(10 %, 16 MiB): malloc's arenas make the anonymous part swing by up to about 18 MiB from round to round, while
a migrated-away VM that is not freed adds about 70 MiB every other round; see bench/README.md). The exit status
is 0 only if every landing verified and every margin held.

Usage:
  bench/reliability/soak.py [--rounds 200] [--check-from 10] [--bin DIR] [--csv FILE] [--table FILE]
Standard library only. Needs /dev/kvm, openssl, and release builds of migrated and migratectl (built with
`swift build -c release` unless --bin names a directory that has them).
"""

import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from testhosts import free_port, make_certificates  # noqa: E402  (bench/testhosts.py)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
ELF = os.path.join(REPO, "guest", "build", "guest.elf")
VM_ID = "soak"
COMPRESSIONS = ("none", "lz4", "zstd")
# memstress prints this after each full verification (guest/README.md, "memstress").
STATUS_RE = re.compile(r"memstress t=(\d+) gen=(\d+) pages=(\d+) ticks=(\d+) verify=ok\s*$")


class SoakFailure(Exception):
    """A landing that did not verify, a daemon that misbehaved, or a margin exceeded."""


def log(message):
    print(message, flush=True)


# --------------------------------------------------------------------------- processes
def _die_with_parent():
    """In the child before exec: SIGKILL when this script dies, however it dies (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)


TCP_STATES = {"01": "established", "02": "syn-sent", "03": "syn-recv", "04": "fin-wait1", "05": "fin-wait2",
              "06": "time-wait", "07": "close", "08": "close-wait", "09": "last-ack", "0A": "listen", "0B": "closing"}


def socket_states():
    """Socket inode -> "tcp-<state>" or "unix", from /proc/net (this network namespace)."""
    states = {}
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/net/{table}") as f:
                for line in list(f)[1:]:
                    fields = line.split()
                    states[fields[9]] = "tcp-" + TCP_STATES.get(fields[3], fields[3])
        except OSError:
            pass
    try:
        with open("/proc/net/unix") as f:
            for line in list(f)[1:]:
                states[line.split()[6]] = "unix"
    except OSError:
        pass
    return states


def fd_kind(target, sockets=None):
    """What a descriptor is, from its /proc/PID/fd link: tcp-<state>, unix, kvm-vm, kvm-vcpu, memfd, file, ...
    A socket in none of the tables (a TCP socket closed under its descriptor, say) is "socket"."""
    if target.startswith("socket:"):
        return (sockets or {}).get(target[len("socket:["):-1], "socket")
    if target.startswith("anon_inode:"):
        return re.sub(r"[\[\]]|:\d+$", "", target[len("anon_inode:"):])
    if target.startswith("/memfd:") or target.endswith("(deleted)"):
        return "memfd"
    if target.startswith("/dev/"):
        return target[len("/dev/"):]
    return "pipe" if target.startswith("pipe:") else "file"


class Daemon:
    """One `migrated` with its TLS identity, control socket and migration listener."""

    def __init__(self, bindir, work, name, peer, budget):
        self.name = name
        self.bindir = bindir
        self.sock = os.path.join(work, f"{name}.sock")
        self.log_path = os.path.join(work, f"{name}.log")
        self.port = free_port()
        cmd = [os.path.join(bindir, "migrated"), "--socket", self.sock, "--log-level", "warning",
               "--memory-budget", budget,
               "--tls-certificate", os.path.join(work, f"{name}.pem"), "--tls-key", os.path.join(work, f"{name}.key"),
               "--tls-ca", os.path.join(work, "ca.pem"), "--allow-peer", peer,
               "--incoming-listen", f"127.0.0.1:{self.port}"]
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SoakFailure(f"daemon {name} did not start:\n{self.log_text()}")
            time.sleep(0.05)
        # The daemon binds its migration listener before its control socket listens: once the control API
        # answers, migrations can come in.
        while self.ctl("vm", "list", check=False) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SoakFailure(f"daemon {name}'s control API does not answer:\n{self.log_text()}")
            time.sleep(0.05)
        if "not listening for incoming migrations" in self.log_text():
            raise SoakFailure(f"daemon {name} has no migration listener:\n{self.log_text()}")

    @property
    def pid(self):
        return self.proc.pid

    def log_text(self):
        self.log_file.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def alive(self):
        code = self.proc.poll()
        if code is not None:
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            raise SoakFailure(f"daemon {self.name} (pid {self.pid}) {how}; its log:\n{self.log_text()}")

    def ctl(self, *args, timeout=60, check=True):
        """`migratectl ARGS --socket ... --json`, parsed; SoakFailure when it fails and `check` is set."""
        cmd = [os.path.join(self.bindir, "migratectl"), *args, "--socket", self.sock, "--json"]
        try:
            result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SoakFailure(f"{self.name}: migratectl {' '.join(args)} did not finish within {timeout} s")
        document = None
        if result.stdout.strip():
            try:
                document = json.loads(result.stdout)
            except json.JSONDecodeError:
                raise SoakFailure(f"{self.name}: migratectl {' '.join(args)} printed no JSON:\n{result.stdout}")
        if check and result.returncode != 0:
            self.alive()  # a daemon that is gone explains the failure best
            raise SoakFailure(f"{self.name}: migratectl {' '.join(args)} exited {result.returncode}: "
                              f"{result.stderr.strip()} {result.stdout.strip()}")
        return document

    def sample(self):
        """Descriptors, threads and resident memory (KiB: total, anonymous, shared) of the daemon process."""
        self.alive()
        kinds = {}
        sockets = socket_states()
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                kind = fd_kind(os.readlink(f"/proc/{self.pid}/fd/{fd}"), sockets)
            except OSError:
                continue  # closed meanwhile
            kinds[kind] = kinds.get(kind, 0) + 1
        status = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                status[key] = value.split()[0] if value.split() else ""
        return {"fds": sum(kinds.values()), "fd_kinds": " ".join(f"{k}={v}" for k, v in sorted(kinds.items())),
                "threads": int(status["Threads"]), "rss_kib": int(status["VmRSS"]),
                "anon_kib": int(status["RssAnon"]), "shmem_kib": int(status["RssShmem"])}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the daemon stops its VMs and removes its socket
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


# --------------------------------------------------------------------------- the guest
def status_line(vm):
    m = STATUS_RE.search(vm.get("last_console_line") or "")
    return None if m is None else {"t": int(m[1]), "gen": int(m[2]), "pages": int(m[3]), "ticks": int(m[4])}


def check_guest_alive(daemon, vm):
    """A VM that should be running; a failed verification ends it (exit code 0x11) with the FAIL line last."""
    line = vm.get("last_console_line") or ""
    if "verify=FAIL" in line or vm.get("state") != "running":
        raise SoakFailure(f"{daemon.name}: VM is {vm.get('state')} (exit code {vm.get('exit_code')}, "
                          f"{vm.get('stop_reason', 'no stop reason')}); last console line: {line!r}")


def wait_for_status(daemon, predicate, what, timeout):
    """Polls `vm show` until the guest's status line satisfies `predicate`; returns (status, VM document)."""
    deadline = time.monotonic() + timeout
    while True:
        vm = daemon.ctl("vm", "show", VM_ID)
        check_guest_alive(daemon, vm)
        status = status_line(vm)
        if status is not None and predicate(status):
            return status, vm
        if time.monotonic() > deadline:
            raise SoakFailure(f"{daemon.name}: no console line showing {what} within {timeout} s; "
                              f"last: {vm.get('last_console_line')!r}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- one round
def migrate_round(r, src, dst, args):
    compression = COMPRESSIONS[(r - 1) % len(COMPRESSIONS)]
    before = src.ctl("vm", "show", VM_ID)
    check_guest_alive(src, before)

    started = time.monotonic()
    status = src.ctl("migrate", VM_ID, "--to", f"127.0.0.1:{dst.port}", "--channels", str(args.channels),
                     "--compression", compression, "--interval", "0.1", timeout=args.round_timeout, check=False)
    report = (status or {}).get("report") or {}
    if not status or status.get("phase") != "completed" or not report.get("succeeded"):
        raise SoakFailure(f"round {r} {src.name}->{dst.name} ({compression}): migration did not complete: "
                          f"phase {status and status.get('phase')}, error {report.get('error')!r}")

    # The source stopped the guest at the switchover: its last line is the guest's last output there.
    gone = src.ctl("vm", "show", VM_ID)
    if gone.get("state") != "migrated":
        raise SoakFailure(f"round {r}: {src.name} reports the VM {gone.get('state')} after a completed migration")
    last_at_source = status_line(gone)
    if last_at_source is None:
        raise SoakFailure(f"round {r}: {src.name}'s last console line is not a verify=ok status: "
                          f"{gone.get('last_console_line')!r}")

    # A status line two guest seconds on: the verification behind it started after the guest landed.
    landed, vm = wait_for_status(dst, lambda s: s["t"] >= last_at_source["t"] + 2,
                                 f"verify=ok at t >= {last_at_source['t'] + 2}", args.verify_timeout)
    if landed["pages"] < last_at_source["pages"] or landed["gen"] < last_at_source["gen"]:
        raise SoakFailure(f"round {r}: the guest went back: source {last_at_source}, destination {landed}")
    verified = time.monotonic()

    src.ctl("vm", "delete", VM_ID)
    return {"round": r, "direction": f"{src.name[-1].upper()}>{dst.name[-1].upper()}", "compression": compression,
            "total_seconds": report.get("total_seconds"), "downtime_ms": report.get("downtime_ms"),
            "wire_bytes": report.get("wire_bytes"), "passes": len(report.get("passes", [])),
            "round_seconds": round(verified - started, 2), "guest_t": landed["t"], "guest_gen": landed["gen"]}


def add_samples(row, a, b):
    for name, daemon in (("a", a), ("b", b)):
        s = daemon.sample()
        row[f"rss_{name}_mib"] = round(s["rss_kib"] / 1024, 1)
        row[f"anon_{name}_mib"] = round(s["anon_kib"] / 1024, 1)
        row[f"shmem_{name}_mib"] = round(s["shmem_kib"] / 1024, 1)
        row[f"fds_{name}"] = s["fds"]
        row[f"threads_{name}"] = s["threads"]
        row[f"fd_kinds_{name}"] = s["fd_kinds"]
    return row


COLUMNS = ["round", "direction", "compression", "total_seconds", "downtime_ms", "wire_bytes", "passes",
           "round_seconds", "guest_t", "guest_gen",
           "rss_a_mib", "anon_a_mib", "shmem_a_mib", "fds_a", "threads_a",
           "rss_b_mib", "anon_b_mib", "shmem_b_mib", "fds_b", "threads_b", "fd_kinds_a", "fd_kinds_b"]


def write_csv(path, rows):
    with open(path, "w") as f:
        f.write(",".join(COLUMNS) + "\n")
        for row in rows:
            f.write(",".join("" if row.get(c) is None else str(row.get(c)) for c in COLUMNS) + "\n")


# --------------------------------------------------------------------------- the verdict
def table(rows, check_from):
    """Round 0 (booted, before any migration), round 1, the reference round, every 10th, and the last."""
    shown = {0, 1, check_from, rows[-1]["round"]} | {r["round"] for r in rows if r["round"] % 10 == 0}
    lines = ["round  on  compr  total s  down ms   RSS A MiB (anon)   RSS B MiB (anon)  fds A  fds B  thr A  thr B",
             "-----  --  -----  -------  -------   ----------------   ----------------  -----  -----  -----  -----"]
    for row in rows:
        if row["round"] not in shown:
            continue
        on = "A" if row["round"] % 2 == 0 else "B"
        total = f"{row['total_seconds']:7.2f}" if row.get("total_seconds") is not None else "      -"
        down = f"{row['downtime_ms']:7.1f}" if row.get("downtime_ms") is not None else "      -"
        lines.append(f"{row['round']:5d}  {on:>2}  {row.get('compression', '-'):>5}  {total}  {down}  "
                     f"{row['rss_a_mib']:8.1f} ({row['anon_a_mib']:6.1f})  {row['rss_b_mib']:8.1f} ({row['anon_b_mib']:6.1f})  "
                     f"{row['fds_a']:5d}  {row['fds_b']:5d}  {row['threads_a']:5d}  {row['threads_b']:5d}")
    return lines


def slope_per_100(rows, key):
    """Least-squares growth of `key` per 100 rounds, over the rows given."""
    xs = [r["round"] for r in rows]
    ys = [r[key] for r in rows]
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return 100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


def verdict(rows, args):
    """Lines saying how the last round compares with the reference round, and whether every margin held."""
    ref = next(r for r in rows if r["round"] == args.check_from)
    last = rows[-1]
    lines, ok = [], True
    lines.append(f"round {last['round']} against round {ref['round']} (the guest on host-{'a' if ref['round'] % 2 == 0 else 'b'} in both):")
    for name in ("a", "b"):
        for key, margin, unit in ((f"fds_{name}", args.fd_margin, ""), (f"threads_{name}", args.thread_margin, "")):
            delta = last[key] - ref[key]
            good = abs(delta) <= margin
            ok &= good
            lines.append(f"  {key:<10} {ref[key]:>6} -> {last[key]:<6} {delta:+d} (margin ±{margin}) {'ok' if good else 'EXCEEDED'}")
        key = f"rss_{name}_mib"
        allowed = max(ref[key] * args.rss_margin_pct / 100, args.rss_margin_mib)
        delta = last[key] - ref[key]
        good = delta <= allowed
        ok &= good
        lines.append(f"  {key:<10} {ref[key]:>6.1f} -> {last[key]:<6.1f} {delta:+.1f} MiB (margin +{allowed:.1f} MiB: "
                     f"max({args.rss_margin_pct:g} %, {args.rss_margin_mib:g} MiB)) {'ok' if good else 'EXCEEDED'}")
    # Growth per 100 rounds over the same-parity rounds from the reference on: a trend the end points can hide.
    same = [r for r in rows if r["round"] >= ref["round"] and r["round"] % 2 == ref["round"] % 2]
    trend = ", ".join(f"{k} {slope_per_100(same, k):+.2f}" for k in ("rss_a_mib", "anon_a_mib", "rss_b_mib", "anon_b_mib",
                                                                      "fds_a", "fds_b", "threads_a", "threads_b"))
    lines.append(f"  trend per 100 rounds (least squares, rounds {ref['round']}, {ref['round'] + 2}, ... {last['round']}): {trend}")
    migrations = [r for r in rows if r["round"] > 0]
    totals = [r["total_seconds"] for r in migrations if r.get("total_seconds") is not None]
    downs = [r["downtime_ms"] for r in migrations if r.get("downtime_ms") is not None]
    lines.append(f"migrations: {len(migrations)}, every landing verified; total time median {statistics.median(totals):.2f} s "
                 f"(max {max(totals):.2f}), downtime median {statistics.median(downs):.1f} ms (max {max(downs):.1f})")
    for c in COMPRESSIONS:
        sel = [r for r in migrations if r["compression"] == c]
        if sel:
            lines.append(f"  {c:<5} {len(sel):>3} migrations: total median {statistics.median(r['total_seconds'] for r in sel):.2f} s, "
                         f"downtime median {statistics.median(r['downtime_ms'] for r in sel):.1f} ms, "
                         f"wire median {statistics.median(r['wire_bytes'] for r in sel) / 2**20:.1f} MiB")
    return lines, ok


# --------------------------------------------------------------------------- main
def build(args):
    if args.bin:
        bindir = os.path.abspath(args.bin)
    else:
        for product in ("migrated", "migratectl"):
            log(f"== swift build -c release --product {product} ==")
            subprocess.run(["swift", "build", "-c", "release", "--product", product], cwd=REPO, check=True,
                           stdout=subprocess.DEVNULL)
        bindir = subprocess.run(["swift", "build", "-c", "release", "--show-bin-path"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout.strip()
    for tool in ("migrated", "migratectl"):
        if not os.access(os.path.join(bindir, tool), os.X_OK):
            raise SoakFailure(f"no executable {tool} in {bindir}")
    return bindir


def interrupted(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--rounds", type=int, default=200, help="migrations, A->B counting as one (default 200)")
    p.add_argument("--check-from", type=int, default=10,
                   help="the round the last one is compared with; same parity as --rounds (default 10)")
    p.add_argument("--bin", help="directory with release builds of migrated and migratectl (default: build them)")
    p.add_argument("--csv", help="write every round's figures here")
    p.add_argument("--table", help="write the printed table and verdict here as well")
    p.add_argument("--memory", default="256M", help="guest RAM (default 256M)")
    p.add_argument("--cmdline", default="workload=memstress size_mib=64 rate_mib=50 pattern=mixed",
                   help="the guest's command line (a memstress workload)")
    p.add_argument("--channels", type=int, default=2, help="channels per migration (default 2)")
    p.add_argument("--fd-margin", type=int, default=2, help="allowed change of each daemon's descriptors (default 2)")
    p.add_argument("--thread-margin", type=int, default=2,
                   help="allowed change of each daemon's threads (default 2: Dispatch's idle workers come and go)")
    p.add_argument("--rss-margin-pct", type=float, default=10, help="allowed RSS growth in percent (default 10)")
    p.add_argument("--rss-margin-mib", type=float, default=16, help="allowed RSS growth in MiB, if larger (default 16)")
    p.add_argument("--round-timeout", type=float, default=120, help="seconds a migration may take (default 120)")
    p.add_argument("--verify-timeout", type=float, default=30,
                   help="seconds from the end of a migration to the destination's verified status line (default 30)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (certificates, daemon logs)")
    args = p.parse_args()
    if args.rounds < 2 or not 1 <= args.check_from < args.rounds:
        p.error("need --rounds >= 2 and 1 <= --check-from < --rounds")
    if args.check_from % 2 != args.rounds % 2:
        p.error("--check-from and --rounds must have the same parity: the guest must sit on the same daemon in both")
    return args


def main():
    args = parse_args()
    if not (os.access("/dev/kvm", os.R_OK | os.W_OK)):
        print("soak: /dev/kvm is missing or not usable", file=sys.stderr)
        return 2
    if not os.path.exists(ELF):
        print(f"soak: {ELF} is missing; run scripts/setup", file=sys.stderr)
        return 2
    # SIGTERM and SIGHUP end the run as Ctrl-C does: through the clean-up below.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)

    work = tempfile.mkdtemp(prefix="migrated-soak.")
    daemons = []
    rows = []
    status = 1
    try:
        bindir = build(args)
        make_certificates(work, "soak-ca")
        a = Daemon(bindir, work, "host-a", "host-b", "2G")
        daemons.append(a)
        b = Daemon(bindir, work, "host-b", "host-a", "2G")
        daemons.append(b)
        log(f"== daemons: host-a pid {a.pid} listens on 127.0.0.1:{a.port}, host-b pid {b.pid} on 127.0.0.1:{b.port} ==")

        a.ctl("vm", "start", "--id", VM_ID, "--image", ELF, "--memory", args.memory, "--cmdline", args.cmdline)
        size = re.search(r"size_mib=(\d+)", args.cmdline)
        pages = int(size[1]) * 256 if size else 64 * 256
        first, _ = wait_for_status(a, lambda s: s["pages"] >= pages, f"pages={pages} verify=ok", 60)
        log(f"== guest '{VM_ID}' ({args.memory}, {args.cmdline}) on host-a: working set written, t={first['t']} verify=ok ==")
        rows.append(add_samples({"round": 0, "guest_t": first["t"], "guest_gen": first["gen"]}, a, b))

        log(f"== {args.rounds} rounds over mutual TLS, {args.channels} channels, compression {'/'.join(COMPRESSIONS)} in turn ==")
        for r in range(1, args.rounds + 1):
            src, dst = (a, b) if r % 2 == 1 else (b, a)
            row = add_samples(migrate_round(r, src, dst, args), a, b)
            rows.append(row)
            if args.csv:
                write_csv(args.csv, rows)
            log(f"round {r:3d} {row['direction']} {row['compression']:>4}: {row['total_seconds']:.2f} s, "
                f"downtime {row['downtime_ms']:.1f} ms, verified at t={row['guest_t']} | "
                f"A {row['rss_a_mib']:.1f} MiB {row['fds_a']} fds {row['threads_a']} thr | "
                f"B {row['rss_b_mib']:.1f} MiB {row['fds_b']} fds {row['threads_b']} thr")

        lines = table(rows, args.check_from)
        conclusion, ok = verdict(rows, args)
        lines += [""] + conclusion
        for name, daemon in (("host-a", a), ("host-b", b)):
            text = daemon.log_text().strip()
            if text:
                lines.append(f"{name}'s log (warnings and worse): {len(text.splitlines())} lines; first: {text.splitlines()[0]}")
        lines.append("PASS" if ok else "FAIL: a margin was exceeded")
        log("")
        log("\n".join(lines))
        if args.table:
            with open(args.table, "w") as f:
                f.write("\n".join(lines) + "\n")
        status = 0 if ok else 1
    except SoakFailure as error:
        print(f"soak: FAIL: {error}", file=sys.stderr)
        for daemon in daemons:
            text = daemon.log_text().strip()
            if text:
                print(f"--- {daemon.name}'s log (last 20 lines) ---\n" + "\n".join(text.splitlines()[-20:]), file=sys.stderr)
        status = 1
    except KeyboardInterrupt as interrupt:
        print(f"soak: interrupted ({interrupt or 'SIGINT'}) after {max(len(rows) - 1, 0)} rounds", file=sys.stderr)
        status = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        for daemon in daemons:
            daemon.stop()
        if args.csv and rows:
            write_csv(args.csv, rows)
        if args.keep:
            print(f"soak: work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
