#!/usr/bin/env python3
"""Throws malformed HTTP at a running migrated's control socket for a while (control-api.md §1.1).

Passes when the daemon answered GET /vms throughout, never answered 5xx (503 for a full connection table
excepted), answered every request whose kind demands an answer with a 4xx, and every VM that ran at the start
still runs. Usage: fuzz_control.py SOCKET [--seconds 30] [--workers 8] [--pid PID] [--seed N]
"""
import argparse
import json
import random
import socket
import sys
import threading
import time

TEMPLATES = [
    b"GET /vms HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /vms/fuzz-nope HTTP/1.1\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"DELETE /vms/fuzz-nope HTTP/1.1\r\n\r\n",
    b"POST /vms/fuzz-nope/stop HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    b"GET /vms/fuzz-nope/migration HTTP/1.1\r\n\r\n",
]
# Bodies that can never start or touch a real VM: a missing image, an id no VM has.
BODIES = [
    ("/vms", {"image": "/nonexistent/fuzz.elf", "memory_mib": 64, "id": "fuzz-x", "vcpus": 1, "cmdline": "a"}),
    ("/vms/fuzz-nope/migrate", {"peer": "10.0.0.2:7070", "channels": 2, "compression": "lz4", "auto_converge": True}),
    ("/vms/fuzz-nope/snapshot", {"path": "/nonexistent/fuzz.snap", "kind": "full", "live": True}),
    ("/snapshots/restore", {"path": "/nonexistent/fuzz.snap", "lazy": True, "id": "fuzz-y"}),
]
WEIRD_VALUES = [None, True, -1, 2**70, 1.5e308, "", "x" * 5000, [], {}, [[[[]]]], {"a": {"b": {"c": 1}}}, "\u0000\ud7ff"]


def post(path, body: bytes, extra=b""):
    return b"POST %s HTTP/1.1\r\nContent-Length: %d\r\n%s\r\n" % (path.encode(), len(body), extra) + body


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if not data:
            data += bytes([rng.randrange(256)])
        choice = rng.randrange(5)
        at = rng.randrange(len(data))
        if choice == 0:
            data[at] = rng.randrange(256)
        elif choice == 1:
            del data[at:at + rng.randint(1, 16)]
        elif choice == 2:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif choice == 3:
            data[at:at] = rng.choice([b"\r\n", b"\n", b":", b" ", b"\x00", b"%", b"Content-Length: 7\r\n"])
        else:
            end = min(len(data), at + rng.randint(1, 64))
            data[at:at] = data[at:end] * rng.randint(1, 50)
    return bytes(data)


def request(rng: random.Random):
    """A request and whether a complete answer is owed for it (True), or anything but a 5xx will do (False)."""
    kind = rng.randrange(10)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 400))) + b"\r\n\r\n", False
    if kind == 1:
        return b"GET /" + b"a" * rng.randint(8200, 100_000) + b" HTTP/1.1\r\n\r\n", True
    if kind == 2:
        return b"GET /vms HTTP/1.1\r\n" + b"X-Pad: " + b"p" * rng.randint(17_000, 200_000) + b"\r\n\r\n", True
    if kind == 3:
        return b"POST /vms HTTP/1.1\r\nContent-Length: %d\r\n\r\n{" % rng.randint(1 << 20 | 1, 1 << 40), True
    if kind == 4:
        path, body = rng.choice(BODIES)
        body = dict(body)
        for key in rng.sample(list(body), rng.randint(1, len(body))):
            body[key] = rng.choice(WEIRD_VALUES)
        if rng.random() < 0.3:
            body[rng.choice(["colour", "memroy_mib", "x" * 300])] = 1
        return post(path, json.dumps(body).encode()), True
    if kind == 5:
        path, body = rng.choice(BODIES)
        return post(path, mutate(json.dumps(body).encode(), rng)), True
    if kind == 6:
        method = rng.choice([b"BREW", b"PATCH", b"OPTIONS", b"TRACE", b"CONNECT", b"get", b"G" * 300])
        return method + b" " + rng.choice([b"/vms", b"/x/y/z", b"/vms/%00", b"/../../etc", b"/vms?x=1#f"]) + b" HTTP/1.1\r\n\r\n", True
    if kind == 7:
        return b"POST /vms HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", True
    return mutate(rng.choice(TEMPLATES + [post(p, json.dumps(b).encode()) for p, b in BODIES]), rng), False


def exchange(path, data: bytes, rng: random.Random, timeout=5.0):
    """Sends `data` (sometimes only part of it, sometimes in dribbles) and returns the first status, or None."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(path)
        half = rng.random() < 0.05
        try:
            if half:
                conn.sendall(data[: rng.randrange(max(1, len(data)))])
                return "half"
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon refused before taking everything; its answer is still there to read
        reply = b""
        try:
            while b"\r\n" not in reply:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        try:
            return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else None
        except (IndexError, ValueError):
            return None


def get(path, target, timeout=3.0):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(path)
        conn.sendall(b"GET %s HTTP/1.1\r\nConnection: close\r\n\r\n" % target.encode())
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def running_vms(path):
    status, body = get(path, "/vms")
    assert status == 200, status
    return {vm["id"] for vm in json.loads(body)["vms"] if vm["state"] == "running"}


def rss_kib(pid):
    if not pid:
        return None
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("socket")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--pid", type=int, help="the daemon's pid, to report its RSS")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()

    vms_before = running_vms(args.socket)
    rss_before = rss_kib(args.pid)
    stop = time.monotonic() + args.seconds
    lock = threading.Lock()
    counts, failures = {}, []

    def record(key, failure=None):
        with lock:
            counts[key] = counts.get(key, 0) + 1
            if failure and len(failures) < 20:
                failures.append(failure)

    def worker(index):
        rng = random.Random(args.seed * 1000 + index)
        while time.monotonic() < stop:
            data, owed = request(rng)
            try:
                status = exchange(args.socket, data, rng)
            except OSError as error:
                record("connect-error", f"connect: {error}")
                continue
            if status == "half":
                record("half-sent")
            elif status is None:
                record("no-answer", f"no answer to {data[:80]!r}" if owed else None)
            else:
                bad = status >= 500 and status != 503
                record(f"{status // 100}xx", f"{status} for {data[:80]!r}" if bad else None)

    def health():
        while time.monotonic() < stop:
            try:
                status, _ = get(args.socket, "/vms")
                record("health-ok" if status == 200 else "health-failed", None if status == 200 else f"GET /vms: {status}")
            except OSError as error:
                record("health-failed", f"GET /vms: {error}")
            time.sleep(0.25)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.workers)] + [threading.Thread(target=health)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    vms_after = running_vms(args.socket)
    rss_after = rss_kib(args.pid)
    print(f"fuzz-control: seed {args.seed}, {args.seconds:g}s, {args.workers} workers: "
          + ", ".join(f"{key} {value}" for key, value in sorted(counts.items())))
    if rss_before is not None:
        print(f"fuzz-control: daemon RSS {rss_before // 1024} MiB before, {rss_after // 1024} MiB after")
    if vms_before - vms_after:
        failures.append(f"VMs that stopped running: {sorted(vms_before - vms_after)}")
    for failure in failures:
        print("fuzz-control: FAIL:", failure)
    sys.exit(1 if failures or counts.get("health-failed") else 0)


if __name__ == "__main__":
    main()
