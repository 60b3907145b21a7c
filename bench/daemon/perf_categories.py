#!/usr/bin/env python3
"""Where a daemon's CPU went during a migration: the samples of a `bench/daemon/migrate.py --perf DIR` profile
(or any `perf record -g` file) attributed to categories by their call chains, first match wins: page faults
(shmem, hugetlb, anonymous), recv (the copy out of the socket, the rest of TCP), pwritev into the memfd (the copy,
the page allocation in shmem_write_begin, the rest), OpenSSL, the memory digest's hash, CRC32C, user memcpy, the
Swift runtime, and the engine's own code. Used for issue 16 item 1 (bench/README.md).

    perf script -i DIR/random1g-tcp-none-1ch-0-dst.data -F comm,tid,period,ip,sym,dso | \
        python3 bench/daemon/perf_categories.py [--hz 1999] [-v]

-v lists the leaf functions of the larger categories. --hz is perf record's -F (migrate.py uses 1999), which turns
sample counts into CPU seconds: this host has no PMU, so perf samples cpu-clock, and time spent with interrupts
disabled is reported where they are enabled again (_raw_spin_unlock_irq*), still inside the right call chain.
"""
import argparse
import collections
import re
import sys


def parse(stream):
    stack = []
    for line in stream:
        line = line.rstrip("\n")
        if not line.strip():
            if stack: yield stack
            stack = []
            continue
        if not line.startswith("\t") and not line.startswith(" "):
            if stack: yield stack
            stack = []
            continue
        m = re.match(r"\s*[0-9a-f]+ (.*) \((.*)\)$", line)
        if m: stack.append((m.group(1), m.group(2)))
    if stack: yield stack

def category(stack):
    syms = [s for s, _ in stack]
    leaf, leafdso = stack[0]
    has = lambda *names: any(any(n in s for n in names) for s in syms)
    kernel = "kernel" in leafdso
    if has("asm_exc_page_fault"):
        zero = "clear_page" in leaf or "clear_huge_page" in leaf or "folio_zero" in leaf
        if has("hugetlb_fault"):
            return "page fault: hugetlb, zeroing 2 MiB" if zero else "page fault: hugetlb, other"
        if has("shmem_fault", "shmem_get_folio"):
            return "page fault: shmem, zeroing" if zero else "page fault: shmem, other"
        return "page fault: anonymous (buffers)"
    if has("tcp_recvmsg", "sock_recvmsg", "__sys_recvfrom", "sock_read_iter"):
        return "recv: copy socket -> user" if leaf in ("_copy_to_iter", "rep_movs_alternative", "copy_user_generic") or "copy_to_iter" in leaf else "recv: other (TCP, skb free, syscall) | " + leaf
    if has("shmem_fallocate"):
        return "fallocate punch hole (zero pages)"
    if has("shmem_file_write_iter", "do_pwritev", "vfs_writev", "do_iter_write"):
        if "copy_folio_from_iter" in leaf or "copy_user" in leaf or leaf == "rep_movs_alternative":
            return "pwritev: copy into shmem page"
        if has("shmem_write_begin"):
            return "pwritev: allocate + charge shmem page (write_begin) | " + leaf
        return "pwritev: other (write_end, dirty accounting, syscall) | " + leaf
    if has("tcp_sendmsg", "__sys_sendto", "sock_write_iter", "__sys_sendmsg"):
        return "send (replies)"
    if has("kvm_vcpu_ioctl", "kvm_vm_ioctl"):
        return "KVM ioctls"
    if has("__x64_sys_futex", "futex_", "schedule", "finish_task_switch", "do_epoll", "do_sys_poll", "__x64_sys_poll", "__x64_sys_ppoll"):
        return "futex / poll / scheduling"
    if has("__x64_sys_munmap", "__x64_sys_mmap", "__x64_sys_madvise", "__vm_munmap", "do_mmap", "exit_mmap", "tlb_finish_mmu", "unmap_region"):
        return "mmap / munmap / madvise"
    if has("handle_softirqs", "net_rx_action", "__do_softirq"):
        return "network softirq (other)"
    if kernel:
        return "kernel other: " + leaf
    if "libcrypto" in leafdso or "libssl" in leafdso:
        return "TLS (OpenSSL, user)"
    if "hash_avx" in leaf or "Digest" in leaf or "xxh" in leaf.lower() or "XXH" in leaf:
        return "memory digest hash"
    if "crc32" in leaf.lower():
        return "CRC32C"
    if leaf.startswith("__memmove") or leaf.startswith("__memcpy"):
        return "memcpy (user)"
    if leaf.startswith("__memset"):
        return "memset (user)"
    if "libswiftCore" in leafdso or leaf.startswith("swift_") or "libswift" in leafdso or "libFoundation" in leafdso or "libdispatch" in leafdso:
        return "Swift runtime / Foundation"
    if "libc.so" in leafdso:
        return "libc other: " + leaf
    return "migrated code (Swift)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hz", type=float, default=1999, help="perf record's sampling frequency (default 1999)")
    ap.add_argument("-v", action="store_true", help="list the leaf functions of the larger categories")
    args = ap.parse_args()
    counts = collections.Counter()
    leaves = collections.defaultdict(collections.Counter)
    total = 0
    for stack in parse(sys.stdin):
        c = category(stack)
        if " | " in c:
            c, _, leaf = c.partition(" | ")
            leaves[c][leaf] += 1
        elif c.startswith("kernel other: "):
            leaves["kernel other"][c[14:]] += 1
            c = "kernel other"
        elif c.startswith("libc other: "):
            leaves["libc other"][c[12:]] += 1
            c = "libc other"
        elif c == "migrated code (Swift)":
            leaves[c][stack[0][0][:90]] += 1
        counts[c] += 1
        total += 1
    if not total:
        sys.exit("no samples with call chains on stdin")
    print(f"{total} samples, {total / args.hz:.2f} CPU-s at {args.hz:.0f} Hz")
    for c, n in counts.most_common():
        print(f"{100 * n / total:6.1f} %  {n / args.hz:5.2f} s  {c}")
        if c in leaves and args.v:
            for leaf, k in leaves[c].most_common(6):
                print(f"           {100 * k / total:5.1f} %  {leaf}")


if __name__ == "__main__":
    main()
