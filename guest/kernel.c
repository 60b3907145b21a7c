/*
 * CPL0 kernel: descriptor tables, LAPIC timer, syscall and fault handlers.
 *
 * On PVM hosts every instruction here is emulated (~1 us each), so this file
 * does the minimum: no command-line parsing, no memory-map walking, no
 * formatting in the hot paths.  All of that runs natively in CPL3 (user.c).
 * Built with -mgeneral-regs-only: SSE/xsave in CPL0 are not emulated.
 */
#include "guest.h"

struct tss64 {
	u32 reserved0;
	u64 rsp0, rsp1, rsp2;
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
} __attribute__((packed));

struct idt_gate {
	u16 off0;
	u16 sel;
	u8 ist;
	u8 type;
	u16 off1;
	u32 off2;
	u32 zero;
};

extern u64 gdt[];
extern u64 pd0[];
extern volatile u64 ticks;
extern char isr_stubs[], syscall_entry[], timer_x2apic[], timer_xapic[], spurious_entry[];
extern char kstack_top[], dfstack_top[];
extern void user_main(struct hvm_start_info *si);
extern char ustack_top[];

/* In .data, not .bss: a not-present gate must read as zero and the loader is
 * not required to clear .bss. */
static struct idt_gate idt[256] __attribute__((section(".data"), aligned(16)));
static struct tss64 tss __attribute__((section(".data"), aligned(16)));
static int use_x2apic __attribute__((section(".data")));

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

/* LAPIC register write; `reg` is the xAPIC MMIO offset (x2APIC MSR = 0x800 + reg/16). */
static void apic_write(u32 reg, u32 v)
{
	if (use_x2apic)
		wrmsr(0x800 + (reg >> 4), v);
	else
		*(volatile u32 *)(0xfee00000UL + reg) = v;
}

static void set_gate(int vec, void *handler, int dpl, int ist)
{
	u64 a = (u64)handler;
	struct idt_gate *g = &idt[vec];
	g->off0 = (u16)a;
	g->sel = SEL_KCODE;
	g->ist = (u8)ist;
	g->type = (u8)(0x8e | (dpl << 5));   /* present, 64-bit interrupt gate */
	g->off1 = (u16)(a >> 16);
	g->off2 = (u32)(a >> 32);
}

/* Set once LSR.THRE has failed to come up: a VMM without a line status
 * register (reads as 0) must not cost us 64 polls per byte forever. */
static int lsr_absent __attribute__((section(".data")));

/* Serial output.  Polling LSR.THRE lets QEMU's 8250 keep up without dropping
 * bytes; the poll is bounded so a VMM that reads LSR as 0 cannot hang CPL0. */
static void kputc(char c)
{
	for (int i = 0; !lsr_absent && !(inb(PORT_COM1 + 5) & 0x20); i++)
		if (i == 64)
			lsr_absent = 1;
	outb(PORT_COM1, (u8)c);
}

static void kputs(const char *s)
{
	while (*s)
		kputc(*s++);
}

static void kputhex(u64 v)
{
	kputs("0x");
	for (int shift = 60; shift >= 0; shift -= 4)
		kputc("0123456789abcdef"[(v >> shift) & 0xf]);
}

static __attribute__((noreturn)) void kexit(u8 code)
{
	outb(PORT_DEBUG_EXIT, code);
	/* No debug-exit device: park the CPU for good. */
	for (;;)
		__asm__ volatile("cli; hlt");
}

static const char *const exc_names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP",
	"#SS", "#GP", "#PF", "?15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "?22", "?23",
	"?24", "?25", "?26", "?27", "?28", "?29", "#SX", "?31",
};

/* frame: vector, error, rip, cs, rflags, rsp, ss (pushed by boot.S + CPU). */
void __attribute__((noreturn)) kfault(u64 *frame)
{
	u64 vec = frame[0];
	kputs("\nFAULT vector=");
	kputhex(vec);
	kputs(" (");
	kputs(exc_names[vec & 31]);
	kputs(") error=");
	kputhex(frame[1]);
	kputs(" rip=");
	kputhex(frame[2]);
	kputs(" cs=");
	kputhex(frame[3]);
	kputs(" rflags=");
	kputhex(frame[4]);
	kputs(" rsp=");
	kputhex(frame[5]);
	if (vec == 14) {
		u64 cr2;
		__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
		kputs(" cr2=");
		kputhex(cr2);
	}
	kputs("\n");
	kexit(EXIT_FAULT);
}

/* Map [16 MiB, end) with 2 MiB user pages; one PDE store per iteration. */
static i64 sys_map(u64 end)
{
	if (end > MAP_LIMIT)
		return -1;
	for (u64 a = WORKLOAD_BASE; a < end; a += 0x200000)
		pd0[a >> 21] = a | 0x87;
	/* Entries were not present before, so no TLB entry can be stale. */
	return 0;
}

i64 ksyscall(u64 nr, u64 a1, u64 a2, u64 a3)
{
	(void)a3;
	switch (nr) {
	case SYS_WRITE: {
		const char *p = (const char *)a1;
		for (u64 i = 0; i < a2; i++)
			kputc(p[i]);
		return (i64)a2;
	}
	case SYS_EXIT:
		kexit((u8)a1);
	case SYS_WAIT:
		/* sti's one-instruction shadow guarantees hlt runs before the timer
		 * interrupt is taken, so the wakeup cannot be missed. */
		__asm__ volatile("sti; hlt; cli" ::: "memory");
		return (i64)ticks;
	case SYS_SYNC:
		outl(PORT_SYNC, (u32)a1);
		return 0;
	case SYS_TICKS:
		return (i64)ticks;
	case SYS_MAP:
		return sys_map(a1);
	}
	return -1;
}

void __attribute__((noreturn)) kmain(u32 start_info)
{
	/* TSS: rsp0 for CPL3->CPL0 transitions, IST1 for double faults. */
	u64 t = (u64)&tss;
	tss.rsp0 = (u64)kstack_top;
	tss.ist[0] = (u64)dfstack_top;
	tss.iomap_base = sizeof(tss);   /* no I/O bitmap */
	gdt[5] = (sizeof(tss) - 1) | ((t & 0xffffff) << 16) | (0x89UL << 40) | ((t >> 24 & 0xff) << 56);
	gdt[6] = t >> 32;
	__asm__ volatile("ltr %w0" :: "r"(SEL_TSS));

	for (int v = 0; v < 32; v++)
		set_gate(v, isr_stubs + 16 * v, 0, v == 8 ? 1 : 0);
	set_gate(3, syscall_entry, 3, 0);       /* int3 from CPL3 = syscall */
	set_gate(VEC_SPURIOUS, spurious_entry, 0, 0);

	/* Mask the legacy PICs so a PIT IRQ0 can never show up as vector 8. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);

	u32 eax = 1, ebx, ecx, edx;
	__asm__ volatile("cpuid" : "+a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx));
	use_x2apic = (ecx >> 21) & 1;
	if (use_x2apic)
		wrmsr(0x1b, rdmsr(0x1b) | 0xc00);   /* EN | EXTD */
	set_gate(VEC_TIMER, use_x2apic ? timer_x2apic : timer_xapic, 0, 0);

	struct { u16 limit; u64 base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" :: "m"(idtr));

	apic_write(0xf0, 0x100 | VEC_SPURIOUS);     /* SVR: software enable */
	apic_write(0x350, 0x10000);                 /* LINT0 masked (no ExtINT) */
	apic_write(0x3e0, 0x3);                     /* divide by 16 */
	apic_write(0x320, VEC_TIMER | (1 << 17));   /* periodic */
	apic_write(0x380, TIMER_COUNT);             /* 62.5 MHz / 625000 = 100 Hz */

	/* Drop to CPL3: IF=1, IOPL=3 (ignored by PVM, harmless elsewhere). */
	__asm__ volatile(
		"pushq %[ss]\n\t"
		"pushq %[rsp]\n\t"
		"pushq $0x3202\n\t"
		"pushq %[cs]\n\t"
		"pushq %[rip]\n\t"
		"iretq"
		:: [ss] "i"(SEL_UDATA), [rsp] "r"((u64)ustack_top - 8), [cs] "i"(SEL_UCODE),
		   [rip] "r"((u64)user_main), "D"((u64)start_info)
		: "memory");
	__builtin_unreachable();
}
