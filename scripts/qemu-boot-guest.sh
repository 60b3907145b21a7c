#!/usr/bin/env bash
# Builds the test guest (guest/) and proves it under QEMU/KVM:
#   1. memstress boots, prints verify=ok status lines with rising ticks, and
#      exits with the pass code when duration_s runs out;
#   2. memstress same_pct=90 (identical rewrites) runs to "memstress done";
#      dirtyrounds runs to "dirtyrounds done" (QEMU ignores the port 0x600 syncs);
#   3. the failure paths work: a stale page is caught (0x11), a CPU fault is
#      reported (0x12), a workload too big for RAM is refused (0x13).
#   4. with --migrate: memstress survives a QEMU live migration (the
#      destination carries on with rising ticks, verify=ok, and passes).
# Exits 0 on success, non-zero with a message on the first failure.
#
# QEMU_MACHINE=microvm (default) or pc (uses qboot; SeaBIOS is far too slow
# on PVM hosts, where guest real mode is emulated).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
ELF=guest/build/guest.elf
LOG_DIR=$(mktemp -d)
trap 'rm -rf "$LOG_DIR"' EXIT

fail() { echo "qemu-boot-guest: FAIL: $*" >&2; exit 1; }

command -v qemu-system-x86_64 >/dev/null || fail "qemu-system-x86_64 not installed"
[ -r /dev/kvm ] && [ -w /dev/kvm ] || fail "/dev/kvm not accessible"
make -s -C guest >"$LOG_DIR/make.log" 2>&1 || { cat "$LOG_DIR/make.log" >&2; fail "make -C guest failed"; }

case "${QEMU_MACHINE:-microvm}" in
	microvm) MACHINE=(-M microvm) ;;
	pc) MACHINE=(-M pc -bios /usr/share/qemu/qboot.rom) ;;
	*) fail "QEMU_MACHINE must be microvm or pc" ;;
esac

# isa-debug-exit turns the guest's exit value v into process status (v<<1)|1.
status_of() { echo $(( ($1 << 1) | 1 )); }

# run NAME SECONDS APPEND...: boots the guest, output in $LOG_DIR/NAME.log, sets RC.
run() {
	local name=$1 limit=$2; shift 2
	timeout -k 5 "$limit" qemu-system-x86_64 -accel kvm "${MACHINE[@]}" -m 512 \
		-display none -serial stdio -monitor none -no-reboot \
		-device isa-debug-exit,iobase=0xf4,iosize=1 \
		-kernel "$ELF" -append "$*" </dev/null >"$LOG_DIR/$name.log" 2>&1
	RC=$?
	tr -d '\r' <"$LOG_DIR/$name.log" >"$LOG_DIR/$name.txt"
	if [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ]; then
		cat "$LOG_DIR/$name.txt" >&2
		fail "$name: timed out after ${limit}s"
	fi
}

expect_rc() {  # NAME GUEST_CODE
	local want; want=$(status_of "$2")
	if [ "$RC" -ne "$want" ]; then
		cat "$LOG_DIR/$1.txt" >&2
		fail "$1: QEMU exit status $RC, expected $want (guest code $(printf 0x%x "$2"))"
	fi
}

# --- memstress -------------------------------------------------------------
run memstress 30 workload=memstress size_mib=32 rate_mib=100 duration_s=3
expect_rc memstress 0x10
grep -q '^memstress boot ' "$LOG_DIR/memstress.txt" || fail "memstress: no boot line"
grep -q '^memstress done$' "$LOG_DIR/memstress.txt" || fail "memstress: no 'memstress done'"
# Status lines: exact format, ticks strictly rising, t == ticks/100, >= 4 lines
# (t=0..3), and the working set fully written by the end.
awk '
	/^memstress t=/ {
		if ($0 !~ /^memstress t=[0-9]+ gen=[0-9]+ pages=[0-9]+ ticks=[0-9]+ verify=ok$/) { print "bad status line: " $0; bad = 1; exit }
		split($2, t, "="); split($4, p, "="); split($5, k, "=")
		if (n && k[2] + 0 <= last) { print "ticks not rising: " $0; bad = 1; exit }
		if (int(k[2] / 100) != t[2] + 0) { print "t != ticks/100: " $0; bad = 1; exit }
		last = k[2] + 0; pages = p[2] + 0; n++
	}
	END {
		if (bad) exit 1
		if (n < 4) { print "only " n " status lines"; exit 1 }
		if (pages != 32 * 256) { print "last status line has pages=" pages ", expected 8192"; exit 1 }
	}' "$LOG_DIR/memstress.txt" >"$LOG_DIR/check.txt" \
	|| { cat "$LOG_DIR/memstress.txt" >&2; fail "memstress: $(cat "$LOG_DIR/check.txt")"; }
echo "qemu-boot-guest: memstress ok ($(grep -c '^memstress t=' "$LOG_DIR/memstress.txt") status lines, last: $(grep '^memstress t=' "$LOG_DIR/memstress.txt" | tail -1))"

# --- memstress with identical rewrites ---------------------------------------
run same 30 workload=memstress size_mib=16 rate_mib=100 same_pct=90 duration_s=3
expect_rc same 0x10
grep -q '^memstress boot .* same_pct=90$' "$LOG_DIR/same.txt" || { cat "$LOG_DIR/same.txt" >&2; fail "same_pct: no boot line with same_pct=90"; }
grep -q '^memstress done$' "$LOG_DIR/same.txt" || { cat "$LOG_DIR/same.txt" >&2; fail "same_pct: no 'memstress done'"; }
echo "qemu-boot-guest: memstress same_pct=90 ok ($(grep '^memstress t=' "$LOG_DIR/same.txt" | tail -1))"

# --- dirtyrounds -----------------------------------------------------------
run dirtyrounds 30 workload=dirtyrounds region_mib=16 count=64 rounds=50
expect_rc dirtyrounds 0x10
grep -q '^dirtyrounds done rounds=50$' "$LOG_DIR/dirtyrounds.txt" \
	|| { cat "$LOG_DIR/dirtyrounds.txt" >&2; fail "dirtyrounds: no 'dirtyrounds done rounds=50'"; }
echo "qemu-boot-guest: dirtyrounds ok"

# --- failure paths ---------------------------------------------------------
run stale 30 workload=memstress size_mib=8 rate_mib=50 inject=stale
expect_rc stale 0x11
grep -q '^memstress verify=FAIL page=0 reason=stale ' "$LOG_DIR/stale.txt" \
	|| { cat "$LOG_DIR/stale.txt" >&2; fail "stale: no verify=FAIL reason=stale line"; }

run fault 30 exit=fault
expect_rc fault 0x12
grep -q '^FAULT vector=0x000000000000000e (#PF) .*cr2=0x00000000fd000000$' "$LOG_DIR/fault.txt" \
	|| { cat "$LOG_DIR/fault.txt" >&2; fail "fault: no #PF report"; }

run toobig 30 workload=memstress size_mib=1024
expect_rc toobig 0x13
echo "qemu-boot-guest: failure paths ok (stale page -> 0x11, #PF -> 0x12, too big -> 0x13)"

# --- optional: live migration between two QEMU processes ---------------------
if [ "${1:-}" = --migrate ]; then
	APPEND="workload=memstress size_mib=64 rate_mib=100 duration_s=5"
	COMMON=(-accel kvm "${MACHINE[@]}" -m 512 -display none -no-reboot
		-device isa-debug-exit,iobase=0xf4,iosize=1 -kernel "$ELF" -append "$APPEND")
	SOCK="$LOG_DIR/migrate.sock"
	mkfifo "$LOG_DIR/monitor"
	timeout -k 5 40 qemu-system-x86_64 "${COMMON[@]}" -serial "file:$LOG_DIR/dst.txt" -monitor none \
		-incoming "unix:$SOCK" </dev/null >"$LOG_DIR/dst.err" 2>&1 &
	DST=$!
	timeout -k 5 40 qemu-system-x86_64 "${COMMON[@]}" -serial "file:$LOG_DIR/src.txt" -monitor stdio \
		<"$LOG_DIR/monitor" >"$LOG_DIR/src.mon" 2>&1 &
	SRC=$!
	exec 3>"$LOG_DIR/monitor"
	# Migrate once the source is past its first fill (status line t=1).
	for _ in $(seq 100); do
		grep -q '^memstress t=1 ' "$LOG_DIR/src.txt" 2>/dev/null && [ -S "$SOCK" ] && break
		sleep 0.1
	done
	# QEMU 7.2 limits migration to ~128 MiB/s by default: not enough to converge
	# against a 100 MiB/s dirty rate.
	echo "migrate_set_parameter max-bandwidth 10G" >&3
	echo "migrate -d unix:$SOCK" >&3
	wait "$DST"
	RC=$?
	echo quit >&3
	exec 3>&-
	wait "$SRC"
	tr -d '\r' <"$LOG_DIR/dst.txt" >"$LOG_DIR/migrate.txt" 2>/dev/null
	expect_rc migrate 0x10
	LAST_SRC=$(grep '^memstress t=' "$LOG_DIR/src.txt" | tail -1 | sed 's/.*ticks=\([0-9]*\).*/\1/')
	FIRST_DST=$(grep '^memstress t=' "$LOG_DIR/migrate.txt" | head -1 | sed 's/.*ticks=\([0-9]*\).*/\1/')
	[ -n "$FIRST_DST" ] && [ -n "$LAST_SRC" ] && [ "$FIRST_DST" -gt "$LAST_SRC" ] \
		|| { cat "$LOG_DIR/src.txt" "$LOG_DIR/migrate.txt" >&2; fail "migrate: destination did not carry on from the source"; }
	grep -q '^memstress done$' "$LOG_DIR/migrate.txt" || fail "migrate: no 'memstress done' on the destination"
	echo "qemu-boot-guest: migrate ok (source last ticks=$LAST_SRC, destination first ticks=$FIRST_DST)"
fi
echo "qemu-boot-guest: PASS"
