/*
 * memstress: writes stamped pages at a paced rate and verifies every page
 * ever written once a second, so that a migration which loses a write (the
 * page is self-consistent but STALE) or corrupts one is caught.
 *
 * Page layout (4096 bytes, at WORKLOAD_BASE + index * 4096):
 *   u64 index      page index within the working set
 *   u64 gen        how many times this page has been written (1-based)
 *   u64 checksum   hash_payload() of bytes 32..4095
 *   u32 kind       0 zero, 1 text, 2 random
 *   u32 magic      STAMP_MAGIC
 *   payload        4064 bytes
 * The expected generation of every page lives in genarr[] below 16 MiB.
 */
#include "user.h"

#define PAGE_WORDS 512
#define HDR_WORDS 4
#define PAYLOAD_WORDS (PAGE_WORDS - HDR_WORDS)   /* 508, a multiple of 4 */
#define STAMP_MAGIC 0x5054534dU                 /* "MSTP" */

enum { KIND_ZERO, KIND_TEXT, KIND_RANDOM, PATTERN_MIXED };
static const char *const pattern_names[] = { "zero", "text", "random", "mixed" };

/* Uninitialised .bss is fine: only the first npages entries are used, and
 * they are cleared at start. */
static u32 genarr[MAX_WORK_PAGES];

#define CORPUS_SIZE 65536
static char corpus[CORPUS_SIZE + 4096];   /* + slack so a page never wraps */

static u64 npages, seed, stride;
static u64 same_pct;   /* same_pct=N: share of rewrites that put back the bytes a page holds */
static int pattern;
static u64 zero_sum;

/*
 * stall_us=T: every page access (a write, or the check of a page in
 * verify_all) is timed with rdtsc; those that take T us or more are counted
 * in a histogram of half-octave buckets (lower bounds 1, 2, 3, 4, 6, 8, 12,
 * 16, 24, 32, 48 ... us) and summed. Every STALL_TICKS ticks a "memstress
 * stall" line prints and resets the figures since the previous one. The TSC is calibrated against the 100 Hz
 * tick at boot. A timed access also includes any interrupt that lands in it
 * (the timer tick, whose CPL0 handler is emulated on PVM hosts) and any time
 * the host does not run the vCPU.
 */
#define STALL_BUCKETS 64
#define STALL_TICKS 10
static u64 stall_cycles;           /* threshold in TSC cycles; 0: off */
static u64 tsc_khz;
static u64 stall_hist[STALL_BUCKETS];
static u64 stall_max_cycles, stall_total_cycles;

/* Half-octave bucket of v >= 1: index 2k for [2^k, 1.5*2^k), 2k+1 for [1.5*2^k, 2^(k+1)). */
static int stall_bucket(u64 us)
{
	int k = 63 - __builtin_clzl(us);
	int half = k >= 1 ? (int)((us >> (k - 1)) & 1) : 0;
	int b = 2 * k + half;
	return b < STALL_BUCKETS ? b : STALL_BUCKETS - 1;
}

static u64 stall_bucket_low(int b)
{
	int k = b / 2;
	return (b & 1) ? (3UL << k) >> 1 : 1UL << k;
}

static inline u64 stall_start(void)
{
	return stall_cycles ? rdtsc() : 0;
}

static inline void stall_end(u64 start)
{
	if (!stall_cycles)
		return;
	u64 d = rdtsc() - start;
	/* A TSC that went back (it should not across a migration) is not a stall. */
	if ((i64)d < (i64)stall_cycles)
		return;
	u64 us = d * 1000 / tsc_khz;
	stall_hist[stall_bucket(us ? us : 1)]++;
	stall_total_cycles += d;
	if (d > stall_max_cycles)
		stall_max_cycles = d;
}

/* Measures the TSC against 20 ticks; tsc_khz= on the command line (the host's rate: KVM passes the host TSC
 * through unless it can scale it) overrides the measurement, which a loaded host can skew by a few per cent. */
static u64 stall_calibrate(u64 threshold_us)
{
	sys_wait();
	u64 tk0 = ticks, c0 = rdtsc();
	while (ticks < tk0 + 20)
		sys_wait();
	u64 measured = (rdtsc() - c0) * TIMER_HZ / (ticks - tk0) / 1000;
	tsc_khz = cmd_u64("tsc_khz", measured);
	stall_cycles = threshold_us * tsc_khz / 1000;
	return measured;
}

static char *put_str(char *o, const char *s)
{
	while (*s)
		*o++ = *s++;
	return o;
}

static char *put_u64(char *o, u64 v)
{
	char tmp[24];
	int k = 0;
	do {
		tmp[k++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (k)
		*o++ = tmp[--k];
	return o;
}

/* Prints "memstress stall ticks=N stalls=<low_us>:<count>,... max_stall_us=N stall_total_us=N" (stalls=none if
 * there were none) and resets the figures. */
static void stall_print(u64 t)
{
	static char buf[STALL_BUCKETS * 24 + 128];
	char *o = put_str(buf, "memstress stall ticks=");
	o = put_u64(o, t);
	o = put_str(o, " stalls=");
	int any = 0;
	for (int b = 0; b < STALL_BUCKETS; b++) {
		if (!stall_hist[b])
			continue;
		if (any)
			*o++ = ',';
		o = put_u64(o, stall_bucket_low(b));
		*o++ = ':';
		o = put_u64(o, stall_hist[b]);
		stall_hist[b] = 0;
		any = 1;
	}
	if (!any)
		o = put_str(o, "none");
	o = put_str(o, " max_stall_us=");
	o = put_u64(o, stall_max_cycles * 1000 / tsc_khz);
	o = put_str(o, " stall_total_us=");
	o = put_u64(o, stall_total_cycles * 1000 / tsc_khz);
	*o++ = '\n';
	*o = 0;
	stall_max_cycles = stall_total_cycles = 0;
	uprintf("%s", buf);
}

static inline u64 rotl(u64 x, int r) { return (x << r) | (x >> (64 - r)); }

/* splitmix64 finaliser: turns (seed, page, gen) into well-spread bits. */
static inline u64 mix64(u64 z)
{
	z += 0x9e3779b97f4a7c15UL;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
	return z ^ (z >> 31);
}

/* Four independent multiply-rotate lanes keep the multiplier busy: a few GB/s
 * per core, far more than the 1 s verify budget needs. */
#define H1 0x9fb21c651e98df25UL
#define H2 0xc2b2ae3d27d4eb4fUL
#define HASH_ROUND(h, w) ((h) = rotl(((h) ^ (w)) * H1, 29))

static inline u64 hash_final(u64 a, u64 b, u64 c, u64 d)
{
	return mix64(a ^ rotl(b, 16) ^ rotl(c, 32) ^ rotl(d, 48) ^ H2);
}

#define HASH_INIT u64 ha = 0x243f6a8885a308d3UL, hb = 0x13198a2e03707344UL, \
	hc = 0xa4093822299f31d0UL, hd = 0x082efa98ec4e6c89UL

static u64 hash_payload(const u64 *p)
{
	HASH_INIT;
	for (int i = 0; i < PAYLOAD_WORDS; i += 4) {
		HASH_ROUND(ha, p[i]);
		HASH_ROUND(hb, p[i + 1]);
		HASH_ROUND(hc, p[i + 2]);
		HASH_ROUND(hd, p[i + 3]);
	}
	return hash_final(ha, hb, hc, hd);
}

static u64 fill_zero(u64 *p)
{
	for (int i = 0; i < PAYLOAD_WORDS; i++)
		p[i] = 0;
	return zero_sum;
}

/* Incompressible payload: four xorshift64 streams, hashed as they are stored. */
static u64 fill_random(u64 *p, u64 r)
{
	u64 s0 = mix64(r) | 1, s1 = mix64(r + 1) | 1, s2 = mix64(r + 2) | 1, s3 = mix64(r + 3) | 1;
	HASH_INIT;
#define XS(s) (s ^= s << 13, s ^= s >> 7, s ^= s << 17, s)
	for (int i = 0; i < PAYLOAD_WORDS; i += 4) {
		u64 a = XS(s0), b = XS(s1), c = XS(s2), d = XS(s3);
		p[i] = a;
		p[i + 1] = b;
		p[i + 2] = c;
		p[i + 3] = d;
		HASH_ROUND(ha, a);
		HASH_ROUND(hb, b);
		HASH_ROUND(hc, c);
		HASH_ROUND(hd, d);
	}
#undef XS
	return hash_final(ha, hb, hc, hd);
}

/* Text-like payload: a window of the word corpus at a per-write offset, so it
 * compresses like prose yet differs from write to write. */
static u64 fill_text(u64 *p, u64 r)
{
	const char *src = corpus + (r % CORPUS_SIZE);
	HASH_INIT;
	for (int i = 0; i < PAYLOAD_WORDS; i += 4) {
		u64 w[4];
		__builtin_memcpy(w, src + 8 * i, sizeof(w));
		p[i] = w[0];
		p[i + 1] = w[1];
		p[i + 2] = w[2];
		p[i + 3] = w[3];
		HASH_ROUND(ha, w[0]);
		HASH_ROUND(hb, w[1]);
		HASH_ROUND(hc, w[2]);
		HASH_ROUND(hd, w[3]);
	}
	return hash_final(ha, hb, hc, hd);
}

static const char *const vocab[] = {
	"the", "of", "and", "a", "to", "in", "is", "it", "that", "was", "for", "on", "are",
	"with", "as", "be", "at", "this", "have", "from", "or", "by", "not", "but", "what",
	"all", "were", "when", "we", "there", "can", "an", "your", "which", "their", "said",
	"memory", "page", "migration", "kernel", "virtual", "machine", "dirty", "bitmap",
	"network", "socket", "buffer", "compress", "snapshot", "restore", "guest", "host",
	"register", "interrupt", "timer", "device", "queue", "thread", "process", "signal",
	"during", "between", "because", "although", "however", "therefore", "without",
};

/* Half the picks are stock phrases: prose repeats itself, and a uniform
 * word soup alone only reaches ~1.8x with lz4 per page (measured); with
 * phrases a 4 KiB text page compresses ~2.5x. */
static const char *const phrases[] = {
	"the guest writes", "of the page", "dirty bitmap", "during the migration",
	"and then the", "in the kernel", "is not", "the host sends", "to the network",
	"it was said that",
};

static void build_corpus(void)
{
	u64 r = seed ^ 0x7e47UL, col = 0, n = 0;
	const u64 nv = sizeof(vocab) / sizeof(vocab[0]), np = sizeof(phrases) / sizeof(phrases[0]);
	while (n < sizeof(corpus)) {
		r = mix64(r);
		const char *w = (r >> 63) ? phrases[(r >> 8) % np] : vocab[(r >> 8) % nv];
		for (u64 i = 0; w[i] && n < sizeof(corpus); i++, col++)
			corpus[n++] = w[i];
		u64 sep = (r >> 32) % 16;
		if (sep == 0 && n < sizeof(corpus)) {
			corpus[n++] = '.';
		} else if (sep == 1 && n < sizeof(corpus)) {
			corpus[n++] = ',';
		}
		if (n < sizeof(corpus))
			corpus[n++] = col > 70 ? '\n' : ' ';
		col = col > 70 ? 0 : col + 1;
	}
}

static void write_page(u64 page, u64 gen)
{
	u64 *p = (u64 *)(WORKLOAD_BASE + page * 4096);
	u64 r = mix64(seed ^ (page * 0x9e3779b97f4a7c15UL) ^ (gen << 40) ^ gen);
	u64 kind = pattern == PATTERN_MIXED ? (r >> 32) % 3 : (u64)pattern;
	u64 sum;
	if (kind == KIND_ZERO)
		sum = fill_zero(p + HDR_WORDS);
	else if (kind == KIND_TEXT)
		sum = fill_text(p + HDR_WORDS, r);
	else
		sum = fill_random(p + HDR_WORDS, r);
	p[0] = page;
	p[1] = gen;
	p[2] = sum;
	p[3] = kind | ((u64)STAMP_MAGIC << 32);
	genarr[page] = (u32)gen;
}

/*
 * same_pct=N: a rewrite of a page that holds data puts back, with N % odds,
 * the very bytes it holds, every word stored again (the dirty log reports it
 * like any write; only its content says it is the same). Such a write leaves
 * the page's generation and genarr[] as they were, so verify_all() still
 * checks that the page holds its last real write. Which writes are identical
 * follows from (seed, page, generation), not from time.
 */
static int rewrites_same(u64 page, u64 gen)
{
	if (!same_pct || !genarr[page])
		return 0;
	return mix64(seed ^ 0x5a3e5a3e5a3eUL ^ (page * 0xbf58476d1ce4e5b9UL) ^ (gen << 32)) % 100 < same_pct;
}

static void rewrite_same(u64 page)
{
	volatile u64 *p = (volatile u64 *)(WORKLOAD_BASE + page * 4096);
	for (int i = 0; i < PAGE_WORDS; i++)
		p[i] = p[i];
}

/* The i-th write overall goes to page (i mod n) * stride mod n: each pass
 * covers every page once, scattered across 2 MiB regions rather than a
 * sliding window, which is harder on dirty tracking. */
static u64 page_of(u64 i) { return ((i % npages) * stride) % npages; }
static u64 gen_of(u64 i) { return i / npages + 1; }

static u64 gcd(u64 a, u64 b)
{
	while (b) {
		u64 t = a % b;
		a = b;
		b = t;
	}
	return a;
}

/* Checks every page with a nonzero expected generation; exits 0x11 on the first bad one. */
static void verify_all(void)
{
	for (u64 page = 0; page < npages; page++) {
		u64 g = genarr[page];
		if (!g)
			continue;
		const u64 *p = (const u64 *)(WORKLOAD_BASE + page * 4096);
		u64 c0 = stall_start();
		u64 sum = hash_payload(p + HDR_WORDS);
		stall_end(c0);
		if (p[0] == page && p[1] == g && p[3] >> 32 == STAMP_MAGIC && (u32)p[3] <= KIND_RANDOM && p[2] == sum)
			continue;
		const char *why = "corrupt";
		if (p[0] == page && p[3] >> 32 == STAMP_MAGIC && p[2] == sum)
			why = p[1] < g ? "stale" : "generation-mismatch";
		uprintf("memstress verify=FAIL page=%lu reason=%s addr=0x%lx expected index=%lu gen=%lu found index=%lu gen=%lu kind=%lu magic=0x%lx checksum stored=0x%lx computed=0x%lx ticks=%lu\n",
			page, why, (u64)p, page, g, p[0], p[1], p[3] & 0xffffffffUL, p[3] >> 32, p[2], sum, ticks);
		sys_exit(EXIT_FAIL);
	}
}

static void setup(u64 size_mib)
{
	const char *pat = cmd_get("pattern");
	pattern = PATTERN_MIXED;
	if (pat) {
		int found = 0;
		for (int k = 0; k < 4; k++) {
			const char *a = pattern_names[k], *b = pat;
			while (*a && *a == *b)
				a++, b++;
			if (!*a && (*b == ' ' || !*b)) {
				pattern = k;
				found = 1;
			}
		}
		if (!found)
			die(EXIT_BADCMD, "bad command line: pattern= must be zero, text, random or mixed\n");
	}
	seed = cmd_u64("seed", 0x5eed);
	same_pct = cmd_u64("same_pct", 0);
	if (same_pct > 100)
		die(EXIT_BADCMD, "bad command line: same_pct= must be 0 to 100\n");
	if (size_mib == 0 || size_mib > (MAX_WORK_PAGES >> 8))
		die(EXIT_BADCMD, "bad command line: size_mib out of range\n");
	npages = size_mib * 256;
	claim_workload(size_mib << 20, "memstress");
	for (u64 i = 0; i < npages; i++)
		genarr[i] = 0;
	/* A stride near n/phi that is coprime to n makes i -> i*stride mod n a permutation. */
	stride = (npages * 618) / 1000 | 1;
	while (gcd(stride, npages) != 1)
		stride += 2;
	build_corpus();
	__builtin_memcpy(corpus + CORPUS_SIZE, corpus, 4096);
	u64 zeros[PAYLOAD_WORDS] = { 0 };
	zero_sum = hash_payload(zeros);
}

/*
 * inject=stale|corrupt: after the first full pass, damage page 0 the way a
 * broken migration would, so the failure path can be tested end to end.
 * stale: rewrite page 0 (expected generation moves on), then put the old,
 * self-consistent copy back.  corrupt: flip one payload byte.
 */
static void inject(const char *how)
{
	u64 *p = (u64 *)WORKLOAD_BASE;
	if (how[0] == 's') {
		static u64 old[PAGE_WORDS];
		for (int i = 0; i < PAGE_WORDS; i++)
			old[i] = p[i];
		write_page(0, genarr[0] + 1);
		for (int i = 0; i < PAGE_WORDS; i++)
			p[i] = old[i];
	} else {
		((volatile u8 *)p)[100] ^= 1;
	}
	uprintf("memstress injected %s page=0\n", how[0] == 's' ? "stale" : "corrupt");
}

void memstress_main(void)
{
	u64 size_mib = cmd_u64("size_mib", 64);
	u64 rate_mib = cmd_u64("rate_mib", 0);
	u64 duration = cmd_u64("duration_s", 0);
	u64 rewrite = cmd_u64("rewrite", 0);
	u64 stall_us = cmd_u64("stall_us", 0);
	const char *inj = cmd_get("inject");
	if (inj && inj[0] != 's' && inj[0] != 'c')
		die(EXIT_BADCMD, "bad command line: inject= must be stale or corrupt\n");
	setup(size_mib);
	uprintf("memstress boot size_mib=%lu rate_mib=%lu pattern=%s seed=%lu duration_s=%lu pages_total=%lu",
		size_mib, rate_mib, pattern_names[pattern], seed, duration, npages);
	if (same_pct)
		uprintf(" same_pct=%lu", same_pct);
	if (rewrite)
		uprintf(" rewrite=1");
	if (stall_us) {
		u64 measured = stall_calibrate(stall_us);
		uprintf(" stall_us=%lu tsc_khz=%lu tsc_khz_ticks=%lu", stall_us, tsc_khz, measured);
	}
	uprintf("\n");

	const u64 rate_pages = rate_mib * 256;   /* pages per second */
	u64 written = 0;                         /* writes done, all generations */
	u64 credit = 0;                          /* in pages * TIMER_HZ */
	u64 last_tick = ticks;
	u64 next_verify = 0;                     /* 0: first status line right away */
	u64 next_stall = last_tick + STALL_TICKS;
	for (;;) {
		u64 t = ticks;
		if (t != last_tick) {
			/* Pace by the tick counter; cap the backlog at one second so a
			 * long pause (e.g. a migration) does not cause a write storm. */
			credit += (t - last_tick) * rate_pages;
			if (credit > rate_pages * TIMER_HZ)
				credit = rate_pages * TIMER_HZ;
			last_tick = t;
		}
		if (duration && t >= duration * TIMER_HZ) {
			verify_all();
			uprintf("memstress t=%lu gen=%lu pages=%lu ticks=%lu verify=ok\n",
				t / TIMER_HZ, (written + npages - 1) / npages, written < npages ? written : npages, t);
			die(EXIT_PASS, "memstress done\n");
		}
		if (inj && written >= npages) {
			inject(inj);
			inj = 0;
			/* Verify before the writer can heal the page by rewriting it. */
			next_verify = 0;
		}
		if (stall_cycles && t >= next_stall) {
			stall_print(t);
			next_stall = t + STALL_TICKS;
		}
		if (t >= next_verify) {
			verify_all();
			uprintf("memstress t=%lu gen=%lu pages=%lu ticks=%lu verify=ok\n",
				t / TIMER_HZ, (written + npages - 1) / npages, written < npages ? written : npages, t);
			next_verify = (t / TIMER_HZ + 1) * TIMER_HZ;
			continue;
		}
		u64 quota;
		if (rate_mib == 0)
			/* fill once, or with rewrite=1 rewrite for ever */
			quota = rewrite ? npages : written < npages ? npages - written : 0;
		else
			quota = credit / TIMER_HZ;
		if (quota == 0) {
			sys_wait();
			continue;
		}
		/* Small batches so the tick counter (verify/duration deadlines) is
		 * looked at often: ~10 us apart when memory is resident, ~30 ms when
		 * every write is the host's first touch of a 2 MiB region (~3.4 ms
		 * each on PVM hosts, and the scattered order makes that common). */
		if (quota > 8)
			quota = 8;
		for (u64 k = 0; k < quota; k++, written++) {
			u64 page = page_of(written), gen = gen_of(written);
			u64 c0 = stall_start();
			if (rewrites_same(page, gen))
				rewrite_same(page);
			else
				write_page(page, gen);
			stall_end(c0);
		}
		if (rate_mib)
			credit -= quota * TIMER_HZ;
	}
}

/*
 * workload=bench size_mib=N: measures write and verify throughput for each
 * pattern, timed with the TSC calibrated against the 100 Hz LAPIC tick.
 */
void bench_main(void)
{
	u64 size_mib = cmd_u64("size_mib", 256);
	setup(size_mib);
	uprintf("bench boot size_mib=%lu\n", size_mib);
	sys_wait();
	u64 tk0 = ticks, c0 = rdtsc();
	while (ticks < tk0 + 50)
		sys_wait();
	u64 tsc_hz = (rdtsc() - c0) * TIMER_HZ / (ticks - tk0);
	uprintf("bench tsc_mhz=%lu\n", tsc_hz / 1000000);

	/* Pass 0 touches every page once so first-touch (host page faults) is
	 * measured separately from steady-state throughput. */
	static const int order[] = { KIND_ZERO, KIND_ZERO, KIND_TEXT, KIND_RANDOM, PATTERN_MIXED };
	for (u64 pass = 0; pass < sizeof(order) / sizeof(order[0]); pass++) {
		pattern = order[pass];
		u64 a = rdtsc();
		for (u64 page = 0; page < npages; page++)
			write_page(page, pass + 1);
		u64 b = rdtsc();
		verify_all();
		u64 c = rdtsc();
		u64 mib_ms_w = (b - a) * 1000 / tsc_hz, mib_ms_v = (c - b) * 1000 / tsc_hz;
		uprintf("bench pattern=%s%s write_ms=%lu write_mib_s=%lu verify_ms=%lu verify_mib_s=%lu\n",
			pattern_names[pattern], pass == 0 ? "(first-touch)" : "",
			mib_ms_w, size_mib * tsc_hz / (b - a + 1), mib_ms_v, size_mib * tsc_hz / (c - b + 1));
	}
	die(EXIT_PASS, "bench done\n");
}
