#!/bin/bash
# Fuzzes MigrationWire's stream decoder with libFuzzer (+ AddressSanitizer), seeded with
# protocol/vectors. Usage: scripts/fuzz-wire.sh [seconds=60] [extra libFuzzer flags...]
# Crashes are written to .build-fuzz/artifacts/; the corpus grows in .build-fuzz/corpus/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
out=.build-fuzz
mkdir -p "$out/corpus" "$out/artifacts"
swiftc -sanitize=fuzzer,address -parse-as-library -O -g -module-name FuzzWire \
    Sources/MigrationWire/*.swift fuzz/wire/*.swift -o "$out/fuzz-wire"
cp protocol/vectors/*.bin "$out/corpus/"
echo "fuzz-wire: running for ${seconds}s"
start=$(date +%s)
"$out/fuzz-wire" "$out/corpus" -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 \
    -artifact_prefix="$out/artifacts/" -print_final_stats=1 "$@"
echo "fuzz-wire: clean after $(( $(date +%s) - start ))s"
