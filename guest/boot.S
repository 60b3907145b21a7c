/*
 * PVH entry, long-mode switch, interrupt entry stubs and the static tables.
 *
 * Guest CPL0 code is emulated at ~1 us per instruction on PVM hosts, so the
 * boot path avoids loops wherever a table can be built by the assembler
 * instead: the page tables for the first 16 MiB and the GDT are static data.
 */
#include "guest.h"

/* Xen PVH entry note: loaders jump to the 32-bit physical address in desc. */
	.section .note.pvh, "a"
	.balign 4
	.long 4                 /* namesz ("Xen\0") */
	.long 4                 /* descsz */
	.long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.long pvh_start32

	.section .text.boot, "ax"
	.code32
	.globl pvh_start32
/*
 * Entered in 32-bit protected mode, paging off, flat segments, no stack,
 * EBX = physical address of struct hvm_start_info.
 */
pvh_start32:
	cli
	movl %ebx, %esi                 /* survives into kmain's first argument */
	lgdt gdt_ptr
	/* PAE (required for long mode), OSFXSR|OSXMMEXCPT so CPL3 may use SSE2. */
	movl $0x620, %eax
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $0xc0000080, %ecx          /* EFER */
	rdmsr
	orl $0x100, %eax                /* LME */
	wrmsr
	/* PG|NE|ET|MP|PE, EM clear: x87/SSE usable (from CPL3 only, by policy). */
	movl $0x80000033, %eax
	movl %eax, %cr0
	ljmp $SEL_KCODE, $start64

	.code64
start64:
	movl $SEL_KDATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	movl $kstack_top, %esp
	movl %esi, %edi                 /* zero-extends: start_info pointer */
	call kmain
1:	cli
	hlt
	jmp 1b

	.text
/*
 * Exception stubs, one per vector 0..31, each 16 bytes apart so kernel.c can
 * compute stub addresses instead of reading a table.  Vectors that push no
 * error code get a dummy 0 so the frame layout is uniform.
 */
	.balign 16
	.globl isr_stubs
isr_stubs:
	.irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.balign 16
	.if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
	.else
	pushq $0
	.endif
	pushq $\vec
	jmp fault_common
	.endr

/* Frame on entry: vector, error, rip, cs, rflags, rsp, ss.  Never returns. */
fault_common:
	movq %rsp, %rdi
	andq $-16, %rsp
	call kfault
1:	cli
	hlt
	jmp 1b

/*
 * Syscall gate: `int3` from CPL3 (DPL-3 interrupt gate, so IF is clear here).
 * rax = number, rdi/rsi/rdx = args; result in rax.  All other registers are
 * preserved, and no SSE register is touched by CPL0, so no FPU state save.
 */
	.globl syscall_entry
syscall_entry:
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	movq %rdx, %rcx
	movq %rsi, %rdx
	movq %rdi, %rsi
	movq %rax, %rdi
	call ksyscall                   /* 8 pushes + 5-word frame: rsp is 16-aligned */
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	iretq

/* LAPIC timer, x2APIC flavour: EOI is a write of 0 to MSR 0x80b. */
	.globl timer_x2apic
timer_x2apic:
	pushq %rax
	pushq %rcx
	pushq %rdx
	incq ticks(%rip)
	movl $0x80b, %ecx
	xorl %eax, %eax
	xorl %edx, %edx
	wrmsr
	popq %rdx
	popq %rcx
	popq %rax
	iretq

/* LAPIC timer, xAPIC flavour: EOI register at 0xfee000b0 (needs a register:
 * a disp32 would sign-extend to 0xffffffff_fee000b0). */
	.globl timer_xapic
timer_xapic:
	pushq %rax
	incq ticks(%rip)
	movl $0xfee000b0, %eax
	movl $0, (%rax)
	popq %rax
	iretq

/* Spurious interrupts must not be EOI'd. */
	.globl spurious_entry
spurious_entry:
	iretq

	.data
	.balign 8
	.globl ticks
ticks:	.quad 0                         /* 100 Hz tick counter, readable from CPL3 */

	.balign 16
	.globl gdt
gdt:
	.quad 0
	.quad 0x00af9a000000ffff        /* 0x08 kernel code, 64-bit */
	.quad 0x00cf92000000ffff        /* 0x10 kernel data */
	.quad 0x00cff2000000ffff        /* 0x18 user data, DPL3 */
	.quad 0x00affa000000ffff        /* 0x20 user code, 64-bit, DPL3 */
	.quad 0, 0                      /* 0x28 64-bit TSS, filled in by kmain */
gdt_end:
	.balign 8
	.word 0
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad gdt

/*
 * Identity page tables.  PD0..PD3 are contiguous, so the PDE for physical
 * address A is pd0[A >> 21] for A < 4 GiB; SYS_MAP fills more of them.  The
 * first 16 MiB (image, kernel data, start_info below 1 MiB) are mapped here
 * statically; all entries are user-accessible (test guest, one address space).
 */
	.section .data.pagetables, "aw"
	.balign 4096
	.globl pml4, pd0
pml4:
	.quad pdpt + 0x7
	.fill 511, 8, 0
pdpt:
	.quad pd0 + 0x7, pd1 + 0x7, pd2 + 0x7, pd3 + 0x7
	.fill 508, 8, 0
pd0:
	.set addr, 0
	.rept 8
	.quad addr + 0x87               /* P|RW|US|PS */
	.set addr, addr + 0x200000
	.endr
	.fill 504, 8, 0
pd1:	.fill 512, 8, 0
pd2:	.fill 512, 8, 0
pd3:
	.fill 503, 8, 0
	.quad 0xfee00000 + 0x9b         /* xAPIC MMIO: P|RW|PWT|PCD|PS, kernel only */
	.fill 8, 8, 0

	.bss
	.balign 4096
	.space 16384
	.globl kstack_top
kstack_top:
	.space 4096
	.globl dfstack_top
dfstack_top:
	.space 65536                    /* CPL3 stack */
	.globl ustack_top
ustack_top:

	.section .note.GNU-stack, "", @progbits
