/*
 * pvh.h: loads a PVH-bootable ELF64 (an ELF note "Xen", type XEN_ELFNOTE_PHYS32_ENTRY, names the 32-bit entry)
 * into guest RAM, writes struct hvm_start_info, its memory map and the command line below 1 MiB, and sets the
 * vCPU up for the entry: 32-bit protected mode, paging off, flat segments, EBX = start_info.
 */
#ifndef CVMM_PVH_H
#define CVMM_PVH_H

#include "vm.h"

/* The largest image file read. */
#define PVH_MAX_IMAGE_SIZE (256u << 20)
/* The longest command line, without its NUL. */
#define PVH_MAX_CMDLINE 4095u

/* Loads `path` into `vm` (which has memory and a vCPU) and sets the boot registers. Returns 0, or -1 with the
 * reason in vm->error. */
int pvh_boot(struct vm *vm, const char *path, const char *cmdline);

#endif
