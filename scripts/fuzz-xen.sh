#!/bin/bash
# Fuzzes XenAdapter's xl image reader with libFuzzer (+ AddressSanitizer), seeded with images its writer
# makes. Usage: scripts/fuzz-xen.sh [seconds=60] [extra libFuzzer flags...]
# Crashes are written to .build-fuzz-xen/artifacts/; the corpus grows in .build-fuzz-xen/corpus/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
out=.build-fuzz-xen
mkdir -p "$out/corpus" "$out/artifacts" "$out/modules"
flags=(-sanitize=fuzzer,address -parse-as-library -O -g)
# MigrationWire and Threads as modules of their own, so the reader's imports of them resolve.
for module in MigrationWire Threads; do
    swiftc "${flags[@]}" -module-name "$module" -emit-module -emit-module-path "$out/modules/$module.swiftmodule" \
        -emit-library -static -o "$out/modules/lib$module.a" Sources/"$module"/*.swift
done
# The reader's files: everything in XenAdapter that does not touch KVM types.
swiftc "${flags[@]}" -module-name FuzzXen -I "$out/modules" -L "$out/modules" -lMigrationWire -lThreads \
    Sources/XenAdapter/{XenFormat,HVMContext,XenDomainState,XenImageReader,XenImageWriter}.swift fuzz/xen/*.swift \
    -o "$out/fuzz-xen"
FUZZ_XEN_SEEDS="$out/corpus" "$out/fuzz-xen" -runs=0 "$out/corpus" >/dev/null 2>&1
echo "fuzz-xen: running for ${seconds}s"
start=$(date +%s)
"$out/fuzz-xen" "$out/corpus" -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 \
    -artifact_prefix="$out/artifacts/" -print_final_stats=1 "$@"
echo "fuzz-xen: clean after $(( $(date +%s) - start ))s"
