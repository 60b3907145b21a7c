/*
 * vm.h: the KVM side of c-vmm: one VM, its RAM, one vCPU on a thread of its own, the serial console and the
 * debug-exit port, and pause/resume/throttle. Nothing here knows libmigrated (see migrate.c).
 */
#ifndef CVMM_VM_H
#define CVMM_VM_H

#include <linux/kvm.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define VM_PAGE_SIZE 4096u
/* The RAM layout, shared with the project's Swift MicroVM so that a guest can move between the two: RAM below
 * 3 GiB at guest-physical 0 (slot 0); the rest continues at 4 GiB (slot 1). The gap holds the LAPIC and IOAPIC. */
#define VM_LOW_RAM_LIMIT (3ull << 30)
#define VM_HIGH_RAM_BASE (4ull << 30)
#define VM_RAM_GRANULE (2ull << 20)
#define VM_RAM_MIN (16ull << 20)
#define VM_RAM_MAX (1ull << 40)
#define VM_MAX_REGIONS 2

/* Ports (guest/README.md). */
#define VM_PORT_SERIAL 0x3F8
#define VM_PORT_DEBUG_EXIT 0xF4
#define VM_PORT_SYNC 0x600

/* The error text of the last failing vm_* / pvh_* call; every such call that fails fills it in. */
#define VM_ERROR_SIZE 512

struct vm_region {
    uint32_t slot;
    uint64_t guest_phys_addr;
    uint64_t size;
    void *host_addr;
    uint64_t fd_offset; /* where host_addr lies in the memfd */
};

enum vm_stop {
    VM_STOP_NONE = 0,
    VM_STOP_GUEST_EXIT, /* the guest wrote its exit code to port 0xF4 */
    VM_STOP_REQUESTED,  /* vm_stop() */
    VM_STOP_FAILED      /* KVM reported something the VMM cannot carry on from */
};

struct vm;

/* Called on the vCPU thread on KVM_EXIT_DIRTY_RING_FULL; returns 0 when the vCPU may run again. */
typedef int (*vm_ring_full_fn)(void *opaque, uint32_t vcpu);

struct vm {
    int kvm_fd;
    int vm_fd;
    int vcpu_fd;
    struct kvm_run *run;
    size_t run_size;

    /* RAM: one memfd mapped once; regions are consecutive pieces of the mapping. */
    int mem_fd;
    void *mem;
    uint64_t mem_size;
    uint32_t region_count;
    struct vm_region regions[VM_MAX_REGIONS];
    bool dirty_logging; /* KVM_MEM_LOG_DIRTY_PAGES set on the slots by this VMM (callback mode) */

    /* Console (the serial transmitter). Bytes are collected into lines and written to console_fd. */
    int console_fd;
    bool console_owned;
    char console_line[1024];
    size_t console_len;
    uint8_t serial_lcr;
    uint8_t serial_regs[8]; /* IER, MCR, scratch and the like, as last written */
    uint8_t serial_divisor[2]; /* DLL, DLM: written with LCR bit 7 set */

    /* vCPU control, guarded by lock. The vCPU runs only while neither pause source holds it. */
    pthread_mutex_t lock;
    pthread_cond_t cond; /* CLOCK_MONOTONIC */
    bool user_paused;    /* the `pause` command */
    bool lib_paused;     /* the library's pause callback */
    bool stopping;
    bool parked;         /* the vCPU thread is waiting, out of KVM_RUN */
    bool thread_started; /* vm_start was called and the thread has not been joined */
    bool thread_alive;   /* the vCPU thread is in its loop */
    pthread_t vcpu_thread;
    uint64_t pending_sleep_ns; /* throttle: how long the vCPU sleeps before its next KVM_RUN */
    double throttle;
    bool throttle_thread_started;
    pthread_t throttle_thread;
    uint64_t sync_count;

    /* How the guest ended; the event fd becomes readable once it has. */
    enum vm_stop stop;
    int exit_code;
    char failure[VM_ERROR_SIZE];
    int stop_event_fd;

    vm_ring_full_fn ring_full;
    void *ring_full_opaque;

    char error[VM_ERROR_SIZE];
};

/* Opens /dev/kvm and creates the VM (KVM_CREATE_VM only): the dirty ring, if wanted, is enabled next. */
int vm_open(struct vm *vm, int console_fd, bool console_owned);
/* TSS and identity-map addresses, the in-kernel LAPIC/IOAPIC/PIC and PIT, and the vCPU with its run page.
 * set_cpuid: give the vCPU the host's supported CPUID (a new guest); a received guest brings its own. */
int vm_create_platform(struct vm *vm, bool set_cpuid);
/* Creates RAM of `size` bytes in this VMM's layout and registers its slots with KVM. */
int vm_create_memory(struct vm *vm, uint64_t size);
/* Checks that `count` regions (guest_phys_addr, size) are exactly this VMM's layout for their total size. */
int vm_check_layout(struct vm *vm, const uint64_t *gpas, const uint64_t *sizes, uint32_t count);
/* Unregisters and frees RAM (a failed incoming guest). */
void vm_destroy_memory(struct vm *vm);
/* A host pointer to [gpa, gpa+len) if it lies entirely in RAM, else NULL. */
void *vm_guest_pointer(struct vm *vm, uint64_t gpa, uint64_t len);

/* Callback-mode dirty logging on the VMM's own slots. */
int vm_set_dirty_logging(struct vm *vm, bool on);
int vm_get_dirty_log(struct vm *vm, uint32_t region, uint64_t *bitmap, size_t words);

/* Starts the vCPU thread. */
int vm_start(struct vm *vm);
/* Pause sources: `user` is the stdin command, otherwise the library. vm_pause returns once the vCPU is out of
 * KVM_RUN and parked (or has ended), or fails after a timeout. */
int vm_pause(struct vm *vm, bool user);
int vm_resume(struct vm *vm, bool user);
bool vm_is_paused(struct vm *vm);
/* Hands a pause the library left in place (a save with MIGRATED_SNAPSHOT_LEAVE_PAUSED) over to the operator, whose
 * `resume` lifts it. */
void vm_adopt_library_pause(struct vm *vm);
/* Lifts a pause or a throttle the library left in place; true if there was one. */
bool vm_lift_library_holds(struct vm *vm);
/* Lets the vCPU run only (1 - fraction) of each 10 ms period; 0 lifts the throttle. */
int vm_set_throttle(struct vm *vm, double fraction);
/* Stops the vCPU for good and joins its thread (and the throttle's). Safe to call more than once. */
void vm_stop(struct vm *vm);
/* The stop reason once the guest has ended (VM_STOP_NONE while it runs). */
enum vm_stop vm_stopped(struct vm *vm, int *exit_code, char *failure, size_t failure_size);
/* Releases everything vm_open and later calls created. */
void vm_close(struct vm *vm);

/* Installs the no-op SIGUSR1 handler (without SA_RESTART) that kicks the vCPU out of KVM_RUN. Call once. */
int vm_install_kick_handler(void);

#endif
