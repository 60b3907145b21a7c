/*
 * kvmstate.c: protocol/kvm-state.md, version 1, for c-vmm's one-vCPU VM, written from the specification.
 */
#define _GNU_SOURCE
#include "kvmstate.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

enum {
    TAG_PIC_MASTER = 0x0001,
    TAG_PIC_SLAVE = 0x0002,
    TAG_IOAPIC = 0x0003,
    TAG_PIT = 0x0004,
    TAG_CLOCK = 0x0005,
    TAG_VCPU_BEGIN = 0x0100,
    TAG_CPUID = 0x0101,
    TAG_MP_STATE = 0x0102,
    TAG_REGS = 0x0103,
    TAG_SREGS = 0x0104,
    TAG_XSAVE = 0x0105,
    TAG_XCRS = 0x0106,
    TAG_DEBUGREGS = 0x0107,
    TAG_LAPIC = 0x0108,
    TAG_MSRS = 0x0109,
    TAG_EVENTS = 0x010A,
    TAG_TSC_KHZ = 0x010B,
    TAG_END = 0xFFFF,
    TAG_OPTIONAL = 0x8000,
};

#define MAX_SECTION (1u << 20)
#define MAX_CPUID 512u
#define MAX_MSRS 2048u
#define MIN_XSAVE 4096u
#define MAX_XSAVE (1u << 20)

_Static_assert(sizeof(struct kvm_irqchip) == 520, "kvm_irqchip");
_Static_assert(sizeof(struct kvm_pit_state2) == 112, "kvm_pit_state2");
_Static_assert(sizeof(struct kvm_clock_data) == 48, "kvm_clock_data");
_Static_assert(sizeof(struct kvm_cpuid_entry2) == 40, "kvm_cpuid_entry2");
_Static_assert(sizeof(struct kvm_mp_state) == 4, "kvm_mp_state");
_Static_assert(sizeof(struct kvm_regs) == 144, "kvm_regs");
_Static_assert(sizeof(struct kvm_sregs) == 312, "kvm_sregs");
_Static_assert(sizeof(struct kvm_xsave) == 4096, "kvm_xsave");
_Static_assert(sizeof(struct kvm_xcrs) == 392, "kvm_xcrs");
_Static_assert(sizeof(struct kvm_debugregs) == 128, "kvm_debugregs");
_Static_assert(sizeof(struct kvm_lapic_state) == 1024, "kvm_lapic_state");
_Static_assert(sizeof(struct kvm_msr_entry) == 16, "kvm_msr_entry");
_Static_assert(sizeof(struct kvm_vcpu_events) == 64, "kvm_vcpu_events");

__attribute__((format(printf, 2, 3))) static int fail(struct vm *vm, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vsnprintf(vm->error, sizeof vm->error, format, args);
    va_end(args);
    return -1;
}

static int checked_ioctl(struct vm *vm, int fd, unsigned long request, void *argument, const char *name)
{
    int result;
    do {
        result = ioctl(fd, request, argument);
    } while (result < 0 && errno == EINTR);
    if (result < 0)
        return fail(vm, "%s: %s", name, strerror(errno));
    return result;
}

/* The size of the XSAVE area KVM_GET_XSAVE2 fills (KVM_CAP_XSAVE2), or 4096 for plain KVM_GET_XSAVE. */
static size_t xsave_size(struct vm *vm)
{
    int size = ioctl(vm->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
    return size > (int)MIN_XSAVE ? (size_t)size : MIN_XSAVE;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Writing
 * ------------------------------------------------------------------------------------------------------------ */

struct writer {
    uint8_t *bytes;
    size_t length, capacity;
    bool failed;
};

static void put(struct writer *w, const void *data, size_t size)
{
    if (w->failed)
        return;
    if (w->capacity - w->length < size) {
        size_t capacity = w->capacity ? w->capacity : 16384;
        while (capacity - w->length < size)
            capacity *= 2;
        uint8_t *grown = realloc(w->bytes, capacity);
        if (grown == NULL) {
            w->failed = true;
            return;
        }
        w->bytes = grown;
        w->capacity = capacity;
    }
    if (size)
        memcpy(w->bytes + w->length, data, size);
    w->length += size;
}

static void put_u32(struct writer *w, uint32_t value) { put(w, &value, 4); } /* x86-64: little-endian */

/* One section: tag, length, the body, zero padding to 8 bytes. */
static void section(struct writer *w, uint32_t tag, const void *body, size_t size)
{
    static const uint8_t zeros[8];
    put_u32(w, tag);
    put_u32(w, (uint32_t)size);
    put(w, body, size);
    put(w, zeros, (8 - size % 8) % 8);
}

/* A section whose body is a u32 count, a u32 zero and `count` entries. */
static void counted_section(struct writer *w, uint32_t tag, uint32_t count, const void *entries, size_t entry_size)
{
    static const uint8_t zeros[8];
    size_t size = 8 + (size_t)count * entry_size;
    put_u32(w, tag);
    put_u32(w, (uint32_t)size);
    put_u32(w, count);
    put_u32(w, 0);
    put(w, entries, (size_t)count * entry_size);
    put(w, zeros, (8 - size % 8) % 8);
}

/* KVM_GET_CPUID2 of the vCPU (what was set, or restored). */
static struct kvm_cpuid2 *get_cpuid(struct vm *vm)
{
    for (uint32_t capacity = 64; capacity <= MAX_CPUID; capacity *= 2) {
        struct kvm_cpuid2 *cpuid = calloc(1, sizeof *cpuid + capacity * sizeof(struct kvm_cpuid_entry2));
        if (cpuid == NULL) {
            fail(vm, "out of memory");
            return NULL;
        }
        cpuid->nent = capacity;
        if (ioctl(vm->vcpu_fd, KVM_GET_CPUID2, cpuid) == 0)
            return cpuid;
        int error = errno;
        free(cpuid);
        if (error != E2BIG) {
            fail(vm, "KVM_GET_CPUID2: %s", strerror(error));
            return NULL;
        }
    }
    fail(vm, "KVM_GET_CPUID2: more than %u entries", MAX_CPUID);
    return NULL;
}

/* The MSRs worth saving: those of KVM_GET_MSR_INDEX_LIST this vCPU reads back (some depend on CPU features the
 * host lacks), probed one at a time. */
static struct kvm_msrs *saved_msrs(struct vm *vm)
{
    struct kvm_msr_list *list = NULL;
    for (uint32_t capacity = 128; capacity <= 65536; capacity *= 4) {
        list = calloc(1, sizeof *list + capacity * sizeof(uint32_t));
        if (list == NULL) {
            fail(vm, "out of memory");
            return NULL;
        }
        list->nmsrs = capacity;
        if (ioctl(vm->kvm_fd, KVM_GET_MSR_INDEX_LIST, list) == 0)
            break;
        int error = errno;
        free(list);
        list = NULL;
        if (error != E2BIG) {
            fail(vm, "KVM_GET_MSR_INDEX_LIST: %s", strerror(error));
            return NULL;
        }
    }
    if (list == NULL) {
        fail(vm, "KVM_GET_MSR_INDEX_LIST: list too long");
        return NULL;
    }
    uint32_t count = list->nmsrs < MAX_MSRS ? list->nmsrs : MAX_MSRS;
    struct kvm_msrs *msrs = calloc(1, sizeof *msrs + count * sizeof(struct kvm_msr_entry));
    if (msrs == NULL) {
        free(list);
        fail(vm, "out of memory");
        return NULL;
    }
    struct kvm_msrs *probe = calloc(1, sizeof *probe + sizeof(struct kvm_msr_entry));
    if (probe == NULL) {
        free(list);
        free(msrs);
        fail(vm, "out of memory");
        return NULL;
    }
    for (uint32_t i = 0; i < count; i++) {
        probe->nmsrs = 1;
        probe->entries[0].index = list->indices[i];
        probe->entries[0].data = 0;
        if (ioctl(vm->vcpu_fd, KVM_GET_MSRS, probe) == 1)
            msrs->entries[msrs->nmsrs++].index = list->indices[i];
    }
    free(probe);
    free(list);
    if (msrs->nmsrs > 0) {
        int read = checked_ioctl(vm, vm->vcpu_fd, KVM_GET_MSRS, msrs, "KVM_GET_MSRS");
        if (read != (int)msrs->nmsrs) {
            if (read >= 0)
                fail(vm, "KVM_GET_MSRS: %d of %u MSRs read back", read, msrs->nmsrs);
            free(msrs);
            return NULL;
        }
    }
    return msrs;
}

int kvmstate_capture(struct vm *vm, uint8_t **blob_out, size_t *size_out)
{
    struct writer w = {0};
    struct kvm_cpuid2 *cpuid = NULL;
    struct kvm_msrs *msrs = NULL;
    void *xsave = NULL;
    int status = -1;

    put(&w, "KVMSTATE", 8);
    put_u32(&w, KVMSTATE_VERSION);
    put_u32(&w, 0);

    static const struct {
        uint32_t tag, chip;
    } chips[] = {{TAG_PIC_MASTER, KVM_IRQCHIP_PIC_MASTER}, {TAG_PIC_SLAVE, KVM_IRQCHIP_PIC_SLAVE}, {TAG_IOAPIC, KVM_IRQCHIP_IOAPIC}};
    for (size_t i = 0; i < 3; i++) {
        struct kvm_irqchip chip;
        memset(&chip, 0, sizeof chip);
        chip.chip_id = chips[i].chip;
        if (checked_ioctl(vm, vm->vm_fd, KVM_GET_IRQCHIP, &chip, "KVM_GET_IRQCHIP") < 0)
            goto out;
        section(&w, chips[i].tag, &chip, sizeof chip);
    }
    struct kvm_pit_state2 pit;
    memset(&pit, 0, sizeof pit);
    if (checked_ioctl(vm, vm->vm_fd, KVM_GET_PIT2, &pit, "KVM_GET_PIT2") < 0)
        goto out;
    section(&w, TAG_PIT, &pit, sizeof pit);
    struct kvm_clock_data clock;
    memset(&clock, 0, sizeof clock);
    if (checked_ioctl(vm, vm->vm_fd, KVM_GET_CLOCK, &clock, "KVM_GET_CLOCK") < 0)
        goto out;
    section(&w, TAG_CLOCK, &clock, sizeof clock);

    /* vCPU 0. The MP state is read first: reading it makes KVM process pending APIC events. */
    struct kvm_mp_state mp;
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_xcrs xcrs;
    struct kvm_debugregs debugregs;
    struct kvm_lapic_state lapic;
    struct kvm_vcpu_events events;
    memset(&mp, 0, sizeof mp);
    memset(&regs, 0, sizeof regs);
    memset(&sregs, 0, sizeof sregs);
    memset(&xcrs, 0, sizeof xcrs);
    memset(&debugregs, 0, sizeof debugregs);
    memset(&lapic, 0, sizeof lapic);
    memset(&events, 0, sizeof events);
    size_t xsave_bytes = xsave_size(vm);
    xsave = calloc(1, xsave_bytes);
    if (xsave == NULL) {
        fail(vm, "out of memory");
        goto out;
    }
    if (checked_ioctl(vm, vm->vcpu_fd, KVM_GET_MP_STATE, &mp, "KVM_GET_MP_STATE") < 0 ||
        checked_ioctl(vm, vm->vcpu_fd, KVM_GET_REGS, &regs, "KVM_GET_REGS") < 0 ||
        checked_ioctl(vm, vm->vcpu_fd, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS") < 0 ||
        checked_ioctl(vm, vm->vcpu_fd, xsave_bytes > MIN_XSAVE ? KVM_GET_XSAVE2 : KVM_GET_XSAVE, xsave,
                      "KVM_GET_XSAVE") < 0 ||
        checked_ioctl(vm, vm->vcpu_fd, KVM_GET_XCRS, &xcrs, "KVM_GET_XCRS") < 0 ||
        checked_ioctl(vm, vm->vcpu_fd, KVM_GET_DEBUGREGS, &debugregs, "KVM_GET_DEBUGREGS") < 0 ||
        checked_ioctl(vm, vm->vcpu_fd, KVM_GET_LAPIC, &lapic, "KVM_GET_LAPIC") < 0)
        goto out;
    msrs = saved_msrs(vm);
    if (msrs == NULL)
        goto out;
    if (checked_ioctl(vm, vm->vcpu_fd, KVM_GET_VCPU_EVENTS, &events, "KVM_GET_VCPU_EVENTS") < 0)
        goto out;
    cpuid = get_cpuid(vm);
    if (cpuid == NULL)
        goto out;
    int khz = checked_ioctl(vm, vm->vcpu_fd, KVM_GET_TSC_KHZ, NULL, "KVM_GET_TSC_KHZ");
    if (khz <= 0) {
        if (khz == 0)
            fail(vm, "KVM_GET_TSC_KHZ: 0");
        goto out;
    }

    uint32_t begin[2] = {0 /* vCPU id */, 0};
    section(&w, TAG_VCPU_BEGIN, begin, sizeof begin);
    counted_section(&w, TAG_CPUID, cpuid->nent, cpuid->entries, sizeof(struct kvm_cpuid_entry2));
    section(&w, TAG_MP_STATE, &mp, sizeof mp);
    section(&w, TAG_REGS, &regs, sizeof regs);
    section(&w, TAG_SREGS, &sregs, sizeof sregs);
    section(&w, TAG_XSAVE, xsave, xsave_bytes);
    section(&w, TAG_XCRS, &xcrs, sizeof xcrs);
    section(&w, TAG_DEBUGREGS, &debugregs, sizeof debugregs);
    section(&w, TAG_LAPIC, &lapic, sizeof lapic);
    counted_section(&w, TAG_MSRS, msrs->nmsrs, msrs->entries, sizeof(struct kvm_msr_entry));
    section(&w, TAG_EVENTS, &events, sizeof events);
    uint32_t tsc[2] = {(uint32_t)khz, 0};
    section(&w, TAG_TSC_KHZ, tsc, sizeof tsc);
    section(&w, TAG_END, NULL, 0);
    if (w.failed) {
        fail(vm, "out of memory");
        goto out;
    }
    *blob_out = w.bytes;
    *size_out = w.length;
    w.bytes = NULL;
    status = 0;
out:
    free(w.bytes);
    free(cpuid);
    free(msrs);
    free(xsave);
    return status;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Reading
 * ------------------------------------------------------------------------------------------------------------ */

/* Where each section's body lies in the blob, once all are checked. */
struct parsed {
    const uint8_t *body[TAG_TSC_KHZ + 1];
    uint32_t length[TAG_TSC_KHZ + 1];
    bool vm_seen[TAG_CLOCK + 1];
    bool vcpu_seen[TAG_TSC_KHZ + 1];
};

static uint32_t read_u32(const uint8_t *at)
{
    uint32_t value;
    memcpy(&value, at, 4);
    return value;
}

static size_t fixed_size(uint32_t tag)
{
    switch (tag) {
    case TAG_PIC_MASTER:
    case TAG_PIC_SLAVE:
    case TAG_IOAPIC: return sizeof(struct kvm_irqchip);
    case TAG_PIT: return sizeof(struct kvm_pit_state2);
    case TAG_CLOCK: return sizeof(struct kvm_clock_data);
    case TAG_VCPU_BEGIN: return 8;
    case TAG_MP_STATE: return sizeof(struct kvm_mp_state);
    case TAG_REGS: return sizeof(struct kvm_regs);
    case TAG_SREGS: return sizeof(struct kvm_sregs);
    case TAG_XCRS: return sizeof(struct kvm_xcrs);
    case TAG_DEBUGREGS: return sizeof(struct kvm_debugregs);
    case TAG_LAPIC: return sizeof(struct kvm_lapic_state);
    case TAG_EVENTS: return sizeof(struct kvm_vcpu_events);
    case TAG_TSC_KHZ: return 8;
    default: return 0; /* CPUID, XSAVE, MSRS: variable */
    }
}

static const char *tag_name(uint32_t tag)
{
    switch (tag) {
    case TAG_PIC_MASTER: return "PIC_MASTER";
    case TAG_PIC_SLAVE: return "PIC_SLAVE";
    case TAG_IOAPIC: return "IOAPIC";
    case TAG_PIT: return "PIT";
    case TAG_CLOCK: return "CLOCK";
    case TAG_VCPU_BEGIN: return "VCPU_BEGIN";
    case TAG_CPUID: return "CPUID";
    case TAG_MP_STATE: return "MP_STATE";
    case TAG_REGS: return "REGS";
    case TAG_SREGS: return "SREGS";
    case TAG_XSAVE: return "XSAVE";
    case TAG_XCRS: return "XCRS";
    case TAG_DEBUGREGS: return "DEBUGREGS";
    case TAG_LAPIC: return "LAPIC";
    case TAG_MSRS: return "MSRS";
    case TAG_EVENTS: return "EVENTS";
    case TAG_TSC_KHZ: return "TSC_KHZ";
    default: return "?";
    }
}

/* Checks a counted section (u32 count, u32 zero, count entries) against its limit. */
static int check_counted(struct vm *vm, size_t offset, uint32_t tag, const uint8_t *body, uint32_t length,
                         size_t entry_size, uint32_t limit)
{
    if (length < 8)
        return fail(vm, "KVM state blob, offset %zu: %s section of %u bytes has no count", offset, tag_name(tag), length);
    uint32_t count = read_u32(body);
    if (count > limit)
        return fail(vm, "KVM state blob, offset %zu: %u %s entries exceed the limit of %u", offset, count,
                    tag_name(tag), limit);
    if (read_u32(body + 4) != 0)
        return fail(vm, "KVM state blob, offset %zu: %s section's reserved word is not zero", offset, tag_name(tag));
    if ((uint64_t)length != 8 + (uint64_t)count * entry_size)
        return fail(vm, "KVM state blob, offset %zu: %s section of %u bytes does not hold %u entries of %zu", offset,
                    tag_name(tag), length, count, entry_size);
    return 0;
}

static int parse(struct vm *vm, const uint8_t *blob, size_t size, struct parsed *p)
{
    memset(p, 0, sizeof *p);
    if (size < 16 || memcmp(blob, "KVMSTATE", 8) != 0)
        return fail(vm, "KVM state blob, offset 0: not a KVM state blob (bad magic or too short)");
    uint32_t version = read_u32(blob + 8), flags = read_u32(blob + 12);
    if (version != KVMSTATE_VERSION)
        return fail(vm, "KVM state blob, offset 8: version %u is not supported (this VMM reads %u)", version,
                    KVMSTATE_VERSION);
    if (flags != 0)
        return fail(vm, "KVM state blob, offset 12: unknown flags 0x%x", flags);
    size_t offset = 16;
    unsigned vcpus = 0;
    bool ended = false;
    while (!ended) {
        if (size - offset < 8)
            return fail(vm, "KVM state blob, offset %zu: truncated before END", offset);
        uint32_t tag = read_u32(blob + offset), length = read_u32(blob + offset + 4);
        if (length > MAX_SECTION)
            return fail(vm, "KVM state blob, offset %zu: section length %u exceeds %u", offset + 4, length, MAX_SECTION);
        size_t padded = ((size_t)length + 7) & ~(size_t)7;
        if (size - offset - 8 < padded)
            return fail(vm, "KVM state blob, offset %zu: section 0x%x of %u bytes runs past the end", offset, tag,
                        length);
        const uint8_t *body = blob + offset + 8;
        for (size_t i = length; i < padded; i++) {
            if (body[i] != 0)
                return fail(vm, "KVM state blob, offset %zu: non-zero padding", offset + 8 + i);
        }
        size_t here = offset;
        offset += 8 + padded;

        bool known = (tag >= TAG_PIC_MASTER && tag <= TAG_CLOCK) || (tag >= TAG_VCPU_BEGIN && tag <= TAG_TSC_KHZ) ||
                     tag == TAG_END;
        if (!known) {
            if (tag & TAG_OPTIONAL)
                continue;
            return fail(vm, "KVM state blob, offset %zu: unknown mandatory section 0x%x", here, tag);
        }
        if (tag == TAG_END) {
            if (length != 0)
                return fail(vm, "KVM state blob, offset %zu: END section has a body", here);
            ended = true;
            break;
        }
        size_t fixed = fixed_size(tag);
        if (fixed && length != fixed)
            return fail(vm, "KVM state blob, offset %zu: %s section of %u bytes, expected %zu", here, tag_name(tag),
                        length, fixed);
        if (tag <= TAG_CLOCK) {
            if (vcpus > 0)
                return fail(vm, "KVM state blob, offset %zu: VM section %s after a vCPU", here, tag_name(tag));
            if (p->vm_seen[tag])
                return fail(vm, "KVM state blob, offset %zu: %s appears twice", here, tag_name(tag));
            p->vm_seen[tag] = true;
            p->body[tag] = body;
            p->length[tag] = length;
            continue;
        }
        if (tag == TAG_VCPU_BEGIN) {
            if (++vcpus > 1)
                return fail(vm, "KVM state blob, offset %zu: a state of more than one vCPU; this VMM runs one", here);
            if (read_u32(body) != 0)
                return fail(vm, "KVM state blob, offset %zu: vCPU id %u; this VMM's vCPU is 0", here, read_u32(body));
            continue;
        }
        if (vcpus == 0)
            return fail(vm, "KVM state blob, offset %zu: vCPU section %s before any VCPU_BEGIN", here, tag_name(tag));
        if (p->vcpu_seen[tag])
            return fail(vm, "KVM state blob, offset %zu: %s appears twice for vCPU 0", here, tag_name(tag));
        if (tag == TAG_CPUID &&
            check_counted(vm, here, tag, body, length, sizeof(struct kvm_cpuid_entry2), MAX_CPUID) < 0)
            return -1;
        if (tag == TAG_MSRS && check_counted(vm, here, tag, body, length, sizeof(struct kvm_msr_entry), MAX_MSRS) < 0)
            return -1;
        if (tag == TAG_XSAVE && (length < MIN_XSAVE || length > MAX_XSAVE))
            return fail(vm, "KVM state blob, offset %zu: XSAVE area of %u bytes (%u to %u)", here, length, MIN_XSAVE,
                        MAX_XSAVE);
        p->vcpu_seen[tag] = true;
        p->body[tag] = body;
        p->length[tag] = length;
    }
    if (offset != size)
        return fail(vm, "KVM state blob, offset %zu: %zu bytes after END", offset, size - offset);
    for (uint32_t tag = TAG_PIC_MASTER; tag <= TAG_CLOCK; tag++) {
        if (!p->vm_seen[tag])
            return fail(vm, "KVM state blob: the VM section %s is missing", tag_name(tag));
    }
    if (vcpus != 1)
        return fail(vm, "KVM state blob: no vCPU; this VMM runs one");
    for (uint32_t tag = TAG_CPUID; tag <= TAG_TSC_KHZ; tag++) {
        if (!p->vcpu_seen[tag])
            return fail(vm, "KVM state blob: vCPU 0 lacks its %s section", tag_name(tag));
    }
    return 0;
}

/* Copies a fixed-size body into its (aligned) structure and calls the ioctl. */
static int set_fixed(struct vm *vm, int fd, unsigned long request, const struct parsed *p, uint32_t tag, void *scratch,
                     const char *name)
{
    memcpy(scratch, p->body[tag], p->length[tag]);
    return checked_ioctl(vm, fd, request, scratch, name) < 0 ? -1 : 0;
}

int kvmstate_restore(struct vm *vm, const uint8_t *blob, size_t size)
{
    struct parsed p;
    if (parse(vm, blob, size, &p) < 0)
        return -1;

    /* The TSC rate cannot be set on every host (no KVM_CAP_TSC_CONTROL here): refuse a state whose rate differs
     * by more than 0.1%, rather than let the guest's time run at the wrong speed. */
    uint32_t saved_khz = read_u32(p.body[TAG_TSC_KHZ]);
    int host_khz = checked_ioctl(vm, vm->vcpu_fd, KVM_GET_TSC_KHZ, NULL, "KVM_GET_TSC_KHZ");
    if (host_khz <= 0)
        return host_khz == 0 ? fail(vm, "KVM_GET_TSC_KHZ: 0") : -1;
    uint64_t difference = saved_khz > (uint32_t)host_khz ? saved_khz - (uint32_t)host_khz : (uint32_t)host_khz - saved_khz;
    uint64_t larger = saved_khz > (uint32_t)host_khz ? saved_khz : (uint32_t)host_khz;
    if (difference * 1000 > larger)
        return fail(vm, "the saved TSC runs at %u kHz, this host's at %d kHz", saved_khz, host_khz);

    int status = -1;
    void *scratch = NULL;
    size_t xsave_bytes = xsave_size(vm);
    if (p.length[TAG_XSAVE] > xsave_bytes)
        xsave_bytes = p.length[TAG_XSAVE];
    size_t largest = xsave_bytes;
    size_t cpuid_bytes = sizeof(struct kvm_cpuid2) + (size_t)read_u32(p.body[TAG_CPUID]) * sizeof(struct kvm_cpuid_entry2);
    size_t msr_bytes = sizeof(struct kvm_msrs) + (size_t)read_u32(p.body[TAG_MSRS]) * sizeof(struct kvm_msr_entry);
    if (cpuid_bytes > largest)
        largest = cpuid_bytes;
    if (msr_bytes > largest)
        largest = msr_bytes;
    scratch = calloc(1, largest);
    if (scratch == NULL)
        return fail(vm, "out of memory");

    /* CPUID first: it decides which registers and MSRs are valid. */
    struct kvm_cpuid2 *cpuid = scratch;
    memset(scratch, 0, largest);
    cpuid->nent = read_u32(p.body[TAG_CPUID]);
    memcpy(cpuid->entries, p.body[TAG_CPUID] + 8, cpuid->nent * sizeof(struct kvm_cpuid_entry2));
    if (checked_ioctl(vm, vm->vcpu_fd, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2") < 0)
        goto out;
    union {
        struct kvm_mp_state mp;
        struct kvm_regs regs;
        struct kvm_sregs sregs;
        struct kvm_xcrs xcrs;
        struct kvm_debugregs debugregs;
        struct kvm_lapic_state lapic;
        struct kvm_vcpu_events events;
        struct kvm_irqchip chip;
        struct kvm_pit_state2 pit;
        struct kvm_clock_data clock;
    } s;
    if (set_fixed(vm, vm->vcpu_fd, KVM_SET_MP_STATE, &p, TAG_MP_STATE, &s, "KVM_SET_MP_STATE") < 0 ||
        set_fixed(vm, vm->vcpu_fd, KVM_SET_REGS, &p, TAG_REGS, &s, "KVM_SET_REGS") < 0 ||
        set_fixed(vm, vm->vcpu_fd, KVM_SET_SREGS, &p, TAG_SREGS, &s, "KVM_SET_SREGS") < 0)
        goto out;
    /* KVM_SET_XSAVE reads as many bytes as this host's area has: a zero-filled buffer of at least that size. */
    memset(scratch, 0, largest);
    memcpy(scratch, p.body[TAG_XSAVE], p.length[TAG_XSAVE]);
    if (checked_ioctl(vm, vm->vcpu_fd, KVM_SET_XSAVE, scratch, "KVM_SET_XSAVE") < 0)
        goto out;
    if (set_fixed(vm, vm->vcpu_fd, KVM_SET_XCRS, &p, TAG_XCRS, &s, "KVM_SET_XCRS") < 0 ||
        set_fixed(vm, vm->vcpu_fd, KVM_SET_DEBUGREGS, &p, TAG_DEBUGREGS, &s, "KVM_SET_DEBUGREGS") < 0 ||
        set_fixed(vm, vm->vcpu_fd, KVM_SET_LAPIC, &p, TAG_LAPIC, &s, "KVM_SET_LAPIC") < 0)
        goto out;
    /* MSRs after the LAPIC: the TSC deadline needs it. */
    struct kvm_msrs *msrs = scratch;
    memset(scratch, 0, largest);
    msrs->nmsrs = read_u32(p.body[TAG_MSRS]);
    memcpy(msrs->entries, p.body[TAG_MSRS] + 8, msrs->nmsrs * sizeof(struct kvm_msr_entry));
    uint32_t wanted = msrs->nmsrs;
    int set = checked_ioctl(vm, vm->vcpu_fd, KVM_SET_MSRS, msrs, "KVM_SET_MSRS");
    if (set < 0)
        goto out;
    if ((uint32_t)set != wanted) {
        fail(vm, "KVM_SET_MSRS: MSR 0x%x refused after %d of %u", msrs->entries[set].index, set, wanted);
        goto out;
    }
    if (set_fixed(vm, vm->vcpu_fd, KVM_SET_VCPU_EVENTS, &p, TAG_EVENTS, &s, "KVM_SET_VCPU_EVENTS") < 0 ||
        set_fixed(vm, vm->vm_fd, KVM_SET_IRQCHIP, &p, TAG_PIC_MASTER, &s, "KVM_SET_IRQCHIP (PIC master)") < 0 ||
        set_fixed(vm, vm->vm_fd, KVM_SET_IRQCHIP, &p, TAG_PIC_SLAVE, &s, "KVM_SET_IRQCHIP (PIC slave)") < 0 ||
        set_fixed(vm, vm->vm_fd, KVM_SET_IRQCHIP, &p, TAG_IOAPIC, &s, "KVM_SET_IRQCHIP (IOAPIC)") < 0 ||
        set_fixed(vm, vm->vm_fd, KVM_SET_PIT2, &p, TAG_PIT, &s, "KVM_SET_PIT2") < 0)
        goto out;
    /* Only the clock value: KVM refuses flags it did not hand out for this purpose. */
    struct kvm_clock_data clock;
    memcpy(&clock, p.body[TAG_CLOCK], sizeof clock);
    memset(&s.clock, 0, sizeof s.clock);
    s.clock.clock = clock.clock;
    if (checked_ioctl(vm, vm->vm_fd, KVM_SET_CLOCK, &s.clock, "KVM_SET_CLOCK") < 0)
        goto out;
    status = 0;
out:
    free(scratch);
    return status;
}
