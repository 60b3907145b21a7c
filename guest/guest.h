/*
 * Constants shared by the CPL0 kernel (kernel.c, boot.S) and the CPL3
 * workloads (user.c, memstress.c, dirtyrounds.c).  Everything here is part
 * of the contract described in README.md, so change both together.
 */
#ifndef GUEST_H
#define GUEST_H

#ifndef __ASSEMBLER__
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;
#endif

/* Ports. */
#define PORT_COM1       0x3f8
#define PORT_DEBUG_EXIT 0xf4
#define PORT_SYNC       0x600

/* Values written to the debug-exit port. */
#define EXIT_PASS  0x10
#define EXIT_FAIL  0x11   /* verification failure */
#define EXIT_FAULT 0x12   /* CPU exception */
#define EXIT_BADCMD 0x13  /* bad command line / does not fit in RAM */

/* Syscalls: `int3` from CPL3, number in rax, args in rdi, rsi, rdx. */
#define SYS_WRITE 1
#define SYS_EXIT  2
#define SYS_WAIT  3
#define SYS_SYNC  4
#define SYS_TICKS 5
#define SYS_MAP   6   /* internal: identity-map [16 MiB, rdi) with 2 MiB pages */

/* Memory contract. */
#define WORKLOAD_BASE 0x1000000UL          /* all workload memory starts at 16 MiB */
#define MAP_LIMIT     0xfe000000UL         /* highest address SYS_MAP will map (below the LAPIC) */
#define MAX_WORK_PAGES ((MAP_LIMIT - WORKLOAD_BASE) / 4096)

/* Interrupt vectors. */
#define VEC_TIMER    0x20
#define VEC_SPURIOUS 0xff

/* Selectors (GDT layout in boot.S). */
#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA 0x1b   /* 0x18 | RPL3 */
#define SEL_UCODE 0x23   /* 0x20 | RPL3 */
#define SEL_TSS   0x28

/* LAPIC timer: KVM's in-kernel LAPIC bus runs at 1 GHz, divide by 16 -> 62.5 MHz. */
#define TIMER_HZ    100
#define TIMER_COUNT 625000

#define PVH_MAGIC 0x336ec578

#ifndef __ASSEMBLER__
/* Xen's struct hvm_start_info (PVH boot ABI), as handed over in EBX. */
struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr;    /* version >= 1 */
	u32 memmap_entries;  /* version >= 1 */
	u32 reserved;
};

struct hvm_memmap_entry {
	u64 addr;
	u64 size;
	u32 type;            /* 1 = RAM */
	u32 reserved;
};
#endif

#endif
