#!/usr/bin/env python3
"""QEMU side of the issue-5 snapshot benchmark.

Saves the test guest (guest/build/guest.elf, memstress; 4 GiB of RAM holding
1 GiB of data) to a file with QMP `migrate` to `exec:cat > FILE`, paused
(`stop` first) and live, and loads it into a new QEMU with
`-incoming "exec:cat FILE"`, timing from process start until `query-status`
says running. Also: the same file loaded into a QEMU already up
(`-incoming defer` + `migrate-incoming`), and saves through an lz4 or zstd
process in the pipe (`exec:lz4 -1 > FILE`, `exec:zstd -3 > FILE`), the same
codecs and levels as migrated's compressed snapshots. Every row is repeated
--repeat times; the table shows medians with min and max.

Usage: bench/qemu/snapshot.py [--repeat N] [--quick] [--dir PATH] [--json out.json]
Standard library only (reuses bench/qemu/migrate.py). Needs /dev/kvm, qemu-system-x86_64, and lz4/zstd for the compressed rows.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import migrate as qm  # noqa: E402  (QMP client, serial parsing, guest path, max-bandwidth)

PAGE = qm.PAGE
log = qm.log


def median(values):
    v = sorted(values)
    n = len(v)
    if not n:
        return None
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


class Row:
    def __init__(self, group, name):
        self.group, self.name = group, name
        self.samples = {}
        self.info = {}

    def add(self, metric, value):
        if value is not None:
            self.samples.setdefault(metric, []).append(value)

    def med(self, metric):
        return median(self.samples.get(metric, []))

    def spread(self, metric, fmt):
        v = self.samples.get(metric)
        if not v:
            return "-"
        m = fmt.format(median(v))
        return m if len(v) == 1 else f"{m} ({fmt.format(min(v))}–{fmt.format(max(v))})"

    def json(self):
        return {"group": self.group, "name": self.name, "info": self.info,
                "metrics": {k: {"median": median(v), "min": min(v), "max": max(v), "samples": v}
                            for k, v in self.samples.items()}}


def sizes(path):
    st = os.stat(path)
    return st.st_size, st.st_blocks * 512


def fsync_file(path):
    t = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - t


def evict(path):
    """Drops the (synced, clean) file from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path):
    """Fraction of the file's allocated bytes in the page cache (fincore), or None."""
    if not shutil.which("fincore"):
        return None
    r = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        return min(1.0, int(r.stdout.split()[0]) / max(1, sizes(path)[1]))
    except (ValueError, IndexError):
        return None


class Bench:
    def __init__(self, args, tmp, files):
        self.args, self.tmp, self.files = args, tmp, files
        self.mem = 256 if args.quick else 4096
        self.data_mib = 64 if args.quick else 1024
        self.cmdline = f"workload=memstress size_mib={self.data_mib} rate_mib=0 pattern={args.pattern}"
        self.rows = []
        self.procs = []
        self.serial_n = 0

    def row(self, group, name):
        for r in self.rows:
            if r.group == group and r.name == name:
                return r
        r = Row(group, name)
        self.rows.append(r)
        return r

    def start_qemu(self, role, extra):
        self.serial_n += 1
        qmp = os.path.join(self.tmp, f"{role}-{self.serial_n}.qmp")
        serial = os.path.join(self.tmp, f"{role}-{self.serial_n}.serial")
        # The command line of migrate.py: -M microvm (no SeaBIOS), serial to a file, QMP on a Unix socket.
        cmd = [self.args.qemu, "-name", f"{role},debug-threads=on",
               "-accel", "kvm", "-M", "microvm", "-m", str(self.mem),
               "-display", "none", "-serial", f"file:{serial}", "-monitor", "none",
               "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
               "-kernel", qm.ELF, "-append", self.cmdline,
               "-qmp", f"unix:{qmp},server=on,wait=off", *extra]
        self.last_stderr = os.path.join(self.tmp, f"{role}-{self.serial_n}.stderr")
        err = open(self.last_stderr, "wb")
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                             preexec_fn=qm.set_pdeathsig)
        err.close()
        self.procs.append(p)
        # Poll finely for the socket so that QMP(...) connects at its first try.
        while not os.path.exists(qmp):
            if p.poll() is not None:
                raise RuntimeError(f"QEMU exited ({p.returncode}): {self.stderr_tail()}")
            if time.monotonic() - t0 > 30:
                raise RuntimeError("QMP socket did not appear")
            time.sleep(0.001)
        q = qm.QMP(qmp)
        return p, q, serial, t0

    def stderr_tail(self):
        try:
            with open(self.last_stderr, errors="replace") as f:
                return f.read()[-300:]
        except OSError:
            return ""

    def stop_qemu(self, p, q):
        try:
            q.cmd("quit")
        except Exception:
            pass
        q.close()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def wait_populated(self, p, serial, t0):
        want = self.data_mib * 256
        while True:
            lines, text = qm.status_lines(serial)
            if lines and lines[-1]["pages"] >= want and lines[-1]["verify"] == "ok":
                return time.monotonic() - t0
            if p.poll() is not None:
                raise RuntimeError(f"source QEMU exited ({p.returncode}): {text[-300:]}")
            if time.monotonic() - t0 > 180:
                raise RuntimeError(f"guest did not fill {want} pages in 180 s")
            time.sleep(0.05)

    # ------------------------------------------------------------------ save
    def save(self, q, uri, path, row, paused):
        if os.path.exists(path):
            os.unlink(path)
        if paused:
            q.cmd("stop")
        t0 = time.monotonic()
        q.cmd("migrate", uri=uri)
        while True:
            info = q.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(self.args.poll)
        wall = time.monotonic() - t0
        if info.get("status") != "completed":
            raise RuntimeError(f"migrate to {uri}: {info.get('status')} {info.get('error-desc')}")
        # QEMU does not sync the file; migrated's snapshots are synced, so report both.
        sync_s = fsync_file(path)
        q.cmd("cont")  # from postmigrate (both live and paused saves end with the VM stopped)
        ram = info.get("ram", {})
        total_s = info["total-time"] / 1000
        normal = ram.get("normal", 0) * PAGE
        apparent, on_disk = sizes(path)
        self.files.add(path)
        row.add("seconds", total_s)
        row.add("wall s", wall)
        row.add("seconds with fsync", total_s + sync_s)
        row.add("fsync s", sync_s)
        row.add("GB/s", normal / total_s / 1e9)
        row.add("GB/s with fsync", normal / (total_s + sync_s) / 1e9)
        row.add("downtime ms", None if paused else info.get("downtime"))
        row.add("data pages", ram.get("normal"))
        row.add("zero pages", ram.get("duplicate"))
        row.add("passes", ram.get("dirty-sync-count"))
        row.add("file bytes", apparent)
        row.add("file bytes on disk", on_disk)
        return normal

    # ------------------------------------------------------------------ load
    def wait_running(self, p, q, t0, deadline_s=120):
        while True:
            s = q.cmd("query-status")
            if s.get("running"):
                return time.monotonic() - t0
            if s.get("status") not in ("inmigrate", "prelaunch", "paused", "running"):
                raise RuntimeError(f"incoming QEMU in state {s}")
            if p.poll() is not None:
                raise RuntimeError(f"incoming QEMU exited ({p.returncode})")
            if time.monotonic() - t0 > deadline_s:
                raise RuntimeError(f"not running after {deadline_s} s: {s}")
            time.sleep(0.002)

    def guest_ok(self, serial):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines, text = qm.status_lines(serial)
            if "verify=FAIL" in text:
                return False
            if lines and lines[-1]["verify"] == "ok":
                return True
            time.sleep(0.05)
        return False

    def load(self, uri, path, row, cold, data_bytes, deferred=False):
        if cold:
            evict(path)
        row.add("resident before", resident_fraction(path))
        if deferred:
            p, q, serial, t_proc = self.start_qemu("dst", ["-incoming", "defer"])
            row.add("process start to QMP s", time.monotonic() - t_proc)
            t0 = time.monotonic()
            q.cmd("migrate-incoming", uri=uri)
        else:
            p, q, serial, t0 = self.start_qemu("dst", ["-incoming", uri])
            row.add("process start to QMP s", time.monotonic() - t0)
        try:
            seconds = self.wait_running(p, q, t0)
            row.add("seconds", seconds)
            row.add("GB/s", data_bytes / seconds / 1e9)
            row.add("guest verify ok", 1 if self.guest_ok(serial) else 0)
        finally:
            self.stop_qemu(p, q)

    # ------------------------------------------------------------------ run
    def run(self):
        d = self.args.dir
        plain, lz4, zst = (os.path.join(d, n) for n in ("qemu-plain.mig", "qemu-lz4.mig", "qemu-zstd.mig"))
        have_lz4, have_zstd = shutil.which("lz4"), shutil.which("zstd")
        src, sq, src_serial, t0 = self.start_qemu("src", [])
        try:
            fill = self.wait_populated(src, src_serial, t0)
            log(f"guest populated in {fill:.1f} s: {self.cmdline}")
            sq.cmd("migrate-set-parameters", **{"max-bandwidth": qm.MAX_BANDWIDTH})
            data = {}
            for rep in range(1, self.args.repeat + 1):
                log(f"repetition {rep}/{self.args.repeat}: saves")
                self.save(sq, f"exec:cat > {plain}", plain, self.row("save", "exec:cat, paused"), paused=True)
                data["plain"] = self.save(sq, f"exec:cat > {plain}", plain, self.row("save", "exec:cat, live"), paused=False)
                if have_lz4 and not self.args.no_compress:
                    data["lz4"] = self.save(sq, f"exec:lz4 -1 -q > {lz4}", lz4, self.row("save", "exec:lz4 -1, live"), paused=False)
                if have_zstd and not self.args.no_compress:
                    data["zstd"] = self.save(sq, f"exec:zstd -3 -q > {zst}", zst, self.row("save", "exec:zstd -3, live"), paused=False)
                # The source is paused while the loads run (its verification pass each second would compete).
                sq.cmd("stop")
                log(f"repetition {rep}/{self.args.repeat}: loads")
                loads = [("plain", f"exec:cat {plain}", plain)]
                if "lz4" in data:
                    loads.append(("lz4", f"exec:lz4 -dc -q {lz4}", lz4))
                if "zstd" in data:
                    loads.append(("zstd", f"exec:zstd -dc -q {zst}", zst))
                for name, uri, path in loads:
                    for cold in (False, True):
                        cache = "cold" if cold else "warm"
                        self.load(uri, path, self.row("load", f"-incoming {name}, {cache} cache"), cold, data[name])
                for cold in (False, True):
                    cache = "cold" if cold else "warm"
                    self.load(f"exec:cat {plain}", plain, self.row("load", f"-incoming defer + migrate-incoming plain, {cache} cache"),
                              cold, data["plain"], deferred=True)
                sq.cmd("cont")
        finally:
            self.stop_qemu(src, sq)
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def print_tables(b, version, run_s):
    print(f"\nQEMU snapshots: {version}; {b.mem} MiB guest, {b.data_mib} MiB of {b.args.pattern} data; "
          f"medians of {b.args.repeat} (min–max); run {run_s:.0f} s")
    print("\n| save | seconds | GB/s | + fsync: seconds | GB/s | downtime ms | data pages | file MB apparent / on disk |")
    print("|---|---|---|---|---|---|---|---|")
    for r in b.rows:
        if r.group != "save":
            continue
        mb = lambda m: "-" if r.med(m) is None else f"{r.med(m) / 1e6:.0f}"
        print(f"| {r.name} | {r.spread('seconds', '{:.3f}')} | {r.spread('GB/s', '{:.2f}')} | "
              f"{r.spread('seconds with fsync', '{:.3f}')} | {r.spread('GB/s with fsync', '{:.2f}')} | "
              f"{r.spread('downtime ms', '{:.0f}')} | {r.spread('data pages', '{:.0f}')} | "
              f"{mb('file bytes')} / {mb('file bytes on disk')} |")
    print("\n| load (until query-status says running) | seconds | GB/s | process start to QMP s | file resident before | guest verified |")
    print("|---|---|---|---|---|---|")
    for r in b.rows:
        if r.group != "load":
            continue
        res = r.med("resident before")
        ok = r.samples.get("guest verify ok", [])
        print(f"| {r.name} | {r.spread('seconds', '{:.3f}')} | {r.spread('GB/s', '{:.2f}')} | "
              f"{r.spread('process start to QMP s', '{:.3f}')} | {'-' if res is None else f'{res * 100:.0f} %'} | "
              f"{sum(ok)}/{len(ok)} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=None, help="repetitions of every row (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="256 MiB guest with 64 MiB of data (smoke run)")
    ap.add_argument("--dir", help="directory for the files (default: a new temp dir under /var/tmp, on disk)")
    ap.add_argument("--json", help="write all figures to this file")
    ap.add_argument("--pattern", default="text", choices=["text", "random", "mixed"])
    ap.add_argument("--no-compress", action="store_true", help="skip the lz4/zstd pipe rows")
    ap.add_argument("--poll", type=float, default=0.005, help="query-migrate interval, s")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (serial logs, QEMU stderr)")
    args = ap.parse_args()
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    r = subprocess.run(["make", "-s", "-C", os.path.join(qm.REPO, "guest")],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        sys.exit(f"make -C guest failed:\n{r.stdout}")
    version = subprocess.run([args.qemu, "--version"], stdout=subprocess.PIPE, text=True).stdout.splitlines()[0]

    tmp = tempfile.mkdtemp(prefix="qemu-snapshot-bench-")
    own_dir = args.dir is None
    if own_dir:
        args.dir = tempfile.mkdtemp(prefix="qemu-snapshot-files-", dir="/var/tmp")
    else:
        os.makedirs(args.dir, exist_ok=True)
    files = set()
    b = Bench(args, tmp, files)
    meta = {"qemu": version, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "loadavg_start": open("/proc/loadavg").read().split()[:3], "max_bandwidth": qm.MAX_BANDWIDTH,
            "guest_mem_mib": b.mem, "data_mib": b.data_mib, "cmdline": b.cmdline, "repeat": args.repeat,
            "dir": args.dir, "notes": [],
            "cache": "warm: the file as the save left it (synced, in the page cache); cold: posix_fadvise(DONTNEED)"}
    t_all = time.monotonic()
    status = 0
    try:
        b.run()
    except Exception as e:
        meta["notes"].append(f"{type(e).__name__}: {e}")
        log(f"error: {type(e).__name__}: {e}")
        status = 1
    finally:
        for f in files:
            try:
                os.unlink(f)
            except OSError:
                pass
        if own_dir:
            shutil.rmtree(args.dir, ignore_errors=True)
        if args.keep:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    run_s = time.monotonic() - t_all
    meta["run_s"] = round(run_s, 1)
    meta["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    print_tables(b, version, run_s)
    for n in meta["notes"]:
        print(f"note: {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": [r.json() for r in b.rows]}, f, indent=2)
    return status


if __name__ == "__main__":
    sys.exit(main())
