/* CPL3 runtime shared by the workloads. */
#ifndef USER_H
#define USER_H
#include "guest.h"

extern volatile u64 ticks;   /* kernel's 100 Hz counter; user-readable memory */

static inline i64 syscall3(u64 nr, u64 a1, u64 a2, u64 a3)
{
	i64 ret;
	/* int3 is the gate: int $0x80 raises #UD on PVM hosts. */
	__asm__ volatile("int3" : "=a"(ret) : "a"(nr), "D"(a1), "S"(a2), "d"(a3) : "memory");
	return ret;
}

static inline void sys_wait(void) { syscall3(SYS_WAIT, 0, 0, 0); }
static inline void sys_sync(u32 v) { syscall3(SYS_SYNC, v, 0, 0); }
static inline __attribute__((noreturn)) void sys_exit(u8 code)
{
	syscall3(SYS_EXIT, code, 0, 0);
	__builtin_unreachable();
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

/* printf subset: %s %c %ld %lu %lx; every integer argument must be 64-bit. */
void uprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
__attribute__((noreturn)) void die(u8 code, const char *msg);

/* Command line: value of key, or NULL. */
const char *cmd_get(const char *key);
u64 cmd_u64(const char *key, u64 def);   /* exits 0x13 on a malformed number */
int str_eq(const char *a, const char *b);

/* Ensure [WORKLOAD_BASE, WORKLOAD_BASE + bytes) is RAM and map it; exits 0x13 if not. */
void claim_workload(u64 bytes, const char *what);

void memstress_main(void);
void bench_main(void);
void dirtyrounds_main(void);

#endif
