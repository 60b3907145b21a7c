#!/bin/bash
# Throws malformed HTTP at the control socket of a migrated it starts (fuzz/control/fuzz_control.py), with a
# memstress VM running in it when /dev/kvm and the test guest are there, and fails if the daemon stops
# answering, answers 5xx, or the VM stops. Usage: scripts/fuzz-control.sh [seconds=30] [fuzzer flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
shift || true
swift build --product migrated >/dev/null
dir=$(mktemp -d)
.build/debug/migrated --socket "$dir/control.sock" --memory-budget 1G --log-level error 2>"$dir/daemon.log" &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do [ -S "$dir/control.sock" ] && break; sleep 0.1; done
if [ -e /dev/kvm ] && [ -f guest/build/guest.elf ]; then
    curl -sf --unix-socket "$dir/control.sock" -X POST http://localhost/vms -d "{\"id\": \"steady\", \
\"image\": \"$PWD/guest/build/guest.elf\", \"memory_mib\": 64, \"cmdline\": \"workload=memstress size_mib=8\"}" >/dev/null \
        && echo "fuzz-control: VM 'steady' runs during the fuzzing"
fi
echo "fuzz-control: running for ${seconds}s"
python3 fuzz/control/fuzz_control.py "$dir/control.sock" --seconds "$seconds" --pid $daemon "$@"
