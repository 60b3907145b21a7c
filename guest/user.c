/*
 * CPL3 runtime: start_info handling, command line, printing, dispatch.
 * Runs natively on PVM hosts, so parsing and formatting live here rather
 * than in the (emulated) kernel.
 */
#include <stdarg.h>
#include "user.h"

#define CMDLINE_MAX 1024
#define MEMMAP_MAX 64
static char cmdline[CMDLINE_MAX];
static struct hvm_memmap_entry memmap[MEMMAP_MAX];
static u32 memmap_n;
static int have_memmap;

int str_eq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

static u64 str_len(const char *s)
{
	u64 n = 0;
	while (s[n])
		n++;
	return n;
}

static void out(const char *s, u64 n)
{
	syscall3(SYS_WRITE, (u64)s, n, 0);
}

/* Format into a line buffer and hand the whole line to one SYS_WRITE. */
void uprintf(const char *fmt, ...)
{
	char buf[1024];
	u64 n = 0;
	va_list ap;
	va_start(ap, fmt);
	for (const char *f = fmt; *f && n < sizeof(buf) - 24; f++) {
		if (*f != '%') {
			buf[n++] = *f;
			continue;
		}
		f++;
		while (*f == 'l')
			f++;
		if (*f == 's') {
			const char *s = va_arg(ap, const char *);
			while (*s && n < sizeof(buf) - 24)
				buf[n++] = *s++;
		} else if (*f == 'c') {
			buf[n++] = (char)va_arg(ap, int);
		} else if (*f == 'd' || *f == 'u' || *f == 'x') {
			u64 v = va_arg(ap, u64);
			unsigned base = *f == 'x' ? 16 : 10;
			if (*f == 'd' && (i64)v < 0) {
				buf[n++] = '-';
				v = -v;
			}
			char tmp[24];
			int k = 0;
			do {
				tmp[k++] = "0123456789abcdef"[v % base];
				v /= base;
			} while (v);
			while (k)
				buf[n++] = tmp[--k];
		} else {
			buf[n++] = '%';
			if (!*f)
				break;
			buf[n++] = *f;
		}
	}
	va_end(ap);
	out(buf, n);
}

void die(u8 code, const char *msg)
{
	out(msg, str_len(msg));
	sys_exit(code);
}

const char *cmd_get(const char *key)
{
	u64 kl = str_len(key);
	const char *p = cmdline;
	while (*p) {
		while (*p == ' ')
			p++;
		const char *w = p;
		u64 i = 0;
		while (i < kl && w[i] == key[i])
			i++;
		if (i == kl && w[kl] == '=')
			return w + kl + 1;   /* value ends at ' ' or NUL */
		while (*p && *p != ' ')
			p++;
	}
	return 0;
}

/* True if value v (terminated by ' ' or NUL) equals s. */
static int val_is(const char *v, const char *s)
{
	while (*s && *v == *s)
		v++, s++;
	return !*s && (*v == ' ' || *v == 0);
}

u64 cmd_u64(const char *key, u64 def)
{
	const char *v = cmd_get(key);
	if (!v)
		return def;
	u64 r = 0;
	int digits = 0;
	for (; *v >= '0' && *v <= '9'; v++, digits++) {
		if (r > (~0UL - 9) / 10) {
			uprintf("bad command line: %s= is too large\n", key);
			sys_exit(EXIT_BADCMD);
		}
		r = r * 10 + (u64)(*v - '0');
	}
	if (!digits || (*v != ' ' && *v != 0)) {
		uprintf("bad command line: %s= needs a decimal number\n", key);
		sys_exit(EXIT_BADCMD);
	}
	return r;
}

/* Is every byte of [start, end) covered by RAM (type 1) memmap entries? */
static int is_ram(u64 start, u64 end)
{
	u64 cur = start;
	int progressed = 1;
	while (cur < end && progressed) {
		progressed = 0;
		for (u32 i = 0; i < memmap_n; i++) {
			const struct hvm_memmap_entry *e = &memmap[i];
			if (e->type == 1 && e->addr <= cur && cur < e->addr + e->size) {
				cur = e->addr + e->size;
				progressed = 1;
			}
		}
	}
	return cur >= end;
}

void claim_workload(u64 bytes, const char *what)
{
	u64 end = WORKLOAD_BASE + bytes;
	if (bytes == 0 || bytes > MAP_LIMIT - WORKLOAD_BASE) {
		uprintf("%s: size 0 or beyond the %lu MiB this guest can map; exiting 0x13\n",
			what, (MAP_LIMIT - WORKLOAD_BASE) >> 20);
		sys_exit(EXIT_BADCMD);
	}
	if (have_memmap && !is_ram(WORKLOAD_BASE, end)) {
		u64 top = 0;
		for (u32 i = 0; i < memmap_n; i++)
			if (memmap[i].type == 1 && memmap[i].addr + memmap[i].size > top)
				top = memmap[i].addr + memmap[i].size;
		uprintf("%s: workload [0x%lx, 0x%lx) needs %lu MiB of RAM at 16 MiB, but the memmap's RAM ends at 0x%lx; exiting 0x13\n",
			what, WORKLOAD_BASE, end, bytes >> 20, top);
		sys_exit(EXIT_BADCMD);
	}
	if (syscall3(SYS_MAP, end, 0, 0) != 0)
		die(EXIT_BADCMD, "SYS_MAP refused the workload range\n");
}

void user_main(struct hvm_start_info *si)
{
	/* The VMM may have put start_info, the command line and the memmap
	 * anywhere below 1 MiB; we never write there, but take private copies
	 * before anything else runs so that nothing later depends on them. */
	if (si->magic != PVH_MAGIC)
		die(EXIT_BADCMD, "bad hvm_start_info magic; not booted via PVH?\n");
	if (si->cmdline_paddr) {
		const char *c = (const char *)si->cmdline_paddr;
		u64 i = 0;
		while (c[i] && i < CMDLINE_MAX - 1) {
			/* Treat tabs/newlines as separators too. */
			cmdline[i] = (c[i] == '\t' || c[i] == '\n') ? ' ' : c[i];
			i++;
		}
		cmdline[i] = 0;
	}
	if (si->version >= 1 && si->memmap_paddr && si->memmap_entries) {
		const struct hvm_memmap_entry *m = (const struct hvm_memmap_entry *)si->memmap_paddr;
		memmap_n = si->memmap_entries < MEMMAP_MAX ? si->memmap_entries : MEMMAP_MAX;
		for (u32 i = 0; i < memmap_n; i++)
			memmap[i] = m[i];
		have_memmap = 1;
	}

	const char *ex = cmd_get("exit");
	if (ex) {
		/* Lets a VMM test its exit-code plumbing without running a workload. */
		if (val_is(ex, "pass"))
			die(EXIT_PASS, "exit=pass\n");
		if (val_is(ex, "fail"))
			die(EXIT_FAIL, "exit=fail\n");
		if (val_is(ex, "fault")) {
			uprintf("exit=fault: touching an unmapped address\n");
			*(volatile u64 *)0xfd000000UL = 1;   /* above anything SYS_MAP maps here */
		}
		die(EXIT_BADCMD, "bad command line: exit= must be pass, fail or fault\n");
	}
	if (!have_memmap)
		uprintf("warning: no PVH memmap (start_info version %lu); not checking RAM size\n", (u64)si->version);

	const char *w = cmd_get("workload");
	if (!w || val_is(w, "memstress"))
		memstress_main();
	else if (val_is(w, "dirtyrounds"))
		dirtyrounds_main();
	else if (val_is(w, "bench"))
		bench_main();
	die(EXIT_BADCMD, "bad command line: workload= must be memstress, dirtyrounds or bench\n");
}
