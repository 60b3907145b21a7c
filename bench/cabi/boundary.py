#!/usr/bin/env python3
"""The C boundary's cost (issue 14), measured with whole processes on this host.

boundary: the same live migration driven by MicroVM in Swift (two `migrated` daemons, migratectl) and by the
  C VMM (examples/c-vmm, two processes linking libmigrated), alternating engines run by run: a 1 GiB guest
  whose memstress rewrites 256 MiB of random pages at 200 MiB/s, mutual TLS 1.3, 2 channels, adaptive
  compression. Reports total time and downtime (from each engine's own report) and the CPU seconds of each
  side's process with its vCPU thread left out, medians and min-max, and the C/Swift ratios.

harvest: the cost per pre-copy pass of the source's dirty-log harvests, KVM mode (libmigrated reads and
  clears KVM's bitmap) against callback mode (c-vmm reads KVM_GET_DIRTY_LOG itself into the library's
  bitmap), with 1 % and 10 % of a 1 GiB guest rewritten continuously (memstress working sets of 10 and 102 MiB
  at 4000 MiB/s). Each run is a migration held in pre-copy (1 ms downtime limit, no auto-converge, 20 passes),
  which then gives up and leaves the source running; c-vmm prints the report's harvest count and time.

Usage: bench/cabi/boundary.py --prefix PREFIX [--repeat N] [--json out.json] [boundary] [harvest]
PREFIX is a `scripts/install` prefix of a release build. Needs root, /dev/kvm, openssl, make, cc.
Standard library only.
"""

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
ELF = os.path.join(REPO, "guest", "build", "guest.elf")

# The daemon benchmark's helpers: daemons, migratectl, CPU accounting, certificates.
sys.dont_write_bytecode = True
_spec = importlib.util.spec_from_file_location("daemon_bench", os.path.join(REPO, "bench", "daemon", "migrate.py"))
daemon_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(daemon_bench)
CPUWatch, Daemon, api, make_certs = daemon_bench.CPUWatch, daemon_bench.Daemon, daemon_bench.api, daemon_bench.make_certs
parse_status, free_port, log = daemon_bench.parse_status, daemon_bench.free_port, daemon_bench.log

GUEST_MIB = 1024
CMDLINE = "workload=memstress size_mib=256 rate_mib=200 pattern=random"
WORKING_SET_PAGES = 256 * 256


class CVMM:
    """One c-vmm process, driven through its stdin commands."""

    def __init__(self, binary, args, console, stderr_path):
        self.console = console
        self.stderr_path = stderr_path
        err = open(stderr_path, "wb")
        self.proc = subprocess.Popen([binary, args[0], "--console", console, *args[1:]], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
                                     preexec_fn=daemon_bench.set_pdeathsig)
        err.close()
        self.pid = self.proc.pid

    def line(self):
        text = self.proc.stdout.readline()
        if not text:
            raise RuntimeError(f"c-vmm exited ({self.proc.poll()}): {self.stderr()[-600:]}")
        return text.strip()

    def expect(self, prefix):
        while True:
            text = self.line()
            if text.startswith(prefix):
                return text
            if text.startswith("error"):
                raise RuntimeError(f"c-vmm: {text}")

    def command(self, text):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.line()

    def stderr(self):
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def last_status(self):
        try:
            with open(self.console, errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        for text in reversed(lines):
            status = parse_status(text)
            if status:
                return status
        return None

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.command("quit")
            except (OSError, RuntimeError, BrokenPipeError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_filled(status_of, want_pages, timeout=120):
    start = time.monotonic()
    while True:
        status = status_of()
        if status and status["verify"] != "ok":
            raise RuntimeError(f"guest reports verify={status['verify']}")
        if status and status["pages"] >= want_pages:
            return round(time.monotonic() - start, 2)
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"guest did not fill {want_pages} pages in {timeout}s")
        time.sleep(0.05)


def sampled(watches, call):
    """Runs `call` on a thread while the CPU watches sample the processes' threads (a source's vCPU thread exits
    at switchover and takes its counters with it); returns what it returned."""
    result = {}

    def run():
        try:
            result["value"] = call()
        except Exception as error:  # noqa: BLE001 - handed to the caller
            result["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    while thread.is_alive():
        for watch in watches:
            watch.sample()
        thread.join(0.02)
    for watch in watches:
        watch.stop()
    if "error" in result:
        raise result["error"]
    return result["value"]


def kv(text):
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", text)}


def c_vmm_binary(prefix, build_dir):
    env = dict(os.environ, PKG_CONFIG_PATH=os.path.join(prefix, "lib", "pkgconfig"))
    subprocess.run(["make", "-s", "-C", os.path.join(REPO, "examples", "c-vmm"), f"BUILD={build_dir}"], env=env, check=True)
    return os.path.join(build_dir, "c-vmm")


def tls_arg(certdir, name, peer):
    return f"{certdir}/ca.pem,{certdir}/{name}.pem,{certdir}/{name}.key,{peer}"


def run_c(args, binary, tmp, certdir, rep):
    d = os.path.join(tmp, f"c-{rep}")
    os.makedirs(d)
    src = CVMM(binary, ["run", "--kernel", ELF, "--memory", f"{GUEST_MIB}M", "--cmdline", CMDLINE],
               os.path.join(d, "a.console"), os.path.join(d, "a.err"))
    dst = None
    try:
        src.expect("ok running")
        fill = wait_filled(src.last_status, WORKING_SET_PAGES)
        dst = CVMM(binary, ["receive", "--listen", "127.0.0.1:0", "--tls", tls_arg(certdir, "host-b", "host-a")],
                   os.path.join(d, "b.console"), os.path.join(d, "b.err"))
        address = dst.expect("ok listening").split()[2]
        cpu_src, cpu_dst = CPUWatch(src.pid), CPUWatch(dst.pid)

        def migrate():
            reply = src.command(f"migrate {address} channels=2 compression=adaptive tls={tls_arg(certdir, 'host-a', 'host-b')}")
            if not reply.startswith("ok migrated"):
                raise RuntimeError(reply)
            dst.expect("ok received")
            return reply

        reply = sampled([cpu_src, cpu_dst], migrate)
        report = kv(reply)
        before = src.last_status()
        after = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            after = dst.last_status()
            if after and (before is None or after["ticks"] > before["ticks"]):
                break
            time.sleep(0.05)
        verified = bool(after and after["verify"] == "ok")
        return {"engine": "c-vmm", "repeat": rep, "fill_s": fill, "total_s": report["total"],
                "downtime_ms": report["downtime"] * 1000, "wire_bytes": int(report["wire_bytes"]),
                "src_cpu": cpu_src.result(), "dst_cpu": cpu_dst.result(), "verified": verified}
    finally:
        src.stop()
        if dst:
            dst.stop()


def run_swift(args, tmp, certdir, rep):
    d = os.path.join(tmp, f"swift-{rep}")
    os.makedirs(d)
    port = free_port()
    opts = argparse.Namespace(bin=os.path.join(args.prefix, "bin"), memory_budget="8G", guest_memory="shared-memory")
    src = Daemon(opts, d, "host-a", "host-b", certdir)
    dst = Daemon(opts, d, "host-b", "host-a", certdir, listen=f"127.0.0.1:{port}")
    ctl = os.path.join(args.prefix, "bin", "migratectl")
    try:
        subprocess.run([ctl, "vm", "start", "--id", "bench", "--image", ELF, "--memory", f"{GUEST_MIB}M",
                        "--cmdline", CMDLINE, "--socket", src.sock], check=True, stdout=subprocess.DEVNULL)

        def status():
            return parse_status((api(src.sock, "GET", "/vms/bench")[1] or {}).get("last_console_line"))

        fill = wait_filled(status, WORKING_SET_PAGES)
        cpu_src, cpu_dst = CPUWatch(src.pid), CPUWatch(dst.pid)
        r = sampled([cpu_src, cpu_dst], lambda: subprocess.run(
            [ctl, "migrate", "bench", "--to", f"127.0.0.1:{port}", "--channels", "2", "--compression", "adaptive",
             "--socket", src.sock, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120))
        doc = json.loads(r.stdout)
        rep_doc = doc.get("report") or {}
        if not rep_doc.get("succeeded"):
            raise RuntimeError(f"migration failed: {rep_doc.get('error') or r.stderr[-400:]}")
        after = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            after = parse_status((api(dst.sock, "GET", "/vms/bench")[1] or {}).get("last_console_line"))
            if after:
                break
            time.sleep(0.05)
        return {"engine": "swift", "repeat": rep, "fill_s": fill, "total_s": rep_doc["total_seconds"],
                "downtime_ms": rep_doc["downtime_ms"], "wire_bytes": rep_doc["wire_bytes"],
                "src_cpu": cpu_src.result(), "dst_cpu": cpu_dst.result(), "verified": bool(after and after["verify"] == "ok")}
    finally:
        src.stop()
        dst.stop()


def run_harvest(binary, tmp, mode, percent, rep):
    d = os.path.join(tmp, f"harvest-{mode}-{percent}-{rep}")
    os.makedirs(d)
    size = {1: 10, 10: 102}[percent]
    src = CVMM(binary, ["run", "--kernel", ELF, "--memory", f"{GUEST_MIB}M", "--dirty", mode,
                        "--cmdline", f"workload=memstress size_mib={size} rate_mib=4000"],
               os.path.join(d, "a.console"), os.path.join(d, "a.err"))
    dst = CVMM(binary, ["receive", "--listen", "127.0.0.1:0"], os.path.join(d, "b.console"), os.path.join(d, "b.err"))
    try:
        src.expect("ok running")
        wait_filled(src.last_status, size * 256)
        address = dst.expect("ok listening").split()[2]
        reply = src.command(f"migrate {address} compression=none downtime_ms=1 max_passes=20 no_auto_converge")
        found = re.findall(r"migration report: (.*)", src.stderr())
        if not found:
            raise RuntimeError(f"no report line: {reply}")
        report = kv(found[-1])
        return {"mode": mode, "percent": percent, "repeat": rep, "outcome": reply.split(":")[0],
                "passes": int(report["passes"]), "harvests": int(report["harvests"]),
                "harvest_s": report["harvest_seconds"],
                "ms_per_pass": 1000 * report["harvest_seconds"] / max(1, report["passes"])}
    finally:
        src.stop()
        dst.stop()


def spread(values, f="{:.3f}"):
    return f"{f.format(statistics.median(values))} ({f.format(min(values))}–{f.format(max(values))})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", required=True, help="a scripts/install prefix (release build)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("benchmarks", nargs="*", default=["boundary", "harvest"])
    args = parser.parse_args()
    args.prefix = os.path.abspath(args.prefix)
    results = {"boundary": [], "harvest": [], "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="cabi-bench-") as tmp:
        certdir = os.path.join(tmp, "certs")
        os.makedirs(certdir)
        make_certs(certdir)
        binary = c_vmm_binary(args.prefix, os.path.join(tmp, "c-vmm"))
        if "boundary" in args.benchmarks:
            for rep in range(args.repeat):
                for engine in (("swift", "c-vmm") if rep % 2 == 0 else ("c-vmm", "swift")):
                    r = run_swift(args, tmp, certdir, rep) if engine == "swift" else run_c(args, binary, tmp, certdir, rep)
                    log(f"boundary {engine} #{rep}: total {r['total_s']:.3f} s, downtime {r['downtime_ms']:.0f} ms, "
                        f"cpu src {r['src_cpu']} dst {r['dst_cpu']}, verified {r['verified']}")
                    results["boundary"].append(r)
        if "harvest" in args.benchmarks:
            for rep in range(args.repeat):
                for percent in (1, 10):
                    for mode in (("bitmap", "callback") if rep % 2 == 0 else ("callback", "bitmap")):
                        r = run_harvest(binary, tmp, mode, percent, rep)
                        log(f"harvest {mode} {percent}% #{rep}: {r['passes']} passes, {r['harvests']} harvests, "
                            f"{r['ms_per_pass']:.3f} ms per pass ({r['outcome']})")
                        results["harvest"].append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if results["boundary"]:
        print("\n| engine | total s | downtime ms | source CPU s (no vCPU) | destination CPU s (no vCPU) | verified |")
        print("|---|---|---|---|---|---|")
        med = {}
        for engine in ("swift", "c-vmm"):
            rs = [r for r in results["boundary"] if r["engine"] == engine]
            if not rs:
                continue
            cols = {"total": [r["total_s"] for r in rs], "downtime": [r["downtime_ms"] for r in rs],
                    "src": [r["src_cpu"][2] for r in rs], "dst": [r["dst_cpu"][2] for r in rs]}
            med[engine] = {k: statistics.median(v) for k, v in cols.items()}
            print(f"| {engine} | {spread(cols['total'])} | {spread(cols['downtime'], '{:.0f}')} | {spread(cols['src'], '{:.2f}')} | "
                  f"{spread(cols['dst'], '{:.2f}')} | {sum(r['verified'] for r in rs)}/{len(rs)} |")
        if len(med) == 2:
            ratios = ", ".join(f"{k} {med['c-vmm'][k] / med['swift'][k]:.2f}" for k in ("total", "downtime", "src", "dst") if med["swift"][k])
            print(f"\nC VMM / MicroVM, medians: {ratios}")
    if results["harvest"]:
        print("\n| dirty | KVM mode (bitmap) ms per pass | callback mode ms per pass | passes per run |")
        print("|---|---|---|---|")
        for percent in (1, 10):
            cells = []
            for mode in ("bitmap", "callback"):
                rs = [r["ms_per_pass"] for r in results["harvest"] if r["mode"] == mode and r["percent"] == percent]
                cells.append(spread(rs) if rs else "-")
            passes = [r["passes"] for r in results["harvest"] if r["percent"] == percent]
            print(f"| {percent} % | {cells[0]} | {cells[1]} | {statistics.median(passes):.0f} |")


if __name__ == "__main__":
    main()
