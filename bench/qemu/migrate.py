#!/usr/bin/env python3
"""QEMU side of the issue-4 migration benchmark.

Live-migrates the test guest (guest/build/guest.elf, memstress) between two
local QEMU processes over loopback TCP and reports, per scenario and
configuration: total time, downtime, bytes (QEMU's counter and bytes on the
wire), throughput and CPU seconds of both QEMU processes.

Configurations:
  default  QEMU defaults (max-bandwidth raised, see README)
  tls      multifd, 2 channels, zstd, mutual TLS (tls-creds-x509)

With --postcopy (issue 15; default configuration only): postcopy-ram on both
sides, migrate-start-postcopy once the first pass is done (dirty-sync-count
2), and the guest times its page accesses (memstress stall_us=, see
guest/README.md): its stall lines before, during and after the migration
are kept, with the time until the destination runs (QMP events STOP on the
source, RESUME on the destination).

Usage: bench/qemu/migrate.py [--json out.json] [--postcopy] [scenario ...]
Standard library only. Needs root (private network namespace for exact
loopback byte counts, /dev/kvm).
"""

import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
ELF = os.path.join(REPO, "guest", "build", "guest.elf")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = 4096
NETNS_ENV = "QEMU_MIGRATE_BENCH_NETNS"
# QEMU 7.2 caps precopy at 128 MiB/s by default; raise it for a fair comparison.
MAX_BANDWIDTH = 100 * 10**9

# name -> (guest RAM MiB, command line, working set MiB)
SCENARIOS = {
    "idle4g": (4096, "workload=memstress size_mib=16 rate_mib=0 pattern=text", 16),
    "random1g": (1280, "workload=memstress size_mib=1024 rate_mib=0 pattern=random", 1024),
    "text1g": (1280, "workload=memstress size_mib=1024 rate_mib=0 pattern=text", 1024),
    "dirty50": (768, "workload=memstress size_mib=512 rate_mib=50 pattern=mixed", 512),
    "dirty200": (768, "workload=memstress size_mib=512 rate_mib=200 pattern=mixed", 512),
    "dirty800": (768, "workload=memstress size_mib=512 rate_mib=800 pattern=mixed", 512),
    # A 2 GiB guest rewriting 1 GiB at full speed, for ever (post-copy row of issue 15).
    "hot2g": (2048, "workload=memstress size_mib=1024 rate_mib=0 rewrite=1 pattern=mixed", 1024),
}
# Accesses over 20 us count as stalls; the same threshold as migration-bench --postcopy.
STALL_US = 20
ALIASES = {"1": ["idle4g"], "2": ["random1g"], "3": ["text1g"], "4": ["dirty50", "dirty200", "dirty800"]}
CONFIGS = ["default", "tls"]

STATUS_RE = re.compile(r"^memstress t=(\d+) gen=(\d+) pages=(\d+) ticks=(\d+) verify=(\S+)")


def host_tsc_khz():
    """The host's TSC rate (/proc/cpuinfo's cpu MHz), which KVM gives the guest unscaled; memstress's own
    measurement against its tick drifts by a few per cent on a loaded host."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return round(float(line.split(":")[1]) * 1000)
    return 0


def serial_lines(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("ascii", "replace").replace("\r", "").split("\n")[:-1]
    except OSError:
        return []


def stall_lines(lines):
    return [l for l in lines if l.startswith("memstress stall ")]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- QMP
class QMP:
    def __init__(self, path, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"QMP socket {path} did not come up")
                time.sleep(0.02)
        self.sock.settimeout(30)
        self.buf = b""
        self.events = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("QMP connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QMPError(f"{name}: {reply['error'].get('desc')}")
            return reply.get("return")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class QMPError(RuntimeError):
    pass


# --------------------------------------------------------------------------- helpers
def proc_cpu(pid):
    """(process utime+stime, vCPU-thread utime+stime) in seconds."""
    def ticks(stat_path):
        with open(stat_path) as f:
            s = f.read()
        fields = s[s.rindex(")") + 2:].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)

    total = ticks(f"/proc/{pid}/stat")
    vcpu = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    comm = f.read().strip()
                if comm.startswith("CPU ") and comm.endswith("/KVM"):
                    vcpu += ticks(f"/proc/{pid}/task/{tid}/stat")
            except OSError:
                pass
    except OSError:
        pass
    return total / CLK_TCK, vcpu / CLK_TCK


def lo_bytes():
    """Bytes sent through this network namespace's loopback (None if unknown)."""
    try:
        with open("/proc/self/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    return int(rest.split()[8])  # transmit bytes
    except OSError:
        pass
    return None


def status_lines(path):
    try:
        with open(path, "rb") as f:
            text = f.read().decode("ascii", "replace").replace("\r", "")
    except OSError:
        return [], ""
    out = []
    for line in text.splitlines():
        m = STATUS_RE.match(line)
        if m:
            out.append({"t": int(m[1]), "gen": int(m[2]), "pages": int(m[3]),
                        "ticks": int(m[4]), "verify": m[5]})
    return out, text


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def set_pdeathsig():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def make_certs(d):
    """CA, server and client certificates for QEMU's tls-creds-x509 (one dir)."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
        "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=qemu-bench-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for role, eku in (("server", "serverAuth"), ("client", "clientAuth")):
        with open(os.path.join(d, f"{role}.ext"), "w") as f:
            f.write("basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n"
                    f"extendedKeyUsage={eku}\n"
                    "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{role}-key.pem",
            "-out", f"{role}.csr", "-subj", f"/CN=qemu-bench-{role}")
        run("x509", "-req", "-in", f"{role}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", f"{role}-cert.pem", "-days", "2", "-extfile", f"{role}.ext")
    for name in os.listdir(d):
        if name.endswith("-key.pem"):
            os.chmod(os.path.join(d, name), 0o600)


# --------------------------------------------------------------------------- one run
class Run:
    def __init__(self, args, tmp, scenario, config, certdir, rep=0):
        self.args, self.tmp, self.scenario, self.config = args, tmp, scenario, config
        self.certdir = certdir
        self.procs = []
        self.qmps = []
        self.dir = os.path.join(tmp, f"{scenario}-{config}-{rep}")
        os.makedirs(self.dir, exist_ok=True)

    def wait_until_filled(self, src, src_serial, want, t_boot):
        """Waits until the source guest's status line says it has written `want` pages of its working set; returns its
        status lines so far."""
        while True:
            lines, text = status_lines(src_serial)
            if lines and lines[-1]["pages"] >= want:
                return lines
            if src.poll() is not None:
                raise RuntimeError(f"source QEMU exited ({src.returncode}): {text[-500:]}")
            if time.monotonic() - t_boot > self.args.fill_timeout:
                raise RuntimeError(f"guest did not fill {want} pages in {self.args.fill_timeout}s")
            time.sleep(0.05)

    def start_qemu(self, role, mem, append, extra):
        qmp = os.path.join(self.dir, f"{role}.qmp")
        serial = os.path.join(self.dir, f"{role}.serial")
        # debug-threads=on names the vCPU threads "CPU n/KVM" (to split their CPU time out).
        cmd = [self.args.qemu, "-name", f"{role},debug-threads=on",
               "-accel", "kvm", "-M", "microvm", "-m", str(mem),
               "-display", "none", "-serial", f"file:{serial}", "-monitor", "none",
               "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
               "-kernel", ELF, "-append", append,
               "-qmp", f"unix:{qmp},server=on,wait=off", *extra]
        if self.args.mem_path:
            cmd += ["-mem-path", self.args.mem_path]
        err = open(os.path.join(self.dir, f"{role}.stderr"), "wb")
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                             preexec_fn=set_pdeathsig)
        err.close()
        self.procs.append(p)
        return p, qmp, serial

    def cleanup(self):
        for q in self.qmps:
            try:
                q.cmd("quit")
            except Exception:
                pass
            q.close()
        for p in self.procs:
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def execute(self):
        mem, append, ws_mib = SCENARIOS[self.scenario]
        tls = self.config == "tls"
        res = {"scenario": self.scenario, "config": self.config, "guest_mem_mib": mem,
               "cmdline": append, "status": "error"}
        tls_obj = lambda ep: ["-object", f"tls-creds-x509,id=tls0,dir={self.certdir},"
                                         f"endpoint={ep},verify-peer=on"]
        t_boot = time.monotonic()
        dst, dst_qmp_path, dst_serial = self.start_qemu(
            "dst", mem, append, ["-incoming", "defer"] + (tls_obj("server") if tls else []))
        src, src_qmp_path, src_serial = self.start_qemu(
            "src", mem, append, tls_obj("client") if tls else [])
        dq = QMP(dst_qmp_path)
        self.qmps.append(dq)
        sq = QMP(src_qmp_path)
        self.qmps.append(sq)

        # Wait until the guest has written its whole working set.
        want = ws_mib * 256
        self.wait_until_filled(src, src_serial, want, t_boot)
        res["fill_s"] = round(time.monotonic() - t_boot, 2)

        # Capabilities and parameters, both sides.
        caps = [{"capability": "multifd", "state": True}] if tls else []
        params = {}
        if tls:
            params = {"multifd-channels": 2, "multifd-compression": self.args.compression,
                      "tls-creds": "tls0"}
        for q in (dq, sq):
            if caps:
                q.cmd("migrate-set-capabilities", capabilities=caps)
            if params:
                q.cmd("migrate-set-parameters", **params)
        sq.cmd("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
        res["parameters"] = sq.cmd("query-migrate-parameters")
        res["capabilities"] = [c["capability"] for c in sq.cmd("query-migrate-capabilities")
                               if c["state"]]

        port = free_port()
        uri = f"tcp:127.0.0.1:{port}"
        dq.cmd("migrate-incoming", uri=uri)

        src_ticks_before = status_lines(src_serial)[0][-1]["ticks"]
        cpu_src0, cpu_dst0 = proc_cpu(src.pid), proc_cpu(dst.pid)
        lo0 = lo_bytes()
        t0 = time.monotonic()
        sq.cmd("migrate", uri=uri)

        info = {}
        progress = None
        passes_seen = 0
        while True:
            info = sq.cmd("query-migrate")
            st = info.get("status")
            passes_seen = max(passes_seen, info.get("ram", {}).get("dirty-sync-count", 0))
            if st in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() - t0 > self.args.timeout:
                progress = info  # the figures when we gave up; cancelled replies have none
                sq.cmd("migrate_cancel")
                cancel_deadline = time.monotonic() + 30
                while info.get("status") not in ("cancelled", "failed", "completed"):
                    if time.monotonic() > cancel_deadline:
                        raise RuntimeError("migrate_cancel did not finish in 30 s")
                    time.sleep(0.05)
                    info = sq.cmd("query-migrate")
                break
            time.sleep(self.args.poll)
        t_end = time.monotonic()
        cpu_src1 = proc_cpu(src.pid)
        st = info.get("status")
        res["qemu_status"] = st
        ram = info.get("ram") or (progress or {}).get("ram", {})

        if st == "completed":
            # Destination: until it runs the guest.
            deadline = time.monotonic() + 20
            while True:
                s = dq.cmd("query-status")
                if s.get("running"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"destination not running after migration: {s}")
                time.sleep(0.01)
            cpu_dst1 = proc_cpu(dst.pid)
            lo1 = lo_bytes()
            res["status"] = "completed"
        else:
            cpu_dst1 = proc_cpu(dst.pid)
            lo1 = lo_bytes()
            res["status"] = "not converged" if st == "cancelled" else f"failed ({st})"
            res["error"] = info.get("error-desc")

        res["wall_s"] = round(t_end - t0, 3)
        # Not converged: the time until we gave up.
        res["total_time_ms"] = info.get("total-time") or (progress or {}).get("total-time")
        res["downtime_ms"] = info.get("downtime")
        res["setup_time_ms"] = info.get("setup-time")
        res["expected_downtime_ms"] = info.get("expected-downtime")
        res["ram"] = ram
        res["ram_transferred_bytes"] = ram.get("transferred")
        res["wire_bytes"] = (lo1 - lo0) if lo0 is not None and lo1 is not None else None
        res["passes"] = ram.get("dirty-sync-count", passes_seen)
        res["mbps_qemu"] = ram.get("mbps")
        tt = res["total_time_ms"] or res["wall_s"] * 1000
        b = res["wire_bytes"] if res["wire_bytes"] is not None else res["ram_transferred_bytes"]
        res["throughput_GBps"] = round(b / (tt / 1000) / 1e9, 3) if b and tt else None
        # Guest memory carried: pages sent with payload (zero pages are sent as a flag).
        res["page_payload_bytes"] = (ram.get("normal", 0) or 0) * PAGE
        res["payload_GBps"] = (round(res["page_payload_bytes"] / (tt / 1000) / 1e9, 3)
                               if tt else None)
        res["cpu_src_s"] = round(cpu_src1[0] - cpu_src0[0], 3)
        res["cpu_dst_s"] = round(cpu_dst1[0] - cpu_dst0[0], 3)
        res["cpu_src_vcpu_s"] = round(cpu_src1[1] - cpu_src0[1], 3)
        res["cpu_dst_vcpu_s"] = round(cpu_dst1[1] - cpu_dst0[1], 3)
        res["cpu_src_excl_vcpu_s"] = round(res["cpu_src_s"] - res["cpu_src_vcpu_s"], 3)
        res["cpu_dst_excl_vcpu_s"] = round(res["cpu_dst_s"] - res["cpu_dst_vcpu_s"], 3)

        if st == "completed":
            res["guest"] = self.check_guest(dst, dst_serial, src_ticks_before)
        else:
            # The source must still be running after a cancel.
            s = sq.cmd("query-status")
            time.sleep(1.5)
            lines, _ = status_lines(src_serial)
            ok = s.get("running") and lines and lines[-1]["verify"] == "ok"
            res["guest"] = ("source still running, verify=ok" if ok
                            else f"source NOT healthy: {s}")
        res["src_serial_tail"] = status_lines(src_serial)[1].splitlines()[-3:]
        res["dst_serial_tail"] = status_lines(dst_serial)[1].splitlines()[-3:]
        return res

    def execute_postcopy(self):
        """One post-copy migration (issue 15): postcopy-ram on both sides, migrate-start-postcopy after the first
        pass, and the guest's stall lines before (baseline: the 3 s before the migration), during and after it."""
        mem, append, ws_mib = SCENARIOS[self.scenario]
        append = f"{append} stall_us={STALL_US} tsc_khz={host_tsc_khz()}"
        preempt = self.args.postcopy_preempt
        res = {"engine": "qemu", "mode": "postcopy", "scenario": self.scenario,
               "config": "postcopy+preempt" if preempt else "postcopy",
               "guest_mem_mib": mem, "cmdline": append, "status": "error",
               "loadavg_start": open("/proc/loadavg").read().split()[:3]}
        t_boot = time.monotonic()
        dst, dst_qmp_path, dst_serial = self.start_qemu("dst", mem, append, ["-incoming", "defer"])
        src, src_qmp_path, src_serial = self.start_qemu("src", mem, append, [])
        dq = QMP(dst_qmp_path)
        self.qmps.append(dq)
        sq = QMP(src_qmp_path)
        self.qmps.append(sq)

        want = ws_mib * 256
        lines = self.wait_until_filled(src, src_serial, want, t_boot)
        res["fill_s"] = round(time.monotonic() - t_boot, 2)
        # Three more status lines: the baseline, what the guest sees without a migration.
        filled_at = len(serial_lines(src_serial))
        deadline = time.monotonic() + 15
        while len(status_lines(src_serial)[0]) < len(lines) + 3 and time.monotonic() < deadline:
            time.sleep(0.05)

        caps = [{"capability": "postcopy-ram", "state": True}]
        if preempt:
            caps.append({"capability": "postcopy-preempt", "state": True})
        for q in (dq, sq):
            q.cmd("migrate-set-capabilities", capabilities=caps)
        sq.cmd("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
        res["parameters"] = sq.cmd("query-migrate-parameters")
        res["capabilities"] = [c["capability"] for c in sq.cmd("query-migrate-capabilities") if c["state"]]
        port = free_port()
        uri = f"tcp:127.0.0.1:{port}"
        dq.cmd("migrate-incoming", uri=uri)

        before = serial_lines(src_serial)
        res["baseline_lines"] = stall_lines(before[filled_at:])
        src_lines_before = len(before)
        cpu_src0, cpu_dst0 = proc_cpu(src.pid), proc_cpu(dst.pid)
        lo0 = lo_bytes()
        t0_wall = time.time()
        t0 = time.monotonic()
        sq.cmd("migrate", uri=uri)
        started_postcopy = None
        info = {}
        while True:
            info = sq.cmd("query-migrate")
            st = info.get("status")
            if st in ("completed", "failed", "cancelled"):
                break
            if started_postcopy is None and info.get("ram", {}).get("dirty-sync-count", 0) >= 2:
                sq.cmd("migrate-start-postcopy")
                started_postcopy = time.monotonic() - t0
            if time.monotonic() - t0 > self.args.timeout:
                res["error"] = f"gave up after {self.args.timeout} s in status {st}"
                break
            time.sleep(0.002 if started_postcopy is None else self.args.poll)
        t_end = time.monotonic()
        # The destination's lines up to the end of post-copy (as the source reports it).
        dst_lines_at_end = len(serial_lines(dst_serial))
        cpu_src1 = proc_cpu(src.pid)
        res["qemu_status"] = info.get("status")
        res["start_postcopy_after_s"] = round(started_postcopy, 3) if started_postcopy is not None else None
        ram = info.get("ram", {})
        res["wall_s"] = round(t_end - t0, 3)
        res["total_time_ms"] = info.get("total-time")
        res["downtime_ms_qemu"] = info.get("downtime")
        res["setup_time_ms"] = info.get("setup-time")
        res["ram"] = ram
        res["ram_transferred_bytes"] = ram.get("transferred")
        res["postcopy_requests"] = ram.get("postcopy-requests")
        res["passes"] = ram.get("dirty-sync-count")
        # Events: STOP on the source (its pause) and RESUME on the destination (its guest runs), both stamped
        # with the host's wall clock.
        deadline = time.monotonic() + 20
        while not any(e["event"] == "RESUME" for e in dq.events) and time.monotonic() < deadline:
            dq.cmd("query-status")
            time.sleep(0.01)
        sq.cmd("query-status")
        stamp = lambda e: e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
        stops = [stamp(e) for e in sq.events if e["event"] == "STOP"]
        resumes = [stamp(e) for e in dq.events if e["event"] == "RESUME"]
        if stops and resumes:
            res["downtime_ms"] = round((resumes[0] - stops[0]) * 1000, 1)
            res["until_destination_runs_s"] = round(resumes[0] - t0_wall, 3)
        res["events_src"] = [e["event"] for e in sq.events]
        res["events_dst"] = [e["event"] for e in dq.events]
        cpu_dst1 = proc_cpu(dst.pid)
        lo1 = lo_bytes()
        res["wire_bytes"] = (lo1 - lo0) if lo0 is not None and lo1 is not None else None
        res["cpu_src_s"] = round(cpu_src1[0] - cpu_src0[0], 3)
        res["cpu_dst_s"] = round(cpu_dst1[0] - cpu_dst0[0], 3)
        res["source_lines_during"] = stall_lines(serial_lines(src_serial)[src_lines_before:])

        if info.get("status") == "completed":
            res["status"] = "completed"
            # The first stall line after the end belongs to post-copy; then two status lines that verify.
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                later = serial_lines(dst_serial)[dst_lines_at_end:]
                if stall_lines(later) and sum(1 for l in later if l.startswith("memstress t=")) >= 2:
                    break
                if dst.poll() is not None:
                    break
                time.sleep(0.05)
            lines = serial_lines(dst_serial)
            during = stall_lines(lines[:dst_lines_at_end])
            after = stall_lines(lines[dst_lines_at_end:])
            if after:
                during.append(after.pop(0))
            res["destination_lines_during_postcopy"] = during
            res["destination_lines_after"] = after
            statuses = [l for l in lines if l.startswith("memstress t=")]
            res["destination_status_lines"] = statuses
            ok = len(statuses) >= 2 and all("verify=ok" in l for l in statuses) \
                and not any("verify=FAIL" in l for l in lines)
            res["guest"] = "ok" if ok else f"FAILED on destination (exit {dst.poll()}): {lines[-3:]!r}"
        else:
            res["status"] = f"failed ({info.get('status')})"
            res["error"] = res.get("error") or info.get("error-desc")
        res["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        return res

    def check_guest(self, dst, serial, src_ticks):
        deadline = time.monotonic() + 10
        while True:
            lines, text = status_lines(serial)
            if "verify=FAIL" in text or dst.poll() is not None:
                return f"FAILED on destination (exit {dst.poll()}): {text[-300:]!r}"
            if len(lines) >= 2 and all(l["verify"] == "ok" for l in lines) \
                    and lines[-1]["ticks"] > src_ticks:
                return f"ok ({len(lines)} status lines verify=ok on destination, " \
                       f"ticks {lines[0]['ticks']}..{lines[-1]['ticks']})"
            if time.monotonic() > deadline:
                return f"FAILED: no fresh verify=ok lines on destination: {text[-300:]!r}"
            time.sleep(0.1)


# --------------------------------------------------------------------------- main
def fmt(v, f="{:.0f}"):
    return "-" if v is None else f.format(v)


COLUMNS = ["scenario", "config", "status", "total ms", "downtime ms", "QEMU MB", "wire MB",
           "wire GB/s", "payload GB/s", "src CPU s", "dst CPU s", "src CPU excl vCPU", "dst CPU excl vCPU", "passes", "guest"]


def row(r):
    ok = r.get("guest", "")
    guest = "ok" if ok.startswith("ok") or ok.startswith("source still running") else (
        "FAIL" if ok else "-")
    return [r["scenario"], r["config"], r["status"], fmt(r.get("total_time_ms")),
            fmt(r.get("downtime_ms")),
            fmt(r["ram_transferred_bytes"] / 1e6 if r.get("ram_transferred_bytes") else None),
            fmt(r["wire_bytes"] / 1e6 if r.get("wire_bytes") is not None else None),
            fmt(r.get("throughput_GBps"), "{:.2f}"), fmt(r.get("payload_GBps"), "{:.2f}"),
            fmt(r.get("cpu_src_s"), "{:.2f}"), fmt(r.get("cpu_dst_s"), "{:.2f}"),
            fmt(r.get("cpu_src_excl_vcpu_s"), "{:.2f}"), fmt(r.get("cpu_dst_excl_vcpu_s"), "{:.2f}"),
            fmt(r.get("passes")), guest]


def print_table(results):
    rows = [COLUMNS] + [row(r) for r in results]
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---" for _ in COLUMNS) + "|")
    for r in rows[1:]:
        print("| " + " | ".join(r) + " |")
    sys.stdout.flush()


def finish_run(meta, t_all, tmp, keep, json_path, **fields):
    """Closes a benchmark run: its duration and load into `meta`, the temp dir kept or removed, and
    {"meta": meta, **fields} written to `json_path` if given. Returns that document."""
    meta["run_s"] = round(time.monotonic() - t_all, 1)
    meta["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    if keep:
        log(f"logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    doc = {"meta": meta, **fields}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=2)
    return doc


def enter_netns(script=__file__, env_name=NETNS_ENV):
    """Re-run `script` inside a private network namespace so that its loopback counters
    count exactly this benchmark's traffic. Falls back to the host's namespace.
    `env_name` marks the re-run (bench/daemon/migrate.py uses this too, with its own)."""
    if os.environ.get(env_name):
        if os.environ[env_name] == "1":
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"):
        env = dict(os.environ, **{env_name: "1"})
        try:
            os.execvpe("unshare", ["unshare", "--net", "--", sys.executable,
                                   os.path.abspath(script), *sys.argv[1:]], env)
        except OSError:
            pass
    os.environ[env_name] = "host"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*",
                    help="idle4g random1g text1g dirty50 dirty200 dirty800, or 1 2 3 4 (default: all)")
    ap.add_argument("--json", help="write all figures to this file")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per scenario and configuration (default 1); QEMU's times here vary with "
                         "whether its huge pages come back from the host, so take the median of several")
    ap.add_argument("--config", action="append", choices=CONFIGS,
                    help="only this configuration (repeatable; default: both)")
    ap.add_argument("--timeout", type=float, default=120,
                    help="give up a migration after this many seconds (default 120)")
    ap.add_argument("--fill-timeout", type=float, default=120,
                    help="seconds to wait for the guest to fill its working set")
    ap.add_argument("--poll", type=float, default=0.05, help="query-migrate interval, s")
    ap.add_argument("--compression", default="zstd",
                    help="multifd-compression for the tls configuration (default zstd)")
    ap.add_argument("--mem-path", metavar="DIR",
                    help="back guest RAM with files in DIR (-mem-path), e.g. a hugetlbfs mount, to compare with "
                         "migrated --guest-memory huge-pages; default: QEMU's anonymous memory")
    ap.add_argument("--postcopy", action="store_true",
                    help="post-copy rows of issue 15 (default configuration only): see the docstring")
    ap.add_argument("--postcopy-preempt", action="store_true",
                    help="with --postcopy: also the postcopy-preempt capability (requested pages on a channel of "
                         "their own)")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, certs)")
    args = ap.parse_args()

    names = []
    for s in args.scenarios or list(SCENARIOS):
        if s in ALIASES:
            names += ALIASES[s]
        elif s in SCENARIOS:
            names.append(s)
        else:
            ap.error(f"unknown scenario {s!r}")
    configs = args.config or CONFIGS
    if args.postcopy:
        configs = ["default"]

    enter_netns()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    r = subprocess.run(["make", "-s", "-C", os.path.join(REPO, "guest")],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        sys.exit(f"make -C guest failed:\n{r.stdout}")

    version = subprocess.run([args.qemu, "--version"], stdout=subprocess.PIPE,
                             text=True).stdout.splitlines()[0]
    tmp = tempfile.mkdtemp(prefix="qemu-migrate-bench-")
    meta = {"qemu": version, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "loadavg_start": open("/proc/loadavg").read().split()[:3],
            "netns": os.environ.get(NETNS_ENV) == "1", "max_bandwidth": MAX_BANDWIDTH,
            "compression": args.compression, "timeout_s": args.timeout, "repeat": args.repeat,
            "mem_path": args.mem_path, "notes": []}
    results = []
    t_all = time.monotonic()
    try:
        certdir = os.path.join(tmp, "certs")
        os.makedirs(certdir)
        if "tls" in configs:
            make_certs(certdir)
        for name in names:
            for config in configs:
                for rep in range(args.repeat):
                    log(f"== {name} / {config} / run {rep + 1} of {args.repeat}")
                    run = Run(args, tmp, name, config, certdir, rep)
                    try:
                        res = run.execute_postcopy() if args.postcopy else run.execute()
                    except QMPError as e:
                        res = {"scenario": name, "config": config, "status": "error",
                               "error": str(e)}
                        if "compression" in str(e):
                            meta["notes"].append(f"multifd-compression {args.compression}: {e}")
                    except Exception as e:
                        res = {"scenario": name, "config": config, "status": "error",
                               "error": f"{type(e).__name__}: {e}"}
                    finally:
                        run.cleanup()
                    log(f"   {res['status']}: total {res.get('total_time_ms')} ms, downtime "
                        f"{res.get('downtime_ms')} ms, wire {res.get('wire_bytes')} B, "
                        f"guest: {res.get('guest', res.get('error'))}")
                    results.append(res)
    finally:
        finish_run(meta, t_all, tmp, args.keep, args.json, results=results)
    print(f"QEMU: {version}; max-bandwidth {MAX_BANDWIDTH // 10**9} GB/s; "
          f"wire bytes {'from a private netns loopback' if meta['netns'] else 'unavailable'}; "
          f"run {meta['run_s']} s")
    print_table(results)
    for r in results:
        if r.get("error"):
            print(f"{r['scenario']}/{r['config']}: {r['error']}")
    return 0 if all(r["status"] in ("completed", "not converged") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
