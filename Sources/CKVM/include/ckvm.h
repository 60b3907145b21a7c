// CKVM: the parts of <linux/kvm.h> and a few Linux system calls that Swift cannot import directly.
// KVM's ioctl request numbers are function-like macros (_IOR, _IOW, ...), and glibc's ioctl() is variadic;
// Swift imports neither, so this header re-exports the numbers as constants and offers fixed-arity calls.
// Nothing here retries on EINTR or interprets errors: that is done once, in Swift (LinuxSystem).
#pragma once
#include <linux/kvm.h>
#include <stdint.h>
#include <stddef.h>

// MARK: ioctl with a fixed arity

int ckvm_ioctl_ptr(int fd, unsigned long request, void *arg);
int ckvm_ioctl_val(int fd, unsigned long request, unsigned long arg);

// MARK: request numbers

// /dev/kvm
static const unsigned long CKVM_GET_API_VERSION = KVM_GET_API_VERSION;
static const unsigned long CKVM_CREATE_VM = KVM_CREATE_VM;
static const unsigned long CKVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
static const unsigned long CKVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
static const unsigned long CKVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
static const unsigned long CKVM_GET_MSR_INDEX_LIST = KVM_GET_MSR_INDEX_LIST;
// VM
static const unsigned long CKVM_CREATE_VCPU = KVM_CREATE_VCPU;
static const unsigned long CKVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
static const unsigned long CKVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
static const unsigned long CKVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
static const unsigned long CKVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
static const unsigned long CKVM_CREATE_PIT2 = KVM_CREATE_PIT2;
static const unsigned long CKVM_GET_IRQCHIP = KVM_GET_IRQCHIP;
static const unsigned long CKVM_SET_IRQCHIP = KVM_SET_IRQCHIP;
static const unsigned long CKVM_GET_PIT2 = KVM_GET_PIT2;
static const unsigned long CKVM_SET_PIT2 = KVM_SET_PIT2;
static const unsigned long CKVM_GET_CLOCK = KVM_GET_CLOCK;
static const unsigned long CKVM_SET_CLOCK = KVM_SET_CLOCK;
static const unsigned long CKVM_ENABLE_CAP = KVM_ENABLE_CAP;
static const unsigned long CKVM_GET_DIRTY_LOG = KVM_GET_DIRTY_LOG;
static const unsigned long CKVM_CLEAR_DIRTY_LOG = KVM_CLEAR_DIRTY_LOG;
static const unsigned long CKVM_RESET_DIRTY_RINGS = KVM_RESET_DIRTY_RINGS;
// vCPU
static const unsigned long CKVM_RUN = KVM_RUN;
static const unsigned long CKVM_GET_REGS = KVM_GET_REGS;
static const unsigned long CKVM_SET_REGS = KVM_SET_REGS;
static const unsigned long CKVM_GET_SREGS = KVM_GET_SREGS;
static const unsigned long CKVM_SET_SREGS = KVM_SET_SREGS;
static const unsigned long CKVM_GET_FPU = KVM_GET_FPU;
static const unsigned long CKVM_SET_FPU = KVM_SET_FPU;
static const unsigned long CKVM_GET_XSAVE = KVM_GET_XSAVE;
static const unsigned long CKVM_GET_XSAVE2 = KVM_GET_XSAVE2;
static const unsigned long CKVM_SET_XSAVE = KVM_SET_XSAVE;
static const unsigned long CKVM_GET_XCRS = KVM_GET_XCRS;
static const unsigned long CKVM_SET_XCRS = KVM_SET_XCRS;
static const unsigned long CKVM_GET_MSRS = KVM_GET_MSRS;
static const unsigned long CKVM_SET_MSRS = KVM_SET_MSRS;
static const unsigned long CKVM_GET_LAPIC = KVM_GET_LAPIC;
static const unsigned long CKVM_SET_LAPIC = KVM_SET_LAPIC;
static const unsigned long CKVM_GET_MP_STATE = KVM_GET_MP_STATE;
static const unsigned long CKVM_SET_MP_STATE = KVM_SET_MP_STATE;
static const unsigned long CKVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
static const unsigned long CKVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;
static const unsigned long CKVM_GET_DEBUGREGS = KVM_GET_DEBUGREGS;
static const unsigned long CKVM_SET_DEBUGREGS = KVM_SET_DEBUGREGS;
static const unsigned long CKVM_GET_CPUID2 = KVM_GET_CPUID2;
static const unsigned long CKVM_SET_CPUID2 = KVM_SET_CPUID2;
static const unsigned long CKVM_GET_TSC_KHZ = KVM_GET_TSC_KHZ;

static const unsigned long CKVM_DIRTY_LOG_PAGE_OFFSET = KVM_DIRTY_LOG_PAGE_OFFSET;

// MARK: struct kvm_run, whose exit data sits in anonymous unions Swift imports poorly

struct ckvm_io_exit {
    uint8_t direction;   // KVM_EXIT_IO_IN or KVM_EXIT_IO_OUT
    uint8_t size;        // 1, 2 or 4 bytes per access
    uint16_t port;
    uint32_t count;      // string I/O repeats
    uint64_t data_offset; // from the start of struct kvm_run
};
struct ckvm_mmio_exit {
    uint64_t phys_addr;
    uint32_t len;
    uint8_t is_write;
    uint8_t data[8];
};

static inline struct ckvm_io_exit ckvm_run_io(const struct kvm_run *run) {
    struct ckvm_io_exit e = { run->io.direction, run->io.size, run->io.port, run->io.count, run->io.data_offset };
    return e;
}
static inline struct ckvm_mmio_exit ckvm_run_mmio(const struct kvm_run *run) {
    struct ckvm_mmio_exit e;
    e.phys_addr = run->mmio.phys_addr;
    e.len = run->mmio.len;
    e.is_write = run->mmio.is_write;
    for (int i = 0; i < 8; i++) e.data[i] = run->mmio.data[i];
    return e;
}
static inline void ckvm_run_set_mmio_data(struct kvm_run *run, const uint8_t *data, uint32_t len) {
    for (uint32_t i = 0; i < len && i < 8; i++) run->mmio.data[i] = data[i];
}
static inline uint32_t ckvm_run_internal_suberror(const struct kvm_run *run) { return run->internal.suberror; }
static inline uint64_t ckvm_run_fail_entry_reason(const struct kvm_run *run) {
    return run->fail_entry.hardware_entry_failure_reason;
}
static inline uint32_t ckvm_run_system_event_type(const struct kvm_run *run) { return run->system_event.type; }

// MARK: dirty ring entries are shared with the kernel: flags need acquire/release ordering

static inline uint32_t ckvm_dirty_gfn_load_flags(const struct kvm_dirty_gfn *gfn) {
    return __atomic_load_n(&gfn->flags, __ATOMIC_ACQUIRE);
}
static inline void ckvm_dirty_gfn_store_flags(struct kvm_dirty_gfn *gfn, uint32_t flags) {
    __atomic_store_n(&gfn->flags, flags, __ATOMIC_RELEASE);
}

// MARK: signals

// Installs a handler that does nothing for `signo`, without SA_RESTART, so that a signal sent to a vCPU thread
// makes its KVM_RUN return EINTR. Returns 0 or -1 with errno set.
int ckvm_install_kick_handler(int signo);
int ckvm_sigrtmin(void);

// MARK: system calls glibc hides behind _GNU_SOURCE

int ckvm_memfd_create(const char *name, unsigned int flags);
static const unsigned int CKVM_MFD_CLOEXEC = 1U; // MFD_CLOEXEC from <linux/memfd.h>
static const unsigned int CKVM_MFD_HUGETLB = 4U; // MFD_HUGETLB: pages of the default huge page size (2 MiB on x86-64)
// Starts writeback of every dirty page of the file without waiting for it (SYNC_FILE_RANGE_WRITE over all of
// it), so that a later fsync finds little left to write.
int ckvm_start_writeback(int fd);
// Allocates a byte range of a file ahead of writing it, without changing its size (FALLOC_FL_KEEP_SIZE): the
// range still reads as zeros, and writes into it need not reserve space one block at a time.
int ckvm_allocate(int fd, long long offset, long long length);
// Deallocates a byte range of a file without changing its size (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE):
// the range reads as zeros and holds no memory (a memfd) or blocks (a file) afterwards.
int ckvm_punch_hole(int fd, long long offset, long long length);

// _BITUL() flags Swift cannot import.
static const uint32_t CKVM_DIRTY_GFN_F_DIRTY = KVM_DIRTY_GFN_F_DIRTY;
static const uint32_t CKVM_DIRTY_GFN_F_RESET = KVM_DIRTY_GFN_F_RESET;
static const int CKVM_SEEK_DATA = 3; // SEEK_DATA from <unistd.h> with _GNU_SOURCE
static const int CKVM_SEEK_HOLE = 4; // SEEK_HOLE

// Unblocks `signo` for the calling thread. Threads inherit the signal mask of their creator, and some creators
// (Dispatch's worker threads) block every signal; a vCPU thread must receive its kick signal whoever made it.
int ckvm_unblock_signal(int signo);

// MARK: userfaultfd, for lazy restore of guest memory (LinuxSystem's UserFaultRegion)
// As with KVM, the ioctl numbers are _IOWR()/_IOR() macros and the flags are casts or shifts Swift does not import.
#include <linux/userfaultfd.h>

static const unsigned long CKVM_USERFAULTFD_IOC_NEW = USERFAULTFD_IOC_NEW; // on /dev/userfaultfd
static const unsigned long CKVM_UFFDIO_API = UFFDIO_API;
static const unsigned long CKVM_UFFDIO_REGISTER = UFFDIO_REGISTER;
static const unsigned long CKVM_UFFDIO_UNREGISTER = UFFDIO_UNREGISTER;
static const unsigned long CKVM_UFFDIO_COPY = UFFDIO_COPY;
static const unsigned long CKVM_UFFDIO_ZEROPAGE = UFFDIO_ZEROPAGE;
static const unsigned long CKVM_UFFDIO_WAKE = UFFDIO_WAKE;
static const unsigned long CKVM_UFFDIO_CONTINUE = UFFDIO_CONTINUE;

static const uint64_t CKVM_UFFD_API = UFFD_API;
static const uint64_t CKVM_UFFDIO_REGISTER_MODE_MISSING = UFFDIO_REGISTER_MODE_MISSING;
static const uint64_t CKVM_UFFDIO_REGISTER_MODE_MINOR = UFFDIO_REGISTER_MODE_MINOR;
static const uint64_t CKVM_UFFD_FEATURE_MINOR_SHMEM = UFFD_FEATURE_MINOR_SHMEM;
// Bits of uffdio_register.ioctls: the operations the kernel allows on the range just registered.
static const uint64_t CKVM_UFFDIO_COPY_ALLOWED = 1ULL << _UFFDIO_COPY;
static const uint64_t CKVM_UFFDIO_ZEROPAGE_ALLOWED = 1ULL << _UFFDIO_ZEROPAGE;
static const uint64_t CKVM_UFFDIO_CONTINUE_ALLOWED = 1ULL << _UFFDIO_CONTINUE;
static const uint8_t CKVM_UFFD_EVENT_PAGEFAULT = UFFD_EVENT_PAGEFAULT;

// A new userfaultfd, non-blocking (poll() on a blocking one reports POLLERR) and close-on-exec.
// Tries /dev/userfaultfd first (Linux 6.1+), whose access is a matter of file permissions, then the
// userfaultfd system call, which vm.unprivileged_userfaultfd may refuse. Returns -1 with the system call's errno.
int ckvm_userfaultfd_open(void);

// struct uffd_msg keeps each event's data in an anonymous union of anonymous structs.
static inline uint8_t ckvm_uffd_msg_event(const struct uffd_msg *msg) { return msg->event; }
static inline uint64_t ckvm_uffd_msg_fault_address(const struct uffd_msg *msg) { return msg->arg.pagefault.address; }
// Whether the fault is a minor one: the page is in the file, not yet in the faulting mapping.
static inline int ckvm_uffd_msg_fault_is_minor(const struct uffd_msg *msg) { return (msg->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_MINOR) != 0; }

// Swift's Glibc module has neither <sys/eventfd.h> nor the _GNU_SOURCE pthread_setname_np().
int ckvm_eventfd(unsigned int initval); // always close-on-exec, blocking
int ckvm_set_thread_name(const char *name); // the calling thread's; at most 15 characters

// MARK: malloc tuning

// <malloc.h> is not part of Swift's Glibc module: mallopt and M_ARENA_MAX, for the daemon (Sources/migrated).
#include <malloc.h>
static const int CKVM_M_ARENA_MAX = M_ARENA_MAX;
