/*
 * pvh.c: the PVH boot protocol for c-vmm. Every field of the ELF file is checked before it is used: a bad file is
 * an error with a reason, never a crash.
 */
#define _GNU_SOURCE
#include "pvh.h"

#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define HVM_START_MAGIC 0x336ec578u

/* Where the boot information goes: below 1 MiB (where PVH kernels are linked) and above the real-mode IVT and
 * BIOS data area, which a guest might still look at. */
#define BOOT_START_INFO 0x7000ull
#define BOOT_MEMMAP 0x7100ull  /* up to 10 entries of 24 bytes fit before the command line */
#define BOOT_CMDLINE 0x8000ull /* up to 4096 bytes with the NUL */
#define BOOT_END 0x9000ull

/* struct hvm_start_info, version 1 (xen/include/public/arch-x86/hvm/start_info.h), little-endian. */
struct hvm_start_info {
    uint32_t magic;
    uint32_t version;
    uint32_t flags;
    uint32_t nr_modules;
    uint64_t modlist_paddr;
    uint64_t cmdline_paddr;
    uint64_t rsdp_paddr;
    uint64_t memmap_paddr;
    uint32_t memmap_entries;
    uint32_t reserved;
};

struct hvm_memmap_table_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type; /* 1: RAM */
    uint32_t reserved;
};

_Static_assert(sizeof(struct hvm_start_info) == 56, "hvm_start_info is 56 bytes");
_Static_assert(sizeof(struct hvm_memmap_table_entry) == 24, "hvm_memmap_table_entry is 24 bytes");

__attribute__((format(printf, 2, 3))) static int pvh_fail(struct vm *vm, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vsnprintf(vm->error, sizeof vm->error, format, args);
    va_end(args);
    return -1;
}

/* Reads the whole file; NULL with the reason in vm->error. */
static uint8_t *read_image(struct vm *vm, const char *path, size_t *size_out)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        pvh_fail(vm, "cannot open guest image %s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat status;
    if (fstat(fd, &status) < 0) {
        pvh_fail(vm, "cannot stat guest image %s: %s", path, strerror(errno));
        close(fd);
        return NULL;
    }
    if (!S_ISREG(status.st_mode)) {
        pvh_fail(vm, "guest image %s is not a regular file", path);
        close(fd);
        return NULL;
    }
    if (status.st_size < (off_t)sizeof(Elf64_Ehdr) || status.st_size > (off_t)PVH_MAX_IMAGE_SIZE) {
        pvh_fail(vm, "guest image %s has %lld bytes: not an ELF64 image of at most %u MiB", path,
                 (long long)status.st_size, PVH_MAX_IMAGE_SIZE >> 20);
        close(fd);
        return NULL;
    }
    size_t size = (size_t)status.st_size;
    uint8_t *bytes = malloc(size);
    if (bytes == NULL) {
        pvh_fail(vm, "out of memory reading %s", path);
        close(fd);
        return NULL;
    }
    size_t done = 0;
    while (done < size) {
        ssize_t got = read(fd, bytes + done, size - done);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            pvh_fail(vm, "cannot read guest image %s: %s", path, got < 0 ? strerror(errno) : "it shrank while read");
            free(bytes);
            close(fd);
            return NULL;
        }
        done += (size_t)got;
    }
    close(fd);
    *size_out = size;
    return bytes;
}

static uint32_t align4(uint32_t value) { return (value + 3u) & ~3u; }

/* Looks for the PVH entry note in one PT_NOTE segment. Returns 1 and sets *entry when found, 0 when not, -1 on a
 * malformed note. */
static int find_entry_note(struct vm *vm, const uint8_t *notes, uint64_t size, uint64_t *entry)
{
    uint64_t offset = 0;
    while (size - offset >= 12) {
        uint32_t name_size, desc_size, type;
        memcpy(&name_size, notes + offset, 4);
        memcpy(&desc_size, notes + offset + 4, 4);
        memcpy(&type, notes + offset + 8, 4);
        if (name_size > 4096 || desc_size > 65536)
            return pvh_fail(vm, "guest image: ELF note at offset %llu has sizes %u and %u", (unsigned long long)offset,
                            name_size, desc_size);
        uint64_t name_at = offset + 12;
        uint64_t desc_at = name_at + align4(name_size);
        uint64_t next = desc_at + align4(desc_size);
        if (next > size)
            return pvh_fail(vm, "guest image: ELF note at offset %llu runs past the end of its segment",
                            (unsigned long long)offset);
        if (type == XEN_ELFNOTE_PHYS32_ENTRY && name_size == 4 && memcmp(notes + name_at, "Xen", 4) == 0) {
            if (desc_size == 4) {
                uint32_t value;
                memcpy(&value, notes + desc_at, 4);
                *entry = value;
            } else if (desc_size == 8) {
                uint64_t value;
                memcpy(&value, notes + desc_at, 8);
                *entry = value;
            } else {
                return pvh_fail(vm, "guest image: the PVH entry note has %u bytes of description, not 4 or 8", desc_size);
            }
            return 1;
        }
        offset = next;
    }
    return 0;
}

static bool ranges_overlap(uint64_t a, uint64_t a_size, uint64_t b, uint64_t b_size)
{
    return a < b + b_size && b < a + a_size;
}

static int set_boot_registers(struct vm *vm, uint32_t entry, uint64_t start_info)
{
    struct kvm_sregs sregs;
    if (ioctl(vm->vcpu_fd, KVM_GET_SREGS, &sregs) < 0)
        return pvh_fail(vm, "KVM_GET_SREGS: %s", strerror(errno));
    struct kvm_segment code = {
        .base = 0, .limit = 0xFFFFFFFF, .selector = 0x10, .type = 0xB, /* execute/read, accessed */
        .present = 1, .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1,
    };
    struct kvm_segment data = code;
    data.selector = 0x18;
    data.type = 0x3; /* read/write, accessed */
    sregs.cs = code;
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    struct kvm_segment task = {
        .base = 0, .limit = 0x67, .selector = 0x20, .type = 0xB, /* busy 32-bit TSS */
        .present = 1, .dpl = 0, .db = 0, .s = 0, .l = 0, .g = 0,
    };
    sregs.tr = task;
    sregs.cr0 = 0x11; /* PE, ET: protected mode, paging off */
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    if (ioctl(vm->vcpu_fd, KVM_SET_SREGS, &sregs) < 0)
        return pvh_fail(vm, "KVM_SET_SREGS: %s", strerror(errno));

    struct kvm_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.rip = entry;
    regs.rbx = start_info;
    regs.rflags = 0x2; /* reserved bit 1; interrupts off */
    if (ioctl(vm->vcpu_fd, KVM_SET_REGS, &regs) < 0)
        return pvh_fail(vm, "KVM_SET_REGS: %s", strerror(errno));
    return 0;
}

/* Checks the file and copies its segments; returns the entry point, or -1. */
static int64_t load_elf(struct vm *vm, const char *path, const uint8_t *image, size_t size)
{
    Elf64_Ehdr header;
    memcpy(&header, image, sizeof header);
    if (memcmp(header.e_ident, ELFMAG, SELFMAG) != 0)
        return pvh_fail(vm, "guest image %s is not an ELF file", path);
    if (header.e_ident[EI_CLASS] != ELFCLASS64)
        return pvh_fail(vm, "guest image %s: only 64-bit ELF files are loaded (EI_CLASS %u)", path,
                        header.e_ident[EI_CLASS]);
    if (header.e_ident[EI_DATA] != ELFDATA2LSB)
        return pvh_fail(vm, "guest image %s is not little-endian", path);
    if (header.e_ident[EI_VERSION] != EV_CURRENT)
        return pvh_fail(vm, "guest image %s: ELF version %u", path, header.e_ident[EI_VERSION]);
    if (header.e_machine != EM_X86_64)
        return pvh_fail(vm, "guest image %s: ELF machine %u is not x86-64 (%u)", path, header.e_machine, EM_X86_64);
    if (header.e_type != ET_EXEC)
        return pvh_fail(vm, "guest image %s: ELF type %u is not an executable (ET_EXEC)", path, header.e_type);
    if (header.e_phnum == 0 || header.e_phnum == PN_XNUM)
        return pvh_fail(vm, "guest image %s has %u program headers", path, header.e_phnum);
    if (header.e_phentsize < sizeof(Elf64_Phdr))
        return pvh_fail(vm, "guest image %s: program header size %u (at least %zu)", path, header.e_phentsize,
                        sizeof(Elf64_Phdr));
    uint64_t table_size = (uint64_t)header.e_phnum * header.e_phentsize;
    if (header.e_phoff > size || table_size > size - header.e_phoff)
        return pvh_fail(vm, "guest image %s: the program headers lie beyond the end of the file", path);

    /* First pass: check everything, find the entry. Nothing is written to guest memory until all is known good. */
    uint64_t entry = 0;
    bool have_entry = false;
    unsigned loads = 0;
    for (unsigned i = 0; i < header.e_phnum; i++) {
        Elf64_Phdr segment;
        memcpy(&segment, image + header.e_phoff + (uint64_t)i * header.e_phentsize, sizeof segment);
        if (segment.p_type != PT_LOAD && segment.p_type != PT_NOTE)
            continue;
        if (segment.p_offset > size || segment.p_filesz > size - segment.p_offset)
            return pvh_fail(vm, "guest image %s: segment %u lies beyond the end of the file", path, i);
        if (segment.p_type == PT_NOTE) {
            uint64_t found = 0;
            int result = find_entry_note(vm, image + segment.p_offset, segment.p_filesz, &found);
            if (result < 0)
                return -1;
            if (result > 0) {
                entry = found;
                have_entry = true;
            }
            continue;
        }
        loads++;
        if (segment.p_memsz < segment.p_filesz)
            return pvh_fail(vm, "guest image %s: segment %u is smaller in memory (%llu) than in the file (%llu)", path, i,
                            (unsigned long long)segment.p_memsz, (unsigned long long)segment.p_filesz);
        if (segment.p_memsz == 0)
            continue;
        if (vm_guest_pointer(vm, segment.p_paddr, segment.p_memsz) == NULL)
            return pvh_fail(vm,
                            "guest image %s: segment %u at 0x%llx of %llu bytes does not fit in guest RAM "
                            "(%llu MiB)",
                            path, i, (unsigned long long)segment.p_paddr, (unsigned long long)segment.p_memsz,
                            (unsigned long long)(vm->mem_size >> 20));
        if (ranges_overlap(segment.p_paddr, segment.p_memsz, BOOT_START_INFO, BOOT_END - BOOT_START_INFO))
            return pvh_fail(vm, "guest image %s: segment %u at 0x%llx overlaps the boot information at 0x%llx-0x%llx",
                            path, i, (unsigned long long)segment.p_paddr, BOOT_START_INFO, BOOT_END);
    }
    if (!have_entry)
        return pvh_fail(vm,
                        "guest image %s has no PVH entry point (no ELF note \"Xen\" of type "
                        "XEN_ELFNOTE_PHYS32_ENTRY): it cannot be booted with the PVH protocol",
                        path);
    if (loads == 0)
        return pvh_fail(vm, "guest image %s has no loadable segment", path);
    if (entry > 0xFFFFFFFFull)
        return pvh_fail(vm, "guest image %s: PVH entry point 0x%llx is above 4 GiB", path, (unsigned long long)entry);

    /* Second pass: copy. The memfd is fresh, so the part beyond the file is zero already; it is cleared anyway
     * in case the memory is reused. */
    bool entry_loaded = false;
    for (unsigned i = 0; i < header.e_phnum; i++) {
        Elf64_Phdr segment;
        memcpy(&segment, image + header.e_phoff + (uint64_t)i * header.e_phentsize, sizeof segment);
        if (segment.p_type != PT_LOAD || segment.p_memsz == 0)
            continue;
        uint8_t *target = vm_guest_pointer(vm, segment.p_paddr, segment.p_memsz);
        memcpy(target, image + segment.p_offset, segment.p_filesz);
        memset(target + segment.p_filesz, 0, segment.p_memsz - segment.p_filesz);
        if (entry >= segment.p_paddr && entry - segment.p_paddr < segment.p_filesz)
            entry_loaded = true;
    }
    if (!entry_loaded)
        return pvh_fail(vm, "guest image %s: the PVH entry point 0x%llx is not inside a loaded segment's file contents",
                        path, (unsigned long long)entry);
    return (int64_t)entry;
}

int pvh_boot(struct vm *vm, const char *path, const char *cmdline)
{
    if (vm->mem == NULL || vm->run == NULL)
        return pvh_fail(vm, "the VM needs memory and a vCPU before the guest is loaded");
    size_t cmdline_length = strlen(cmdline);
    if (cmdline_length > PVH_MAX_CMDLINE)
        return pvh_fail(vm, "the command line of %zu bytes exceeds %u", cmdline_length, PVH_MAX_CMDLINE);
    if (vm->region_count * sizeof(struct hvm_memmap_table_entry) > BOOT_CMDLINE - BOOT_MEMMAP)
        return pvh_fail(vm, "too many memory regions for the memory map");

    size_t size = 0;
    uint8_t *image = read_image(vm, path, &size);
    if (image == NULL)
        return -1;
    int64_t entry = load_elf(vm, path, image, size);
    free(image);
    if (entry < 0)
        return -1;

    struct hvm_start_info *info = vm_guest_pointer(vm, BOOT_START_INFO, sizeof *info);
    struct hvm_memmap_table_entry *map =
        vm_guest_pointer(vm, BOOT_MEMMAP, vm->region_count * sizeof(struct hvm_memmap_table_entry));
    char *line = vm_guest_pointer(vm, BOOT_CMDLINE, cmdline_length + 1);
    if (info == NULL || map == NULL || line == NULL)
        return pvh_fail(vm, "the boot information at 0x%llx does not fit in guest RAM", BOOT_START_INFO);
    for (uint32_t i = 0; i < vm->region_count; i++) {
        map[i] = (struct hvm_memmap_table_entry){
            .addr = vm->regions[i].guest_phys_addr, .size = vm->regions[i].size, .type = 1, .reserved = 0};
    }
    memcpy(line, cmdline, cmdline_length + 1);
    *info = (struct hvm_start_info){
        .magic = HVM_START_MAGIC,
        .version = 1,
        .flags = 0,
        .nr_modules = 0,
        .modlist_paddr = 0,
        .cmdline_paddr = BOOT_CMDLINE,
        .rsdp_paddr = 0, /* no ACPI */
        .memmap_paddr = BOOT_MEMMAP,
        .memmap_entries = vm->region_count,
        .reserved = 0,
    };
    return set_boot_registers(vm, (uint32_t)entry, BOOT_START_INFO);
}
