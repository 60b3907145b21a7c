/*
 * migrated.h: the C interface of libmigrated, the live-migration and snapshot engine of the migrated project.
 *
 * A VMM links it with   cc vmm.c $(pkg-config --cflags --libs migrated)
 * and hands it the guest it runs: its RAM (memory regions with their host addresses) and, as callbacks, what only
 * the VMM can do (pause and resume its vCPU threads, save and restore its own devices, start a received guest).
 * The library moves the guest: live migration out and in over TCP or Unix sockets, with mutual TLS 1.3 or in
 * plaintext, over sockets it opens or the VMM already owns; and snapshots to and from files. Streams and files are
 * those of the migrated daemon and `vmsnap` (protocol/stream.md, protocol/snapshot.md), so a guest moves between a
 * VMM that links this library and the daemon in either direction.
 *
 * Conventions, for every function below unless its comment says otherwise:
 *   - Names start with migrated_ (functions, types) or MIGRATED_ (macros, constants).
 *   - A function returns an int: MIGRATED_OK (0) or one of enum migrated_error. On failure, migrated_last_error()
 *     on the same thread says why in words. No other error channel exists: the library never aborts the process,
 *     never throws across the boundary, and never calls exit().
 *   - Handles are opaque pointers. The VMM owns what it allocated (regions, fds, strings it passes in); the
 *     library copies what it must keep, so inputs may be freed when a call returns. What a *_create or *_start
 *     function returns is the VMM's to release with the matching *_free.
 *   - A structure the VMM fills in starts with `abi_version`, which must be MIGRATED_ABI_VERSION; zero-filled
 *     fields mean the documented default.
 *   - Threads: the library starts threads only inside migrated_migration_start_*, migrated_snapshot_save and
 *     migrated_snapshot_restore (the migration itself, and a few per channel for streaming, compression and
 *     writing pages), and they have ended when the migration has been waited for or the snapshot call returns;
 *     but an eager restore reads pages on libdispatch's worker threads, which stay idle in the process afterwards. Callbacks may run on
 *     those threads, never on two threads at once for the same handle, and never after the call that caused
 *     them has returned (or, for a migration, after migrated_migration_wait has returned).
 *   - The library keeps no global state but the thread-local error message.
 */
#ifndef MIGRATED_H
#define MIGRATED_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------------------------------
 * Versions and errors
 * ------------------------------------------------------------------------------------------------------------ */

/* The version of this header's ABI. It changes whenever a structure, a function or a meaning below changes. The
 * library refuses (MIGRATED_ERR_ABI_MISMATCH) any structure whose abi_version differs from its own. */
#define MIGRATED_ABI_VERSION 1u

/* The ABI version the loaded library implements. Any thread, any time. */
uint32_t migrated_abi_version(void);

/* Checks that the loaded library implements `header_version` (pass MIGRATED_ABI_VERSION): MIGRATED_OK, or
 * MIGRATED_ERR_ABI_MISMATCH with a message naming both versions. Call it once at start-up. Any thread. */
int migrated_abi_check(uint32_t header_version);

enum migrated_error {
    MIGRATED_OK = 0,
    MIGRATED_ERR_INVALID_ARGUMENT = 1, /* NULL where a value is needed, wrong size or alignment, overlap */
    MIGRATED_ERR_ABI_MISMATCH = 2,     /* abi_version of a structure, or migrated_abi_check, disagrees */
    MIGRATED_ERR_SYSTEM = 3,           /* a system call failed: a KVM ioctl, memory, a file */
    MIGRATED_ERR_CALLBACK = 4,         /* a callback of the VMM returned non-zero */
    MIGRATED_ERR_TRANSPORT = 5,        /* connecting, listening, the TLS handshake or the link failed */
    MIGRATED_ERR_PROTOCOL = 6,         /* the peer broke the stream's rules, or cannot do what was asked */
    MIGRATED_ERR_VERIFY = 7,           /* the memory digests of the two sides differ: nothing was started */
    MIGRATED_ERR_CANCELLED = 8,        /* migrated_migration_cancel was called */
    MIGRATED_ERR_NOT_CONVERGED = 9,    /* the guest dirtied memory too fast for the passes or time allowed */
    MIGRATED_ERR_SNAPSHOT = 10,        /* a snapshot file is bad (checksum, truncation, broken chain, digest) */
    MIGRATED_ERR_STATE = 11,           /* the call does not fit the handle's state (waited twice, no base) */
    MIGRATED_ERR_IN_DOUBT = 12         /* outgoing: the switchover was committed, and the destination did not say it
                                        * started the guest: it may run there. The source stays paused. */
};

/* Why the last failing call on this thread failed, in words; "" after a success. The string belongs to the
 * library and stays valid until the next migrated_ call on this thread. */
const char *migrated_last_error(void);

/* A constant name for an error code ("MIGRATED_ERR_TRANSPORT"), or "unknown". Any thread. */
const char *migrated_error_name(int code);

/* ---------------------------------------------------------------------------------------------------------------
 * The guest: its memory and what the VMM does for the engine
 * ------------------------------------------------------------------------------------------------------------ */

/* Guest pages are 4096 bytes. Every address and size below is a multiple of it. */
#define MIGRATED_PAGE_SIZE 4096u

/* A region's `fd` and `fd_offset` name the file (a memfd, say) mapped MAP_SHARED at host_addr. With it, the
 * source skips the file's holes (never written: zero) without touching them, and the destination writes pages
 * and zeroes through the file (pwritev, hole punching), which on 4 KiB shared memory costs less than faulting
 * pages into the mapping. Without it, every page is read through the mapping (zero pages are found and sent as
 * such) and written through it. */
#define MIGRATED_REGION_FD 0x1u

/* One region of guest RAM, as the VMM maps it. */
struct migrated_region {
    uint32_t slot;            /* the KVM memory slot id (KVM modes); in callback mode any distinct number */
    uint32_t flags;           /* MIGRATED_REGION_* */
    uint64_t guest_phys_addr; /* page aligned */
    uint64_t size;            /* a non-zero multiple of the page size */
    void *host_addr;          /* page aligned; stays mapped as long as the migrated_vm handle */
    int fd;                   /* with MIGRATED_REGION_FD; the library duplicates it */
    uint32_t reserved;        /* zero */
    uint64_t fd_offset;       /* with MIGRATED_REGION_FD: where host_addr's first byte lies in the file, page aligned */
};

/* How the source finds the pages the guest writes while it moves. */
enum migrated_dirty_mode {
    /* KVM's per-slot dirty bitmap, read with KVM_GET_DIRTY_LOG and re-armed with KVM_CLEAR_DIRTY_LOG. The library
     * turns KVM_MEM_LOG_DIRTY_PAGES on and off on the regions' slots (re-registering them without other flags). */
    MIGRATED_DIRTY_KVM_BITMAP = 1,
    /* KVM's per-vCPU dirty ring. The VMM calls migrated_kvm_enable_dirty_ring before it creates any vCPU, and
     * migrated_vm_dirty_ring_full from a vCPU thread that stops with KVM_EXIT_DIRTY_RING_FULL. */
    MIGRATED_DIRTY_KVM_RING = 2,
    /* The VMM tracks writes itself and reports them through the dirty_* callbacks. The library then holds no KVM
     * descriptors and saves no machine state: the VMM saves its vCPUs and devices as blobs. A KVM VMM that wants
     * its guests to move to and from the KVM modes and the daemon adds MIGRATED_COMPONENT_KVM_VM itself, in the
     * format of protocol/kvm-state.md (examples/c-vmm/kvmstate.c does). */
    MIGRATED_DIRTY_CALLBACK = 3
};

/* Device-state component ids (protocol/stream.md §6.5). A blob is named by its (component, instance) pair and
 * carries the version of its own format; the engine moves it without reading it. */
#define MIGRATED_COMPONENT_KVM_VM 0x00000002u    /* the KVM machine state; written by the library in KVM modes */
#define MIGRATED_COMPONENT_VMM_BASE 0x10000000u  /* ids from here up are the VMM's own */
/* The migrated daemon sends a VM's configuration in this component, as the JSON body of its POST /vms
 * (protocol/control-api.md §3.1), e.g. {"id":"web-1","image":"/srv/guest.elf","memory_mib":512,"cmdline":"..."},
 * and needs it in what it receives, to adopt the guest under that id. */
#define MIGRATED_COMPONENT_DAEMON_CONFIG 0x10000001u

/* One device-state blob, as handed to restore_devices. */
struct migrated_device_blob {
    uint32_t component;
    uint32_t instance;
    uint32_t version;
    uint32_t reserved;
    const void *data;
    size_t size;
};

/* Collects the blobs a VMM saves; valid only during the save_devices callback that received it. */
typedef struct migrated_device_list migrated_device_list;

/* Adds a blob; the library copies `size` bytes at `data` (at most 16 MiB - 64). A (component, instance) pair may
 * be added once. The library's own component (MIGRATED_COMPONENT_KVM_VM in KVM modes) is refused. */
int migrated_device_list_add(migrated_device_list *list, uint32_t component, uint32_t instance, uint32_t version,
                             const void *data, size_t size);

/* What the VMM does for the engine. Every callback gets `opaque` first and returns 0 for success; any other value
 * fails the operation (MIGRATED_ERR_CALLBACK). Callbacks a mode does not use may be NULL; the ones it needs are
 * checked when the handle is created or the operation starts. They are called from library threads (see the
 * conventions), one at a time per handle. */
struct migrated_vm_callbacks {
    void *opaque;

    /* Source. pause: stop every vCPU and return only when none runs guest code (KVM modes: every vCPU thread is
     * out of KVM_RUN). resume: let them run again. set_throttle: let the vCPUs run only (1 - fraction) of the
     * time, fraction in [0, 1); 0 lifts it (may be NULL: no auto-converge). */
    int (*pause)(void *opaque);
    int (*resume)(void *opaque);
    int (*set_throttle)(void *opaque, double fraction);
    /* Source, paused: add the VMM's device state with migrated_device_list_add. May be NULL: no blobs. */
    int (*save_devices)(void *opaque, migrated_device_list *list);

    /* Source, MIGRATED_DIRTY_CALLBACK only. dirty_start: begin recording guest writes. dirty_harvest: report
     * every page of region `region` (its index in the regions array) written since dirty_start or the previous
     * harvest, by setting bit i of `bitmap` (bit i%64 of word i/64) for the region's page i, then re-arm. The
     * bitmap has `words` 64-bit words and arrives zeroed; it is KVM_GET_DIRTY_LOG's format. dirty_stop: stop. */
    int (*dirty_start)(void *opaque);
    int (*dirty_harvest)(void *opaque, uint32_t region, uint64_t *bitmap, size_t words);
    int (*dirty_stop)(void *opaque);

    /* Destination. prepare_memory: create zero-filled RAM for the incoming guest, `count` regions as the source
     * laid them out (guest_phys_addr and size set, slot = index), fill in each one's host_addr (and slot; and
     * flags = MIGRATED_REGION_FD with fd and fd_offset when a file backs it), and in KVM modes register them with
     * KVM. restore_devices: rebuild the VMM's devices from the blobs, which are valid
     * during the call (in KVM modes the library has restored MIGRATED_COMPONENT_KVM_VM into the vCPUs first and
     * passes the others). start: run the guest; it is called only after the memory digest was verified.
     * discard: the migration or restore failed after prepare_memory; free what it created. May be NULL. */
    int (*prepare_memory)(void *opaque, struct migrated_region *regions, uint32_t count);
    int (*restore_devices)(void *opaque, const struct migrated_device_blob *blobs, size_t count);
    int (*start)(void *opaque);
    void (*discard)(void *opaque);
};

struct migrated_vm_config {
    uint32_t abi_version;      /* MIGRATED_ABI_VERSION */
    uint32_t dirty_mode;       /* enum migrated_dirty_mode */
    /* KVM modes: the VM's fd and its vCPUs' fds, vCPU i at index i (the library duplicates them; the VMM keeps
     * its own). -1 and NULL in callback mode. */
    int kvm_vm_fd;
    uint32_t vcpu_count;
    const int *kvm_vcpu_fds;
    uint32_t dirty_ring_bytes; /* MIGRATED_DIRTY_KVM_RING: the size given to migrated_kvm_enable_dirty_ring */
    uint32_t region_count;     /* source: the guest's RAM; destination: 0 and NULL (prepare_memory says) */
    const struct migrated_region *regions;
    struct migrated_vm_callbacks callbacks;
};

/* A guest the engine may move: a source, a destination, or both in turn. */
typedef struct migrated_vm migrated_vm;

/* Creates a handle for a guest. Checks the configuration: regions page aligned, sorted, not overlapping in guest
 * or host addresses; fds valid and KVM's; the callbacks the mode needs present. Nothing runs yet. Any thread. */
int migrated_vm_create(const struct migrated_vm_config *config, migrated_vm **out);

/* Releases the handle. It must not be in use by a migration or snapshot call. The guest itself (its memory,
 * vCPUs and fds) is the VMM's and is not touched. NULL is allowed. */
void migrated_vm_free(migrated_vm *vm);

/* KVM modes: the VMM wrote guest memory behind KVM's back (device emulation, DMA); the next harvest reports those
 * pages. Any thread, any time; a no-op while no migration tracks the guest. */
int migrated_vm_mark_dirty(migrated_vm *vm, uint64_t guest_phys_addr, uint64_t length);

/* MIGRATED_DIRTY_KVM_RING: enables KVM's dirty ring of `bytes_per_vcpu` bytes (a power of two, at least 4096) on
 * the VM. Call it once, right after KVM_CREATE_VM and before the first KVM_CREATE_VCPU. */
int migrated_kvm_enable_dirty_ring(int kvm_vm_fd, uint32_t bytes_per_vcpu);

/* MIGRATED_DIRTY_KVM_RING: vCPU `vcpu` stopped with KVM_EXIT_DIRTY_RING_FULL; collects the rings so it may run
 * again. Call it from that vCPU's thread, then re-enter KVM_RUN. */
int migrated_vm_dirty_ring_full(migrated_vm *vm, uint32_t vcpu);

/* ---------------------------------------------------------------------------------------------------------------
 * Live migration
 * ------------------------------------------------------------------------------------------------------------ */

/* Mutual TLS 1.3: this side's certificate and key, the CA that signs peers' certificates, and the names
 * (certificate CN or DNS SAN) of the peers it accepts. All PEM files. */
struct migrated_tls {
    const char *ca_file;
    const char *certificate_file;
    const char *key_file;
    const char *const *allowed_peers;
    uint32_t allowed_peer_count;
};

enum migrated_compression {
    MIGRATED_COMPRESSION_DEFAULT = 0, /* lz4 */
    MIGRATED_COMPRESSION_NONE = 1,
    MIGRATED_COMPRESSION_LZ4 = 2,
    MIGRATED_COMPRESSION_ZSTD = 3,
    MIGRATED_COMPRESSION_ADAPTIVE = 4 /* per batch, whichever of the three the link and the CPU favour */
};

enum migrated_phase {
    MIGRATED_PHASE_SETUP = 0,
    MIGRATED_PHASE_PRECOPY = 1,
    MIGRATED_PHASE_SWITCHOVER = 2,
    MIGRATED_PHASE_COMPLETED = 3,
    MIGRATED_PHASE_FAILED = 4,
    MIGRATED_PHASE_CANCELLED = 5,
    MIGRATED_PHASE_POSTCOPY = 6,        /* the destination runs; the pages it lacks are still coming */
    MIGRATED_PHASE_POSTCOPY_PAUSED = 7  /* post-copy whose link broke, waiting for a resume */
};

/* Where an outgoing migration (or a live save) stands. */
struct migrated_progress {
    uint32_t phase;            /* enum migrated_phase */
    uint32_t pass;
    uint64_t pages_done;       /* of the current pass */
    uint64_t pages_total;
    uint64_t bytes_on_wire;
    double bandwidth;          /* bytes per second */
    double dirty_rate;         /* bytes per second the guest dirties */
    double expected_downtime;  /* seconds, if the guest were paused now; negative when unknown */
    double throttle;           /* fraction of time the vCPUs sleep */
    double elapsed;            /* seconds */
};

/* Called on a library thread after each batch of progress; must return quickly and not call back into the
 * library for the same migration (except migrated_migration_cancel). */
typedef void (*migrated_progress_fn)(void *opaque, const struct migrated_progress *progress);

#define MIGRATED_MIGRATE_NO_AUTO_CONVERGE 0x1u /* never throttle the guest */
/* Outgoing: when pre-copy alone would not meet the downtime limit (where it would throttle the guest or give up),
 * finish in post-copy: the destination starts the guest at once and fetches the pages it lacks while it runs;
 * the source stays paused (phase MIGRATED_PHASE_POSTCOPY) until the last page is verified. The destination must
 * agree: a migrated daemon on shared memory does; this library's own incoming side does not yet, and a migration
 * to it fails with MIGRATED_ERR_PROTOCOL while the source runs on. After the commit, a failure leaves the source
 * paused, as MIGRATED_ERR_IN_DOUBT says. */
#define MIGRATED_MIGRATE_POSTCOPY 0x2u

struct migrated_migration_options {
    uint32_t abi_version;       /* MIGRATED_ABI_VERSION */
    uint32_t flags;             /* MIGRATED_MIGRATE_* */
    /* Where to: "HOST:PORT", "[V6-ADDRESS]:PORT" or "unix:/PATH", as the migrated daemon writes addresses
     * (outgoing: connect; incoming: listen, PORT may be 0, see migrated_migration_address). NULL when `fds` are
     * given. */
    const char *address;
    /* Or connected sockets the VMM owns, one per channel, in channel order; the library duplicates them and the
     * VMM may close its copies once the call returns. Outgoing: they are the channels. Incoming: likewise. */
    const int *fds;
    uint32_t fd_count;
    uint32_t channels;          /* outgoing, with `address`: parallel connections; 0 = 1 */
    const struct migrated_tls *tls; /* NULL: plaintext, as the peer must be */
    uint32_t compression;       /* enum migrated_compression */
    int32_t zstd_level;         /* 0 = 1 */
    uint32_t downtime_limit_ms; /* 0 = 300 */
    uint32_t max_passes;        /* 0 = 30 */
    double time_limit_seconds;  /* 0 = 300 */
    double bandwidth_limit;     /* bytes per second over all channels; 0 = none */
    migrated_progress_fn progress; /* may be NULL */
    void *progress_opaque;
};

/* A migration running on library threads. */
typedef struct migrated_migration migrated_migration;

/* Starts migrating `vm` out and returns at once. Pre-copy with the guest running, then pause, last pages,
 * device state, and the destination's digest check. Before the switchover is committed (the destination told to
 * start), any failure (link, peer, cancel, bad input) resumes the source unthrottled as if nothing happened. Once
 * the destination has said it started the guest, the source stays paused and the VMM should stop it
 * (migrated_migration_wait returns MIGRATED_OK). In between, a failure leaves the source paused and wait returns
 * MIGRATED_ERR_IN_DOUBT: the guest may run at the destination, so the VMM must not resume it until it has
 * learnt (from the destination, or whoever runs it) that it does not. `vm` must stay alive and unused by other
 * migrations until migrated_migration_wait returns. */
int migrated_migration_start_outgoing(migrated_vm *vm, const struct migrated_migration_options *options,
                                      migrated_migration **out);

/* Starts receiving a guest into `vm` and returns once listening (with `address`) or at once (with `fds`). The
 * guest is built through prepare_memory, restore_devices and start; start runs only after the digest check. On
 * failure nothing runs and discard is called if memory was prepared. One migration per call: the listener
 * accepts the channels of one migration and closes. Options that shape the stream (channels, compression,
 * limits) are the sender's; only address, fds and tls apply here. */
int migrated_migration_start_incoming(migrated_vm *vm, const struct migrated_migration_options *options,
                                      migrated_migration **out);

/* Incoming, with an address: where it listens, as "HOST:PORT" (with the port the kernel chose for 0) or
 * "unix:/PATH", copied into `buffer` of `size` bytes with its NUL. MIGRATED_ERR_INVALID_ARGUMENT if it does
 * not fit. Any thread. */
int migrated_migration_address(const migrated_migration *migration, char *buffer, size_t size);

/* Asks the migration to stop. Before switchover it stops, the source runs on, and wait returns
 * MIGRATED_ERR_CANCELLED; after it, it has no effect. Any thread, any number of times, until freed. */
int migrated_migration_cancel(migrated_migration *migration);

/* What a finished migration measured. */
struct migrated_report {
    uint32_t abi_version;       /* filled in by the library */
    int32_t error;              /* MIGRATED_OK or enum migrated_error */
    char message[512];          /* why it failed, NUL terminated; "" on success */
    double total_seconds;
    double setup_seconds;
    double downtime_seconds;    /* outgoing: from the pause to the destination's start; -1 if not reached */
    uint64_t wire_bytes;        /* outgoing */
    uint64_t pages;             /* outgoing: pages sent; incoming: pages written */
    uint32_t passes;
    uint32_t channels;
    uint32_t harvests;          /* outgoing: dirty-log harvests of the source during pre-copy (about two per pass) */
    uint32_t reserved;
    double harvest_seconds;     /* outgoing: the time those harvests took in all (KVM's log or dirty_harvest) */
    char memory_digest[65];     /* incoming and snapshots: the verified memory digest (32 hex digits); "" otherwise */
};

/* Waits until the migration has ended and returns its result (also in `report`, which may be NULL). The
 * library's threads for it have ended when this returns. Call it once, from any one thread. */
int migrated_migration_wait(migrated_migration *migration, struct migrated_report *report);

/* Releases a migration; if it was not waited for, cancels it and waits first. NULL is allowed. */
void migrated_migration_free(migrated_migration *migration);

/* ---------------------------------------------------------------------------------------------------------------
 * Snapshots (protocol/snapshot.md; the files `vmsnap` reads and writes)
 * ------------------------------------------------------------------------------------------------------------ */

#define MIGRATED_SNAPSHOT_PAUSED 0x1u     /* save with the guest paused throughout, not live */
#define MIGRATED_SNAPSHOT_COMPRESSED 0x2u /* the compressed layout (zstd) rather than plain, mappable pages */
#define MIGRATED_SNAPSHOT_DIFF 0x4u       /* only what changed since this handle's last save, which is the base */
#define MIGRATED_SNAPSHOT_OVERWRITE 0x8u  /* replace an existing file */
#define MIGRATED_SNAPSHOT_LEAVE_PAUSED 0x10u /* do not resume the guest after the save: the pause callback's pause
                                                stays in force until the VMM lifts it */

struct migrated_snapshot_options {
    uint32_t abi_version;       /* MIGRATED_ABI_VERSION */
    uint32_t flags;             /* MIGRATED_SNAPSHOT_* */
    uint32_t downtime_limit_ms; /* live saves: 0 = 300 */
    uint32_t reserved;
    migrated_progress_fn progress; /* may be NULL */
    void *progress_opaque;
};

/* Saves `vm` to `path`: written to a temporary file, verified, then renamed, so the file is either complete or
 * not there. A live save runs pre-copy into the file; the guest pauses only for the last pages and its device
 * state. After a save the handle keeps dirty tracking on, so that the next save may be a diff against this file
 * (MIGRATED_SNAPSHOT_DIFF); migrated_vm_free ends it. On failure the guest runs as before. Blocks until done. */
int migrated_snapshot_save(migrated_vm *vm, const char *path, const struct migrated_snapshot_options *options,
                           struct migrated_report *report);

/* Restores the snapshot at `path` (with its chain of bases, found from the files) into `vm` eagerly: every page is
 * read and checked, the memory digest compared, the device state restored; then start is called. On failure
 * discard is called and nothing runs. Blocks until done. */
int migrated_snapshot_restore(migrated_vm *vm, const char *path, struct migrated_report *report);

#ifdef __cplusplus
}
#endif

#endif /* MIGRATED_H */
