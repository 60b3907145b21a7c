/*
 * dirtyrounds: a precisely known set of dirty pages per round, for testing a
 * VMM's dirty logging.  Round r (1-based) writes the 64-bit value r at offset
 * 0 of pages (r*37 + k*101) mod P for k in 0..count-1, touches nothing else
 * in the region, then calls sync(r) (a 32-bit OUT to port 0x600).
 */
#include "user.h"

void dirtyrounds_main(void)
{
	u64 region_mib = cmd_u64("region_mib", 16);
	u64 count = cmd_u64("count", 64);
	u64 rounds = cmd_u64("rounds", 50);
	u64 P = region_mib * 256;
	/* P must be a power of two (so the odd step 101 visits distinct pages)
	 * and count <= P; rounds must fit the 32-bit sync value. */
	if (region_mib == 0 || (P & (P - 1)) || count == 0 || count > P || rounds > 0xffffffffUL)
		die(EXIT_BADCMD, "bad command line: dirtyrounds needs region_mib a power of two, 1 <= count <= region_mib*256\n");
	claim_workload(region_mib << 20, "dirtyrounds");
	uprintf("dirtyrounds boot region_mib=%lu count=%lu rounds=%lu\n", region_mib, count, rounds);

	/* Make every page of the region resident and zero, then let the host
	 * start from a clean dirty log. */
	volatile u64 *base = (volatile u64 *)WORKLOAD_BASE;
	for (u64 i = 0; i < P * 512; i += 8) {
		base[i] = 0; base[i + 1] = 0; base[i + 2] = 0; base[i + 3] = 0;
		base[i + 4] = 0; base[i + 5] = 0; base[i + 6] = 0; base[i + 7] = 0;
	}
	sys_sync(0);

	for (u64 r = 1; r <= rounds; r++) {
		/* volatile: exactly one store per listed page, no merged or extra accesses. */
		for (u64 k = 0; k < count; k++)
			base[((r * 37 + k * 101) & (P - 1)) * 512] = r;
		sys_sync((u32)r);
	}
	uprintf("dirtyrounds done rounds=%lu\n", rounds);
	sys_exit(EXIT_PASS);
}
