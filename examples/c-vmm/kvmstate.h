/*
 * kvmstate.h: the in-kernel machine state of c-vmm's VM (vCPU registers, MSRs, LAPIC, XSAVE, events, PIC, IOAPIC,
 * PIT, kvmclock) as the blob of protocol/kvm-state.md, version 1. In the KVM dirty modes libmigrated captures and
 * restores this itself; in callback mode (--dirty callback) the library holds no KVM descriptors, so c-vmm writes
 * and reads the same blob, as device component MIGRATED_COMPONENT_KVM_VM, and guests still move between c-vmm in
 * any mode, MicroVM and the migrated daemon.
 */
#ifndef CVMM_KVMSTATE_H
#define CVMM_KVMSTATE_H

#include <stddef.h>
#include <stdint.h>

#include "vm.h"

#define KVMSTATE_VERSION 1u

/* Captures the state of the paused (or not yet started) VM into a new buffer the caller frees. 0, or -1 with
 * the reason in vm->error. */
int kvmstate_capture(struct vm *vm, uint8_t **blob, size_t *size);

/* Checks the whole blob, then restores it into the VM, whose vCPU has not run. 0, or -1 with the reason (and the
 * byte offset, for a malformed blob) in vm->error. */
int kvmstate_restore(struct vm *vm, const uint8_t *blob, size_t size);

#endif
