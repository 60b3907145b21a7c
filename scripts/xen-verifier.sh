#!/bin/bash
# Runs Xen 4.17's own stream verifier (verify-stream-v2, from Debian's xen-utils-4.17) on an image:
#   scripts/xen-verifier.sh IMAGE [-f xl|libxl|libxc]      (default -f xl, always -v)
# The package is fetched with apt-get download and unpacked with dpkg -x once, into
# .build-xen/verifier/ (XEN_VERIFIER_CACHE overrides). Exits 77 when the package cannot be had, so
# callers can tell "unavailable" from "image refused" (exit 1 or 2, the verifier's own codes).
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${XEN_VERIFIER_CACHE:-$PWD/.build-xen/verifier}"
root="$cache/root"
tool="$root/usr/lib/xen-4.17/bin/verify-stream-v2"
if [ ! -x "$tool" ]; then
    mkdir -p "$cache"
    work=$(mktemp -d "$cache/fetch.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    if ! (cd "$work" && apt-get download xen-utils-4.17 >/dev/null 2>"$work/apt.log"); then
        echo "xen-verifier: cannot download xen-utils-4.17: $(tail -1 "$work/apt.log")" >&2
        exit 77
    fi
    dpkg -x "$work"/xen-utils-4.17_*.deb "$work/root"
    rm -rf "$root"
    mv "$work/root" "$root"
fi
[ $# -ge 1 ] || { echo "usage: $0 IMAGE [-f xl|libxl|libxc]" >&2; exit 64; }
image="$1"; shift
format=xl
if [ "${1:-}" = "-f" ]; then format="$2"; fi
PYTHONPATH="$root/usr/lib/xen-4.17/lib/python" exec python3 "$tool" -f "$format" -v -i "$image"
