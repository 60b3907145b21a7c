#!/usr/bin/env python3
"""Kills a migrated daemon with SIGKILL at a random moment of a live migration, many times, and checks what must
hold afterwards (issue 17, item 3; bench/README.md "Killed daemons").

Two real daemons on this machine, A and B, each with its own TLS identity (mutual TLS 1.3, certificates made
here with openssl) and migration listener on loopback. Each run boots a memstress guest on A, which verifies its
own memory every second (`verify=ok` on its console), starts migrating it to B, and after a random delay kills
B (even runs) or A (odd runs). The delay is drawn from 0 to the length of a migration, measured once
at the start, so that kills land in setup, pre-copy, switchover and after the end. The source's migration
phase is read just before the kill. Then:

  B killed, migration failed before the commit -> the guest runs on at A, unpaused, verifying; B started again on
      the same socket and port receives it, and it verifies there.
  B killed after the commit, before STARTED    -> A keeps the guest paused, in doubt. As an operator would: ask B
      (started again) whether it runs the guest; it cannot (it died with B), so `migratectl vm resume --force`
      at A, which must then run verifying; then it moves to B as above.
  B killed after the migration completed       -> A shows the VM migrated (the guest died with B).
  A killed, B had not started the guest        -> B records the incoming migration as failed, with why
      (GET /migrations/incoming), holds no memory for it once the grace period for a resume has passed
      (migrated_guest_memory_bytes back to 0), runs no VM.
  A killed after B started the guest           -> the guest runs at B, verifying.
  A killed before any connection reached B     -> B holds no memory and runs no VM.
  Either daemon then starts again on its socket (the stale one taken over) and serves the next run.

Then --hook-runs more (default 2) reach what a random kill almost never hits: B ends itself on reading COMMIT
(the source is left in doubt, and resolved as above) or just before answering VERIFIED, through the daemon's
test hook MIGRATED_FAULT_INJECT (control-api.md §3.7).

Prints one line per run and a table (phase at the kill x outcome); exits 1 if any check failed.
Python 3 standard library only. Usage:

  swift build -c release --product migrated && swift build -c release --product migratectl
  bench/reliability/kill-random.py --runs 50 --bin .build/release
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from testhosts import UnixHTTPConnection, free_port, make_certificates  # noqa: E402  (bench/testhosts.py)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Daemon:
    """One migrated process: started, killed and started again on the same socket and port."""

    def __init__(self, name, work, bin_dir, peer_name, port, budget):
        self.name, self.work, self.bin_dir, self.port = name, work, bin_dir, port
        self.socket = os.path.join(work, f"{name}.sock")
        self.log_path = os.path.join(work, f"{name}.log")
        self.arguments = [
            os.path.join(bin_dir, "migrated"), "--socket", self.socket, "--log-level", "warning",
            "--memory-budget", budget,
            "--tls-certificate", os.path.join(work, f"{name}.pem"), "--tls-key", os.path.join(work, f"{name}.key"),
            "--tls-ca", os.path.join(work, "ca.pem"), "--allow-peer", peer_name,
            "--incoming-listen", f"127.0.0.1:{port}",
            # What a broken pre-copy leaves is kept this long for a resume (stream.md §6.15), then freed.
            "--precopy-resume-grace", str(RESUME_GRACE_SECONDS),
        ]
        self.process = None
        self.starts = 0

    def start(self, environment=None):
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.arguments, stdout=log, stderr=log, env={**os.environ, **(environment or {})})
        self.starts += 1
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start: {self.log_tail()}")
            try:
                if self.api("GET", "/vms")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer on {self.socket}: {self.log_tail()}")

    def kill9(self):
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill9()

    def log_tail(self, lines=5):
        try:
            with open(self.log_path, errors="replace") as log:
                return " | ".join(log.read().splitlines()[-lines:])
        except OSError:
            return ""

    def api(self, method, path, body=None, timeout=10):
        """(status, decoded JSON or text)."""
        connection = UnixHTTPConnection(self.socket, timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read().decode(errors="replace")
            try:
                return response.status, json.loads(raw)
            except ValueError:
                return response.status, raw
        finally:
            connection.close()

    def metric(self, sample):
        status, text = self.api("GET", "/metrics")
        for line in text.splitlines() if status == 200 else []:
            if line.startswith(sample + " "):
                return float(line.split(" ", 1)[1])
        return None

    def ctl(self, *arguments):
        return subprocess.run([os.path.join(self.bin_dir, "migratectl"), *arguments, "--socket", self.socket],
                              capture_output=True, text=True, timeout=60)


class Violation(Exception):
    pass


def check(condition, what):
    if not condition:
        raise Violation(what)


def memstress(line):
    """The fields of a memstress status line, or None."""
    if not line or not line.startswith("memstress t="):
        return None
    fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
    return fields if "ticks" in fields and "verify" in fields else None


def wait_verified(daemon, vm, after_ticks, timeout=30):
    """Waits until VM `vm` at `daemon` runs and prints a status line past `after_ticks` that says verify=ok;
    returns its ticks. A verify=FAIL, a stopped guest or a timeout is a violation."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, info = daemon.api("GET", f"/vms/{vm}")
        if status == 200:
            check(info["state"] in ("running", "paused"), f"{vm} at {daemon.name} is {info['state']}: {info.get('stop_reason')}")
            fields = memstress(info.get("last_console_line"))
            check(not (info.get("last_console_line") or "").startswith("memstress verify=FAIL"),
                  f"{vm} at {daemon.name}: {info.get('last_console_line')}")
            if fields and int(fields["ticks"]) > after_ticks:
                check(fields["verify"] == "ok", f"{vm} at {daemon.name}: {info.get('last_console_line')}")
                return int(fields["ticks"])
        time.sleep(0.1)
    raise Violation(f"{vm} at {daemon.name} printed no verified status after tick {after_ticks} within {timeout} s")


def final_migration(daemon, vm, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, migration = daemon.api("GET", f"/vms/{vm}/migration")
        check(status == 200, f"GET /vms/{vm}/migration at {daemon.name}: {status} {migration}")
        if migration["phase"] in ("completed", "failed", "cancelled"):
            return migration
        time.sleep(0.05)
    raise Violation(f"the migration of {vm} did not end within {timeout} s")


def migrate(a, vm, b, bandwidth):
    body = {"peer": f"127.0.0.1:{b.port}", "channels": 2}
    if bandwidth:
        body["bandwidth_limit_bytes_per_second"] = bandwidth
    status, answer = a.api("POST", f"/vms/{vm}/migrate", body)
    check(status == 202, f"POST /vms/{vm}/migrate: {status} {answer}")


def boot(a, vm, args):
    status, answer = a.api("POST", "/vms", {
        "id": vm, "image": args.image, "memory_mib": args.memory_mib,
        "cmdline": f"workload=memstress size_mib={args.size_mib} rate_mib={args.rate_mib} pattern=mixed"}, timeout=60)
    check(status == 201, f"POST /vms: {status} {answer}")
    return wait_verified(a, vm, 0)


def move_and_verify(a, b, vm, ticks):
    """The guest, running verified at A, moves to B (no cap) and verifies there; then B forgets it."""
    migrate(a, vm, b, None)
    migration = final_migration(a, vm)
    check(migration["phase"] == "completed", f"re-migration of {vm}: {migration.get('report', {}).get('error')}")
    wait_verified(b, vm, ticks)
    b.api("DELETE", f"/vms/{vm}", timeout=30)
    a.api("DELETE", f"/vms/{vm}", timeout=30)


def kill_destination(a, b, vm, ticks, phase):
    """B was killed; returns the outcome after checking its invariants."""
    migration = final_migration(a, vm)
    report = migration.get("report") or {}
    _, info = a.api("GET", f"/vms/{vm}")
    b.start()
    if migration["phase"] == "completed":
        check(info["state"] == "migrated", f"{vm} completed but is {info['state']} at A")
        a.api("DELETE", f"/vms/{vm}")
        return "completed before the kill (guest died with B)"
    if report.get("committed"):
        # In doubt. The operator's decision (control-api.md §3.7): ask B whether it runs the guest.
        check(info["state"] == "paused" and info.get("in_doubt"), f"{vm} committed without STARTED but is {info['state']}, in_doubt {info.get('in_doubt')}")
        status, _ = a.api("POST", f"/vms/{vm}/resume")
        check(status == 409, f"a plain resume of a VM in doubt answered {status}")
        status, there = b.api("GET", f"/vms/{vm}")
        if status == 200 and there["state"] == "running":
            a.api("DELETE", f"/vms/{vm}")
            wait_verified(b, vm, ticks)
            b.api("DELETE", f"/vms/{vm}")
            return "in doubt; found running at B, deleted at A"
        resumed = a.ctl("vm", "resume", vm, "--force")
        check(resumed.returncode == 0, f"migratectl vm resume --force: {resumed.stderr.strip()}")
        ticks = wait_verified(a, vm, ticks)
        move_and_verify(a, b, vm, ticks)
        return "in doubt; not at B, resumed --force, re-migrated"
    check(info["state"] == "running" and not info.get("in_doubt"), f"{vm} failed before commit but is {info['state']} at A")
    ticks = wait_verified(a, vm, ticks)
    move_and_verify(a, b, vm, ticks)
    return "source ran on, re-migrated"


RESUME_GRACE_SECONDS = 2


def kill_source(a, b, vm, records_before, phase):
    """A was killed (and its guest with it); returns the outcome after checking B's invariants."""
    deadline = time.monotonic() + 45  # past B's 10 s header and 30 s channel timeouts
    records = []
    while time.monotonic() < deadline:
        _, listing = b.api("GET", "/migrations/incoming")
        records = listing["migrations"][records_before:] if isinstance(listing, dict) else []
        if records or (phase == "setup" and time.monotonic() > deadline - 33):
            break
        time.sleep(0.1)
    a.start()
    if not records:
        check(b.metric("migrated_guest_memory_bytes") == 0, "B holds memory for a migration it never recorded")
        _, listing = b.api("GET", "/vms")
        check(listing["vms"] == [], f"B runs VMs nobody sent: {listing}")
        return "nothing reached B"
    record = records[-1]
    if record["outcome"] == "received":
        wait_verified(b, record["vm"], 0)
        b.api("DELETE", f"/vms/{record['vm']}", timeout=30)
        return "B had started it; runs there verified"
    check(record.get("error"), "B recorded a failed migration without a reason")
    # A pre-copy that broke is kept for its grace period, and only then freed.
    freed_by = time.monotonic() + RESUME_GRACE_SECONDS + 3
    while b.metric("migrated_guest_memory_bytes") != 0 and time.monotonic() < freed_by:
        time.sleep(0.1)
    check(b.metric("migrated_guest_memory_bytes") == 0, "B kept memory for the discarded guest past its grace period")
    _, listing = b.api("GET", "/vms")
    check(listing["vms"] == [], f"B runs VMs after discarding: {listing}")
    return "B discarded it, memory freed, reason recorded"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--bin", default=os.path.join(REPO, ".build", "release"), help="directory of migrated and migratectl")
    parser.add_argument("--image", default=os.path.join(REPO, "guest", "build", "guest.elf"))
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--size-mib", type=int, default=64, help="memstress working set")
    parser.add_argument("--rate-mib", type=int, default=50, help="memstress writes per second")
    parser.add_argument("--bandwidth", type=int, default=128 << 20, help="cap of the killed migrations, bytes/s")
    parser.add_argument("--hook-runs", type=int, default=2,
                        help="runs more in which B ends itself at a point of the switchover (MIGRATED_FAULT_INJECT), "
                             "alternately on reading COMMIT (the source is left in doubt) and before answering VERIFIED")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    if args.runs < 1 or args.hook_runs < 0:
        parser.error("--runs must be at least 1, --hook-runs at least 0")
    for tool in ("migrated", "migratectl"):
        if not os.access(os.path.join(args.bin, tool), os.X_OK):
            parser.error(f"no {tool} in {args.bin}: swift build -c release --product {tool}, or give --bin")
    if not os.path.isfile(args.image):
        parser.error(f"no guest image at {args.image}: run scripts/setup")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)

    work = tempfile.mkdtemp(prefix="kill-random.")
    make_certificates(work, "kill-ca")
    a = Daemon("host-a", work, args.bin, "host-b", free_port(), "4G")
    b = Daemon("host-b", work, args.bin, "host-a", free_port(), "4G")
    a.start()
    b.start()
    table = Counter()
    violations = []
    try:
        # One migration measured, not killed: the delays are drawn over its length.
        started = time.monotonic()
        ticks = boot(a, "calibrate", args)
        booted = time.monotonic()
        migrate(a, "calibrate", b, args.bandwidth)
        calibration = final_migration(a, "calibrate")
        span = time.monotonic() - booted
        check(calibration["phase"] == "completed", f"calibration: {calibration.get('report', {}).get('error')}")
        wait_verified(b, "calibrate", ticks)
        b.api("DELETE", "/vms/calibrate", timeout=30)
        a.api("DELETE", "/vms/calibrate")
        print(f"seed {seed}; a migration takes {span:.2f} s (boot {booted - started:.2f} s); "
              f"kills are drawn from 0 to {1.0 * span:.2f} s after its start; work in {work}", flush=True)

        for run in range(args.runs):
            victim = b if run % 2 == 0 else a
            vm = f"run{run}"
            delay = rng.uniform(0, 1.0 * span)
            phase = "-"
            try:
                ticks = boot(a, vm, args)
                records_before = len(b.api("GET", "/migrations/incoming")[1]["migrations"])
                migrate(a, vm, b, args.bandwidth)
                kill_at = time.monotonic() + delay
                # The source's phase, read until the moment of the kill.
                while True:
                    _, migration = a.api("GET", f"/vms/{vm}/migration")
                    phase = migration["phase"]
                    if time.monotonic() >= kill_at:
                        break
                    time.sleep(min(0.005, max(0, kill_at - time.monotonic())))
                victim.kill9()
                if victim is b:
                    outcome = kill_destination(a, b, vm, ticks, phase)
                else:
                    outcome = kill_source(a, b, vm, records_before, phase)
            except (Violation, RuntimeError, OSError, KeyError, subprocess.TimeoutExpired) as error:
                outcome = "VIOLATION"
                violations.append(f"run {run} ({victim.name} killed after {delay:.3f} s, source in {phase}): {error}")
                print(f"  ! {violations[-1]}", flush=True)
                print(f"    A: {a.log_tail()}\n    B: {b.log_tail()}", flush=True)
                # Start over from two fresh daemons, so one failure does not spoil the runs after it.
                for daemon in (a, b):
                    daemon.kill9()
                    daemon.start()
            killed = "B (destination)" if victim is b else "A (source)"
            table[(killed, phase, outcome)] += 1
            print(f"run {run:3d}: killed {killed:16s} after {delay:.3f} s, source in {phase:10s} -> {outcome}", flush=True)

        # The moments a random kill almost never hits: B ends itself there (a test hook, control-api.md §3.7).
        for run in range(args.runs, args.runs + args.hook_runs):
            hook = "exit-after-commit" if (run - args.runs) % 2 == 0 else "exit-before-verified"
            vm, phase = f"run{run}", "-"
            try:
                b.stop()
                b.start({"MIGRATED_FAULT_INJECT": hook})
                ticks = boot(a, vm, args)
                migrate(a, vm, b, None)
                while b.process.poll() is None:
                    _, migration = a.api("GET", f"/vms/{vm}/migration")
                    phase = migration["phase"] if migration["phase"] in ("setup", "precopy", "switchover") else phase
                    time.sleep(0.005)
                check(b.process.returncode == 86, f"B exited with {b.process.returncode}, not at its hook")
                outcome = kill_destination(a, b, vm, ticks, phase)
            except (Violation, RuntimeError, OSError, KeyError, subprocess.TimeoutExpired) as error:
                outcome = "VIOLATION"
                violations.append(f"run {run} (B hook {hook}, source in {phase}): {error}")
                print(f"  ! {violations[-1]}", flush=True)
                for daemon in (a, b):
                    daemon.kill9()
                    daemon.start()
            table[(f"B (hook {hook})", phase, outcome)] += 1
            print(f"run {run:3d}: B hook {hook:20s} source in {phase:10s} -> {outcome}", flush=True)
    finally:
        a.stop()
        b.stop()

    print()
    print("| daemon killed | source's phase at the kill | outcome | runs |")
    print("|---|---|---|---|")
    order = {"setup": 0, "precopy": 1, "switchover": 2, "completed": 3, "failed": 4, "cancelled": 5, "-": 6}
    for (killed, phase, outcome), count in sorted(table.items(), key=lambda item: (item[0][0], order.get(item[0][1], 9), item[0][2])):
        print(f"| {killed} | {phase} | {outcome} | {count} |")
    print(f"\n{args.runs} runs and {args.hook_runs} hook runs, {len(violations)} violations; daemons started: A {a.starts}, B {b.starts}; seed {seed}")
    for violation in violations:
        print(f"  {violation}")
    if violations:
        print(f"daemon logs kept in {work}")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
