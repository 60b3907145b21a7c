/*
 * vm.c: one KVM VM with one vCPU, its RAM in a memfd, the ports the test guest uses, and the vCPU thread with
 * pause, resume, throttle and stop.
 */
#define _GNU_SOURCE
#include "vm.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* Where KVM may put the pages it needs for real-mode emulation on Intel: just below the BIOS area, in the gap
 * between 3 and 4 GiB where no RAM lives. */
#define VM_IDENTITY_MAP_ADDR 0xFFFBC000ull
#define VM_TSS_ADDR 0xFFFBD000ull

#define VM_KICK_SIGNAL SIGUSR1
#define VM_PAUSE_TIMEOUT_NS (5ull * 1000000000ull)
#define VM_THROTTLE_PERIOD_NS 10000000ull /* 10 ms */

__attribute__((format(printf, 2, 3))) static int vm_fail(struct vm *vm, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vsnprintf(vm->error, sizeof vm->error, format, args);
    va_end(args);
    return -1;
}

static int kvm_ioctl(int fd, unsigned long request, unsigned long argument)
{
    int result;
    do {
        result = ioctl(fd, request, argument);
    } while (result < 0 && errno == EINTR);
    return result;
}

static uint64_t monotonic_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec;
}

static struct timespec timespec_at(uint64_t ns)
{
    struct timespec at = {.tv_sec = (time_t)(ns / 1000000000ull), .tv_nsec = (long)(ns % 1000000000ull)};
    return at;
}

static void kick_handler(int signal)
{
    (void)signal; /* only here so that the signal interrupts KVM_RUN instead of killing the process */
}

int vm_install_kick_handler(void)
{
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = kick_handler;
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0; /* no SA_RESTART: KVM_RUN must return EINTR */
    return sigaction(VM_KICK_SIGNAL, &action, NULL);
}

/* ---------------------------------------------------------------------------------------------------------------
 * Creation
 * ------------------------------------------------------------------------------------------------------------ */

int vm_open(struct vm *vm, int console_fd, bool console_owned)
{
    memset(vm, 0, sizeof *vm);
    vm->kvm_fd = vm->vm_fd = vm->vcpu_fd = vm->mem_fd = vm->stop_event_fd = -1;
    vm->console_fd = console_fd;
    vm->console_owned = console_owned;

    pthread_mutexattr_t mutex_attr;
    pthread_mutexattr_init(&mutex_attr);
    pthread_mutex_init(&vm->lock, &mutex_attr);
    pthread_mutexattr_destroy(&mutex_attr);
    pthread_condattr_t cond_attr;
    pthread_condattr_init(&cond_attr);
    pthread_condattr_setclock(&cond_attr, CLOCK_MONOTONIC);
    pthread_cond_init(&vm->cond, &cond_attr);
    pthread_condattr_destroy(&cond_attr);

    vm->stop_event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (vm->stop_event_fd < 0)
        return vm_fail(vm, "eventfd: %s", strerror(errno));

    vm->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (vm->kvm_fd < 0)
        return vm_fail(vm, "cannot open /dev/kvm: %s", strerror(errno));
    int version = kvm_ioctl(vm->kvm_fd, KVM_GET_API_VERSION, 0);
    if (version != KVM_API_VERSION)
        return vm_fail(vm, "KVM API version %d, expected %d", version, KVM_API_VERSION);

    static const struct {
        int capability;
        const char *name;
    } required[] = {
        {KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"},
        {KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"},
        {KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"},
        {KVM_CAP_PIT2, "KVM_CAP_PIT2"},
        {KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID"},
    };
    for (size_t i = 0; i < sizeof required / sizeof required[0]; i++) {
        if (kvm_ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, (unsigned long)required[i].capability) <= 0)
            return vm_fail(vm, "this host's KVM lacks %s", required[i].name);
    }
    int run_size = kvm_ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < (int)sizeof(struct kvm_run))
        return vm_fail(vm, "KVM_GET_VCPU_MMAP_SIZE: %s", run_size < 0 ? strerror(errno) : "too small");
    vm->run_size = (size_t)run_size;

    vm->vm_fd = kvm_ioctl(vm->kvm_fd, KVM_CREATE_VM, 0);
    if (vm->vm_fd < 0)
        return vm_fail(vm, "KVM_CREATE_VM: %s", strerror(errno));
    if (fcntl(vm->vm_fd, F_SETFD, FD_CLOEXEC) < 0)
        return vm_fail(vm, "fcntl FD_CLOEXEC: %s", strerror(errno));
    return 0;
}

/* KVM_GET_SUPPORTED_CPUID into a buffer that grows while the kernel answers E2BIG. */
static struct kvm_cpuid2 *supported_cpuid(struct vm *vm)
{
    for (uint32_t capacity = 64; capacity <= 4096; capacity *= 2) {
        struct kvm_cpuid2 *cpuid = calloc(1, sizeof *cpuid + capacity * sizeof(struct kvm_cpuid_entry2));
        if (cpuid == NULL) {
            vm_fail(vm, "out of memory");
            return NULL;
        }
        cpuid->nent = capacity;
        if (ioctl(vm->kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) == 0)
            return cpuid;
        int error = errno;
        free(cpuid);
        if (error != E2BIG) {
            vm_fail(vm, "KVM_GET_SUPPORTED_CPUID: %s", strerror(error));
            return NULL;
        }
    }
    vm_fail(vm, "KVM_GET_SUPPORTED_CPUID: more than 4096 entries");
    return NULL;
}

static int set_cpuid(struct vm *vm, uint32_t apic_id)
{
    struct kvm_cpuid2 *cpuid = supported_cpuid(vm);
    if (cpuid == NULL)
        return -1;
    for (uint32_t i = 0; i < cpuid->nent; i++) {
        struct kvm_cpuid_entry2 *entry = &cpuid->entries[i];
        switch (entry->function) {
        case 0x1: /* EBX[31:24]: initial APIC id */
            entry->ebx = (entry->ebx & 0x00FFFFFFu) | (apic_id << 24);
            break;
        case 0xB:
        case 0x1F: /* extended topology: EDX is the x2APIC id */
            entry->edx = apic_id;
            break;
        default:
            break;
        }
    }
    int result = kvm_ioctl(vm->vcpu_fd, KVM_SET_CPUID2, (unsigned long)cpuid);
    int error = errno;
    free(cpuid);
    if (result < 0)
        return vm_fail(vm, "KVM_SET_CPUID2: %s", strerror(error));
    return 0;
}

int vm_create_platform(struct vm *vm, bool want_cpuid)
{
    if (kvm_ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SET_IDENTITY_MAP_ADDR) > 0) {
        uint64_t address = VM_IDENTITY_MAP_ADDR;
        if (kvm_ioctl(vm->vm_fd, KVM_SET_IDENTITY_MAP_ADDR, (unsigned long)&address) < 0)
            return vm_fail(vm, "KVM_SET_IDENTITY_MAP_ADDR: %s", strerror(errno));
    }
    if (kvm_ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SET_TSS_ADDR) > 0) {
        if (kvm_ioctl(vm->vm_fd, KVM_SET_TSS_ADDR, (unsigned long)VM_TSS_ADDR) < 0)
            return vm_fail(vm, "KVM_SET_TSS_ADDR: %s", strerror(errno));
    }
    if (kvm_ioctl(vm->vm_fd, KVM_CREATE_IRQCHIP, 0) < 0)
        return vm_fail(vm, "KVM_CREATE_IRQCHIP: %s", strerror(errno));
    struct kvm_pit_config pit;
    memset(&pit, 0, sizeof pit);
    if (kvm_ioctl(vm->vm_fd, KVM_CREATE_PIT2, (unsigned long)&pit) < 0)
        return vm_fail(vm, "KVM_CREATE_PIT2: %s", strerror(errno));

    vm->vcpu_fd = kvm_ioctl(vm->vm_fd, KVM_CREATE_VCPU, 0);
    if (vm->vcpu_fd < 0)
        return vm_fail(vm, "KVM_CREATE_VCPU: %s", strerror(errno));
    if (fcntl(vm->vcpu_fd, F_SETFD, FD_CLOEXEC) < 0)
        return vm_fail(vm, "fcntl FD_CLOEXEC: %s", strerror(errno));
    void *run = mmap(NULL, vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpu_fd, 0);
    if (run == MAP_FAILED)
        return vm_fail(vm, "mmap of the vCPU's kvm_run: %s", strerror(errno));
    vm->run = run;
    if (want_cpuid && set_cpuid(vm, 0) < 0)
        return -1;
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Memory
 * ------------------------------------------------------------------------------------------------------------ */

static int check_size(struct vm *vm, uint64_t size)
{
    if (size < VM_RAM_MIN)
        return vm_fail(vm, "guest memory of %llu bytes is below the minimum of %llu MiB", (unsigned long long)size,
                       VM_RAM_MIN >> 20);
    if (size > VM_RAM_MAX)
        return vm_fail(vm, "guest memory of %llu bytes exceeds the maximum of %llu GiB", (unsigned long long)size,
                       VM_RAM_MAX >> 30);
    if (size % VM_RAM_GRANULE != 0)
        return vm_fail(vm, "guest memory of %llu bytes is not a multiple of 2 MiB", (unsigned long long)size);
    return 0;
}

static int set_slot(struct vm *vm, const struct vm_region *region, uint32_t flags, bool remove)
{
    struct kvm_userspace_memory_region slot = {
        .slot = region->slot,
        .flags = flags,
        .guest_phys_addr = region->guest_phys_addr,
        .memory_size = remove ? 0 : region->size,
        .userspace_addr = (uint64_t)(uintptr_t)region->host_addr,
    };
    if (kvm_ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, (unsigned long)&slot) < 0)
        return vm_fail(vm, "KVM_SET_USER_MEMORY_REGION (slot %u at 0x%llx, %llu bytes, flags 0x%x): %s", region->slot,
                       (unsigned long long)region->guest_phys_addr, (unsigned long long)slot.memory_size, flags,
                       strerror(errno));
    return 0;
}

int vm_create_memory(struct vm *vm, uint64_t size)
{
    if (vm->mem != NULL)
        return vm_fail(vm, "the VM has memory already");
    if (check_size(vm, size) < 0)
        return -1;
    vm->mem_fd = memfd_create("c-vmm-guest-ram", MFD_CLOEXEC);
    if (vm->mem_fd < 0)
        return vm_fail(vm, "memfd_create: %s", strerror(errno));
    if (ftruncate(vm->mem_fd, (off_t)size) < 0) {
        int error = errno;
        vm_destroy_memory(vm);
        return vm_fail(vm, "ftruncate of guest memory to %llu bytes: %s", (unsigned long long)size, strerror(error));
    }
    void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, vm->mem_fd, 0);
    if (mem == MAP_FAILED) {
        int error = errno;
        vm_destroy_memory(vm);
        return vm_fail(vm, "mmap of %llu bytes of guest memory: %s", (unsigned long long)size, strerror(error));
    }
    vm->mem = mem;
    vm->mem_size = size;
    uint64_t low = size < VM_LOW_RAM_LIMIT ? size : VM_LOW_RAM_LIMIT;
    vm->regions[0] = (struct vm_region){.slot = 0, .guest_phys_addr = 0, .size = low, .host_addr = mem, .fd_offset = 0};
    vm->region_count = 1;
    if (size > low) {
        vm->regions[1] = (struct vm_region){.slot = 1,
                                            .guest_phys_addr = VM_HIGH_RAM_BASE,
                                            .size = size - low,
                                            .host_addr = (char *)mem + low,
                                            .fd_offset = low};
        vm->region_count = 2;
    }
    for (uint32_t i = 0; i < vm->region_count; i++) {
        if (set_slot(vm, &vm->regions[i], 0, false) < 0) {
            char saved[VM_ERROR_SIZE];
            memcpy(saved, vm->error, sizeof saved);
            vm->region_count = i; /* unregister only those that were registered */
            vm_destroy_memory(vm);
            memcpy(vm->error, saved, sizeof saved);
            return -1;
        }
    }
    return 0;
}

int vm_check_layout(struct vm *vm, const uint64_t *gpas, const uint64_t *sizes, uint32_t count)
{
    if (count == 0 || count > VM_MAX_REGIONS)
        return vm_fail(vm, "a layout of %u regions; this VMM holds 1 or 2 (RAM below 3 GiB, the rest from 4 GiB)", count);
    uint64_t total = 0;
    for (uint32_t i = 0; i < count; i++) {
        if (sizes[i] > VM_RAM_MAX || total > VM_RAM_MAX)
            return vm_fail(vm, "region %u of %llu bytes is too large", i, (unsigned long long)sizes[i]);
        total += sizes[i];
    }
    if (check_size(vm, total) < 0)
        return -1;
    uint64_t low = total < VM_LOW_RAM_LIMIT ? total : VM_LOW_RAM_LIMIT;
    uint32_t expected = total > low ? 2 : 1;
    bool ok = count == expected && gpas[0] == 0 && sizes[0] == low &&
              (expected == 1 || (gpas[1] == VM_HIGH_RAM_BASE && sizes[1] == total - low));
    if (!ok) {
        char described[256];
        size_t used = 0;
        for (uint32_t i = 0; i < count && used < sizeof described; i++)
            used += (size_t)snprintf(described + used, sizeof described - used, "%s0x%llx+0x%llx", i ? ", " : "",
                                     (unsigned long long)gpas[i], (unsigned long long)sizes[i]);
        return vm_fail(vm,
                       "memory layout [%s] is not this VMM's for %llu MiB (RAM from 0 up to 3 GiB, the rest from 4 GiB)",
                       described, (unsigned long long)(total >> 20));
    }
    return 0;
}

void vm_destroy_memory(struct vm *vm)
{
    if (vm->vm_fd >= 0) {
        for (uint32_t i = 0; i < vm->region_count; i++)
            (void)set_slot(vm, &vm->regions[i], 0, true);
    }
    vm->region_count = 0;
    if (vm->mem != NULL)
        munmap(vm->mem, vm->mem_size);
    vm->mem = NULL;
    vm->mem_size = 0;
    if (vm->mem_fd >= 0)
        close(vm->mem_fd);
    vm->mem_fd = -1;
}

void *vm_guest_pointer(struct vm *vm, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < vm->region_count; i++) {
        const struct vm_region *region = &vm->regions[i];
        if (gpa < region->guest_phys_addr)
            continue;
        uint64_t offset = gpa - region->guest_phys_addr;
        if (offset <= region->size && len <= region->size - offset)
            return (char *)region->host_addr + offset;
    }
    return NULL;
}

int vm_set_dirty_logging(struct vm *vm, bool on)
{
    uint32_t flags = on ? KVM_MEM_LOG_DIRTY_PAGES : 0;
    for (uint32_t i = 0; i < vm->region_count; i++) {
        if (set_slot(vm, &vm->regions[i], flags, false) < 0)
            return -1;
    }
    vm->dirty_logging = on;
    return 0;
}

int vm_get_dirty_log(struct vm *vm, uint32_t region, uint64_t *bitmap, size_t words)
{
    if (region >= vm->region_count)
        return vm_fail(vm, "dirty log of region %u; the VM has %u", region, vm->region_count);
    uint64_t pages = vm->regions[region].size / VM_PAGE_SIZE;
    if (bitmap == NULL || words < (pages + 63) / 64)
        return vm_fail(vm, "a dirty bitmap of %zu words for %llu pages", words, (unsigned long long)pages);
    if (!vm->dirty_logging)
        return vm_fail(vm, "dirty logging is off");
    struct kvm_dirty_log log;
    memset(&log, 0, sizeof log);
    log.slot = vm->regions[region].slot;
    log.dirty_bitmap = bitmap;
    /* Without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 this returns the bitmap and write-protects the pages again in
     * one step, so a write after the call is seen by the next one. */
    if (kvm_ioctl(vm->vm_fd, KVM_GET_DIRTY_LOG, (unsigned long)&log) < 0)
        return vm_fail(vm, "KVM_GET_DIRTY_LOG (slot %u): %s", log.slot, strerror(errno));
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Console and ports
 * ------------------------------------------------------------------------------------------------------------ */

static void write_all(int fd, const char *bytes, size_t length)
{
    while (length > 0) {
        ssize_t written = write(fd, bytes, length);
        if (written < 0) {
            if (errno == EINTR)
                continue;
            return; /* a console that cannot be written loses its text; the guest runs on */
        }
        bytes += written;
        length -= (size_t)written;
    }
}

static void console_flush(struct vm *vm)
{
    if (vm->console_len > 0 && vm->console_fd >= 0)
        write_all(vm->console_fd, vm->console_line, vm->console_len);
    vm->console_len = 0;
}

static void console_transmit(struct vm *vm, uint8_t byte)
{
    if (byte == '\r')
        return;
    vm->console_line[vm->console_len++] = (char)byte;
    if (byte == '\n' || vm->console_len == sizeof vm->console_line)
        console_flush(vm);
}

static void serial_write(struct vm *vm, unsigned offset, uint8_t value)
{
    bool divisor_latch = vm->serial_lcr & 0x80;
    switch (offset) {
    case 0:
        if (divisor_latch)
            vm->serial_divisor[0] = value;
        else
            console_transmit(vm, value);
        break;
    case 1:
        if (divisor_latch)
            vm->serial_divisor[1] = value;
        else
            vm->serial_regs[1] = value;
        break;
    case 3:
        vm->serial_lcr = value;
        break;
    default:
        vm->serial_regs[offset] = value;
        break;
    }
}

static uint8_t serial_read(struct vm *vm, unsigned offset)
{
    bool divisor_latch = vm->serial_lcr & 0x80;
    switch (offset) {
    case 0:
        return divisor_latch ? vm->serial_divisor[0] : 0; /* no received data */
    case 1:
        return divisor_latch ? vm->serial_divisor[1] : vm->serial_regs[1];
    case 2:
        return 0x01; /* IIR: no interrupt pending */
    case 3:
        return vm->serial_lcr;
    case 5:
        return 0x60; /* LSR: transmit holding register and transmitter empty */
    case 6:
        return 0xB0; /* MSR: DCD, DSR, CTS */
    default:
        return vm->serial_regs[offset];
    }
}

static uint32_t load_value(const uint8_t *item, uint8_t size)
{
    switch (size) {
    case 1:
        return item[0];
    case 2: {
        uint16_t value;
        memcpy(&value, item, 2);
        return value;
    }
    default: {
        uint32_t value;
        memcpy(&value, item, 4);
        return value;
    }
    }
}

/* Records why the guest stopped (the first reason wins) and wakes the main thread. */
static void vm_finish(struct vm *vm, enum vm_stop reason, int exit_code, const char *failure)
{
    pthread_mutex_lock(&vm->lock);
    if (vm->stop == VM_STOP_NONE) {
        vm->stop = reason;
        vm->exit_code = exit_code;
        if (failure != NULL)
            snprintf(vm->failure, sizeof vm->failure, "%s", failure);
    }
    vm->stopping = true;
    pthread_cond_broadcast(&vm->cond);
    pthread_mutex_unlock(&vm->lock);
    uint64_t one = 1;
    ssize_t ignored = write(vm->stop_event_fd, &one, sizeof one);
    (void)ignored;
}

/* Returns false when the vCPU must stop. */
static bool handle_io(struct vm *vm)
{
    struct kvm_run *run = vm->run;
    uint8_t size = run->io.size;
    uint32_t count = run->io.count;
    if ((size != 1 && size != 2 && size != 4) || run->io.data_offset > vm->run_size ||
        (uint64_t)size * count > vm->run_size - run->io.data_offset) {
        vm_finish(vm, VM_STOP_FAILED, 0, "malformed port I/O exit");
        return false;
    }
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    bool out = run->io.direction == KVM_EXIT_IO_OUT;
    uint16_t port = run->io.port;
    for (uint32_t i = 0; i < count; i++) {
        uint8_t *item = data + (size_t)i * size;
        if (port >= VM_PORT_SERIAL && port < VM_PORT_SERIAL + 8) {
            unsigned offset = port - VM_PORT_SERIAL;
            if (out)
                serial_write(vm, offset, item[0]);
            else {
                memset(item, 0, size);
                item[0] = serial_read(vm, offset);
            }
        } else if (port == VM_PORT_DEBUG_EXIT && out) {
            console_flush(vm);
            vm_finish(vm, VM_STOP_GUEST_EXIT, (int)(load_value(item, size) & 0xFF), NULL);
            return false;
        } else if (port == VM_PORT_SYNC && out) {
            /* sync(value): accepted at once; nothing here waits on the guest */
            pthread_mutex_lock(&vm->lock);
            vm->sync_count++;
            pthread_mutex_unlock(&vm->lock);
        } else if (!out) {
            memset(item, 0xFF, size); /* no device: the bus floats high */
        }
    }
    return true;
}

static uint64_t guest_rip(struct vm *vm)
{
    struct kvm_regs regs;
    if (ioctl(vm->vcpu_fd, KVM_GET_REGS, &regs) < 0)
        return 0;
    return regs.rip;
}

/* Handles one return of KVM_RUN; false stops the vCPU. */
static bool handle_exit(struct vm *vm, int result, int error)
{
    char why[VM_ERROR_SIZE];
    if (result < 0) {
        if (error == EINTR || error == EAGAIN)
            return true; /* kicked: the loop looks at what is asked */
        snprintf(why, sizeof why, "KVM_RUN: %s", strerror(error));
        vm_finish(vm, VM_STOP_FAILED, 0, why);
        return false;
    }
    struct kvm_run *run = vm->run;
    switch (run->exit_reason) {
    case KVM_EXIT_IO:
        return handle_io(vm);
    case KVM_EXIT_MMIO:
        if (!run->mmio.is_write)
            memset(run->mmio.data, 0xFF, run->mmio.len <= sizeof run->mmio.data ? run->mmio.len : sizeof run->mmio.data);
        return true; /* nothing is mapped outside RAM: reads see all ones, writes vanish */
    case KVM_EXIT_HLT:
    case KVM_EXIT_INTR:
    case KVM_EXIT_IRQ_WINDOW_OPEN:
        return true;
    case KVM_EXIT_DIRTY_RING_FULL:
        if (vm->ring_full == NULL || vm->ring_full(vm->ring_full_opaque, 0) != 0) {
            snprintf(why, sizeof why, "the dirty ring is full and could not be collected%s",
                     vm->ring_full == NULL ? " (no migration handle)" : "");
            vm_finish(vm, VM_STOP_FAILED, 0, why);
            return false;
        }
        return true;
    case KVM_EXIT_SHUTDOWN:
        snprintf(why, sizeof why, "guest shut down (triple fault) at rip 0x%llx", (unsigned long long)guest_rip(vm));
        break;
    case KVM_EXIT_INTERNAL_ERROR:
        snprintf(why, sizeof why, "KVM internal error, suberror %u (1: instruction emulation failed) at rip 0x%llx",
                 run->internal.suberror, (unsigned long long)guest_rip(vm));
        break;
    case KVM_EXIT_FAIL_ENTRY:
        snprintf(why, sizeof why, "VM entry failed, hardware reason 0x%llx",
                 (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
        break;
    case KVM_EXIT_SYSTEM_EVENT:
        snprintf(why, sizeof why, "guest asked for system event %u", run->system_event.type);
        break;
    default:
        snprintf(why, sizeof why, "unexpected KVM exit %u", run->exit_reason);
        break;
    }
    vm_finish(vm, VM_STOP_FAILED, 0, why);
    return false;
}

/* ---------------------------------------------------------------------------------------------------------------
 * The vCPU thread and its control
 * ------------------------------------------------------------------------------------------------------------ */

static bool held(const struct vm *vm) { return vm->user_paused || vm->lib_paused; }

/* Takes the vCPU out of KVM_RUN, or keeps it from entering. Call with the lock held. */
static void kick(struct vm *vm)
{
    if (vm->run != NULL)
        __atomic_store_n(&vm->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    if (vm->thread_alive)
        pthread_kill(vm->vcpu_thread, VM_KICK_SIGNAL);
    pthread_cond_broadcast(&vm->cond);
}

static void *vcpu_main(void *argument)
{
    struct vm *vm = argument;
    /* The thread that called vm_start may block signals (a library thread does): the kick must get through. */
    sigset_t kick_set;
    sigemptyset(&kick_set);
    sigaddset(&kick_set, VM_KICK_SIGNAL);
    pthread_sigmask(SIG_UNBLOCK, &kick_set, NULL);

    pthread_mutex_lock(&vm->lock);
    for (;;) {
        while (held(vm) && !vm->stopping) {
            if (!vm->parked) {
                vm->parked = true;
                pthread_cond_broadcast(&vm->cond);
            }
            pthread_cond_wait(&vm->cond, &vm->lock);
        }
        vm->parked = false;
        if (vm->stopping)
            break;
        if (vm->pending_sleep_ns > 0) {
            /* throttled: sleep, but wake at once for a pause or a stop */
            uint64_t deadline = monotonic_ns() + vm->pending_sleep_ns;
            vm->pending_sleep_ns = 0;
            while (!held(vm) && !vm->stopping && monotonic_ns() < deadline) {
                struct timespec at = timespec_at(deadline);
                pthread_cond_timedwait(&vm->cond, &vm->lock, &at);
            }
            continue;
        }
        /* Cleared under the lock: a kick sets it under the same lock, so none is lost. */
        __atomic_store_n(&vm->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(&vm->lock);
        int result = ioctl(vm->vcpu_fd, KVM_RUN, 0);
        int error = errno;
        bool go_on = handle_exit(vm, result, error);
        pthread_mutex_lock(&vm->lock);
        if (!go_on)
            break;
    }
    vm->thread_alive = false;
    vm->parked = false;
    pthread_cond_broadcast(&vm->cond);
    pthread_mutex_unlock(&vm->lock);
    return NULL;
}

int vm_start(struct vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    if (vm->thread_started || vm->stopping) {
        pthread_mutex_unlock(&vm->lock);
        return vm_fail(vm, vm->stopping ? "the VM was stopped" : "the VM runs already");
    }
    if (vm->run == NULL || vm->mem == NULL) {
        pthread_mutex_unlock(&vm->lock);
        return vm_fail(vm, "the VM has no vCPU or no memory");
    }
    vm->thread_alive = true;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 20);
    int error = pthread_create(&vm->vcpu_thread, &attr, vcpu_main, vm);
    pthread_attr_destroy(&attr);
    if (error != 0) {
        vm->thread_alive = false;
        pthread_mutex_unlock(&vm->lock);
        return vm_fail(vm, "pthread_create: %s", strerror(error));
    }
    vm->thread_started = true;
    pthread_mutex_unlock(&vm->lock);
    return 0;
}

int vm_pause(struct vm *vm, bool user)
{
    pthread_mutex_lock(&vm->lock);
    bool *flag = user ? &vm->user_paused : &vm->lib_paused;
    bool was = *flag;
    *flag = true;
    kick(vm);
    uint64_t deadline = monotonic_ns() + VM_PAUSE_TIMEOUT_NS;
    while (vm->thread_alive && !vm->parked) {
        struct timespec at = timespec_at(deadline);
        if (pthread_cond_timedwait(&vm->cond, &vm->lock, &at) == ETIMEDOUT && vm->thread_alive && !vm->parked) {
            *flag = was;
            pthread_cond_broadcast(&vm->cond);
            pthread_mutex_unlock(&vm->lock);
            return vm_fail(vm, "the vCPU did not leave KVM_RUN within %llu s", VM_PAUSE_TIMEOUT_NS / 1000000000ull);
        }
    }
    pthread_mutex_unlock(&vm->lock);
    return 0;
}

int vm_resume(struct vm *vm, bool user)
{
    pthread_mutex_lock(&vm->lock);
    if (user)
        vm->user_paused = false;
    else
        vm->lib_paused = false;
    pthread_cond_broadcast(&vm->cond);
    pthread_mutex_unlock(&vm->lock);
    return 0;
}

bool vm_is_paused(struct vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    bool paused = held(vm);
    pthread_mutex_unlock(&vm->lock);
    return paused;
}

void vm_adopt_library_pause(struct vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    if (vm->lib_paused) {
        vm->user_paused = true;
        vm->lib_paused = false;
    }
    pthread_mutex_unlock(&vm->lock);
}

bool vm_lift_library_holds(struct vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    bool held_by_library = vm->lib_paused || vm->throttle > 0;
    vm->lib_paused = false;
    vm->throttle = 0;
    vm->pending_sleep_ns = 0;
    pthread_cond_broadcast(&vm->cond);
    pthread_mutex_unlock(&vm->lock);
    return held_by_library;
}

static void *throttle_main(void *argument)
{
    struct vm *vm = argument;
    pthread_mutex_lock(&vm->lock);
    while (!vm->stopping) {
        if (vm->throttle <= 0) {
            pthread_cond_wait(&vm->cond, &vm->lock);
            continue;
        }
        if (!held(vm) && vm->thread_alive) {
            vm->pending_sleep_ns = (uint64_t)(vm->throttle * (double)VM_THROTTLE_PERIOD_NS);
            kick(vm);
        }
        uint64_t deadline = monotonic_ns() + VM_THROTTLE_PERIOD_NS;
        while (!vm->stopping && vm->throttle > 0 && monotonic_ns() < deadline) {
            struct timespec at = timespec_at(deadline);
            pthread_cond_timedwait(&vm->cond, &vm->lock, &at);
        }
    }
    pthread_mutex_unlock(&vm->lock);
    return NULL;
}

int vm_set_throttle(struct vm *vm, double fraction)
{
    if (!(fraction >= 0)) /* also NaN */
        fraction = 0;
    if (fraction > 0.99)
        fraction = 0.99;
    pthread_mutex_lock(&vm->lock);
    vm->throttle = fraction;
    if (fraction == 0)
        vm->pending_sleep_ns = 0;
    if (fraction > 0 && !vm->throttle_thread_started && !vm->stopping) {
        int error = pthread_create(&vm->throttle_thread, NULL, throttle_main, vm);
        if (error != 0) {
            vm->throttle = 0;
            pthread_mutex_unlock(&vm->lock);
            return vm_fail(vm, "pthread_create (throttle): %s", strerror(error));
        }
        vm->throttle_thread_started = true;
    }
    pthread_cond_broadcast(&vm->cond);
    pthread_mutex_unlock(&vm->lock);
    return 0;
}

void vm_stop(struct vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    vm->stopping = true;
    if (vm->stop == VM_STOP_NONE)
        vm->stop = VM_STOP_REQUESTED;
    kick(vm);
    bool join_vcpu = vm->thread_started, join_throttle = vm->throttle_thread_started;
    vm->thread_started = false;
    vm->throttle_thread_started = false;
    pthread_mutex_unlock(&vm->lock);
    if (join_vcpu)
        pthread_join(vm->vcpu_thread, NULL);
    if (join_throttle)
        pthread_join(vm->throttle_thread, NULL);
    console_flush(vm);
}

enum vm_stop vm_stopped(struct vm *vm, int *exit_code, char *failure, size_t failure_size)
{
    pthread_mutex_lock(&vm->lock);
    enum vm_stop stop = vm->stop;
    if (exit_code != NULL)
        *exit_code = vm->exit_code;
    if (failure != NULL && failure_size > 0)
        snprintf(failure, failure_size, "%s", vm->failure);
    pthread_mutex_unlock(&vm->lock);
    return stop;
}

void vm_close(struct vm *vm)
{
    vm_stop(vm);
    if (vm->run != NULL)
        munmap(vm->run, vm->run_size);
    vm->run = NULL;
    if (vm->mem != NULL)
        munmap(vm->mem, vm->mem_size);
    vm->mem = NULL;
    vm->region_count = 0;
    int *fds[] = {&vm->mem_fd, &vm->vcpu_fd, &vm->vm_fd, &vm->kvm_fd, &vm->stop_event_fd};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++) {
        if (*fds[i] >= 0)
            close(*fds[i]);
        *fds[i] = -1;
    }
    if (vm->console_owned && vm->console_fd >= 0)
        close(vm->console_fd);
    vm->console_fd = -1;
    pthread_cond_destroy(&vm->cond);
    pthread_mutex_destroy(&vm->lock);
}
