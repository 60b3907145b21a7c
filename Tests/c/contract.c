/*
 * The contract of libmigrated's C interface, checked from C through the installed header and library only, with
 * no KVM: a guest in callback mode is plain memory that a thread rewrites, with its own dirty tracking. It moves
 * between two handles of this process over a socket pair and over TCP, is cancelled, has its link cut, and is saved
 * to and restored from snapshot files; and every kind of bad argument gets its error code and a message.
 *
 * Usage: contract DIRECTORY   (a scratch directory for snapshot files)
 * Prints one line per check group and exits 0 when all hold; on the first failure it says where and why, exits 1.
 */
#define _GNU_SOURCE
#include <migrated.h>

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u

#define FAIL(...)                                                                                                      \
    do {                                                                                                               \
        fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);                                                                \
        fprintf(stderr, __VA_ARGS__);                                                                                  \
        fprintf(stderr, "\n");                                                                                         \
        exit(1);                                                                                                       \
    } while (0)
#define CHECK(condition)                                                                                               \
    do {                                                                                                               \
        if (!(condition)) FAIL("check failed: %s", #condition);                                                        \
    } while (0)
/* A call must return `code`, and a failure must say why in words. */
#define EXPECT(call, code)                                                                                             \
    do {                                                                                                               \
        int result_ = (call);                                                                                          \
        if (result_ != (code))                                                                                         \
            FAIL("%s returned %s (%s), expected %s", #call, migrated_error_name(result_), migrated_last_error(),       \
                 migrated_error_name(code));                                                                           \
        if (result_ != MIGRATED_OK && migrated_last_error()[0] == '\0') FAIL("%s failed without a message", #call);    \
    } while (0)

/* ---- a guest in callback mode ---------------------------------------------------------------------------------- */

enum { REGIONS = 2 };
static const uint64_t region_base[REGIONS] = {0, 16u << 20};
static const uint64_t region_size[REGIONS] = {8u << 20, 4u << 20};

#define DEVICE_COMPONENT (MIGRATED_COMPONENT_VMM_BASE + 5)

struct guest {
    struct migrated_region regions[REGIONS];
    uint64_t *dirty[REGIONS]; /* pages written since the last harvest, one bit each */
    pthread_mutex_t lock;     /* guards paused, tracking, dirty and the writes themselves */
    int paused, tracking, memfd;
    atomic_int pauses, resumes, starts, discards, restored_ok;
    atomic_int stop_writer;
    pthread_t writer;
    uint64_t generation;
};

static uint64_t pages_of(int region) { return region_size[region] / PAGE; }

/* The writer checks `paused` under the lock before each write, so once this returns no write happens. */
static void set_paused(struct guest *g, int paused) {
    pthread_mutex_lock(&g->lock);
    g->paused = paused;
    pthread_mutex_unlock(&g->lock);
}

static int on_pause(void *opaque) {
    struct guest *g = opaque;
    set_paused(g, 1);
    g->pauses++;
    return 0;
}

static int on_resume(void *opaque) {
    struct guest *g = opaque;
    set_paused(g, 0);
    g->resumes++;
    return 0;
}

static int on_dirty_start(void *opaque) {
    struct guest *g = opaque;
    pthread_mutex_lock(&g->lock);
    g->tracking = 1;
    for (int r = 0; r < REGIONS; r++) memset(g->dirty[r], 0, (pages_of(r) + 63) / 64 * 8);
    pthread_mutex_unlock(&g->lock);
    return 0;
}

static int on_dirty_harvest(void *opaque, uint32_t region, uint64_t *bitmap, size_t words) {
    struct guest *g = opaque;
    if (region >= REGIONS || words != (pages_of((int)region) + 63) / 64) return -1;
    pthread_mutex_lock(&g->lock);
    for (size_t w = 0; w < words; w++) {
        if (bitmap[w] != 0) { pthread_mutex_unlock(&g->lock); return -2; } /* the library hands it over zeroed */
        bitmap[w] = g->dirty[region][w];
        g->dirty[region][w] = 0;
    }
    pthread_mutex_unlock(&g->lock);
    return 0;
}

static int on_dirty_stop(void *opaque) {
    struct guest *g = opaque;
    pthread_mutex_lock(&g->lock);
    g->tracking = 0;
    pthread_mutex_unlock(&g->lock);
    return 0;
}

static int on_save_devices(void *opaque, migrated_device_list *list) {
    struct guest *g = opaque;
    char blob[64];
    int length = snprintf(blob, sizeof blob, "device at generation %llu", (unsigned long long)g->generation);
    return migrated_device_list_add(list, DEVICE_COMPONENT, 7, 3, blob, (size_t)length);
}

/* Rewrites pages of both regions with a generation number until told to stop; never while paused. */
static void *write_pages(void *opaque) {
    struct guest *g = opaque;
    uint64_t seed = 88172645463325252ull;
    while (!g->stop_writer) {
        pthread_mutex_lock(&g->lock);
        if (!g->paused) {
            for (int i = 0; i < 64; i++) {
                seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
                int r = (int)(seed % REGIONS);
                uint64_t page = (seed >> 8) % pages_of(r);
                uint64_t *words = (uint64_t *)((char *)g->regions[r].host_addr + page * PAGE);
                g->generation++;
                for (int w = 0; w < 8; w++) words[w * 64] = g->generation ^ (page << 20) ^ (uint64_t)w;
                if (g->tracking) g->dirty[r][page / 64] |= 1ull << (page % 64);
            }
        }
        pthread_mutex_unlock(&g->lock);
        usleep(200);
    }
    return NULL;
}

/* A source guest: two anonymous regions, the first with a pattern, and a writer thread. */
static void make_source(struct guest *g) {
    memset(g, 0, sizeof *g);
    pthread_mutex_init(&g->lock, NULL);
    g->memfd = -1;
    for (int r = 0; r < REGIONS; r++) {
        void *memory = mmap(NULL, region_size[r], PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        CHECK(memory != MAP_FAILED);
        g->regions[r] = (struct migrated_region){.slot = (uint32_t)r, .guest_phys_addr = region_base[r], .size = region_size[r],
                                                 .host_addr = memory};
        g->dirty[r] = calloc((pages_of(r) + 63) / 64, 8);
    }
    /* Incompressible data in two thirds of the first region (so that a bandwidth cap makes pre-copy slow), zero
     * pages in the rest. */
    uint64_t seed = 0x9E3779B97F4A7C15ull;
    for (uint64_t page = 0; page < pages_of(0); page++) {
        if (page % 3 == 2) continue;
        uint64_t *words = (uint64_t *)((char *)g->regions[0].host_addr + page * PAGE);
        for (unsigned w = 0; w < PAGE / 8; w++) { seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17; words[w] = seed; }
    }
    CHECK(pthread_create(&g->writer, NULL, write_pages, g) == 0);
}

static void destroy_source(struct guest *g) {
    g->stop_writer = 1;
    pthread_join(g->writer, NULL);
    for (int r = 0; r < REGIONS; r++) {
        munmap(g->regions[r].host_addr, region_size[r]);
        free(g->dirty[r]);
    }
}

/* ---- a destination guest --------------------------------------------------------------------------------------- */

/* The first region goes into a memfd (so the library writes it through the file), the second is anonymous. */
static int on_prepare_memory(void *opaque, struct migrated_region *regions, uint32_t count) {
    struct guest *g = opaque;
    if (count != REGIONS) return -1;
    for (uint32_t r = 0; r < count; r++) {
        if (regions[r].guest_phys_addr != region_base[r] || regions[r].size != region_size[r] || regions[r].host_addr != NULL) return -2;
        if (r == 0) {
            g->memfd = memfd_create("contract-guest", MFD_CLOEXEC);
            if (g->memfd < 0 || ftruncate(g->memfd, (off_t)regions[r].size) != 0) return -3;
            regions[r].host_addr = mmap(NULL, regions[r].size, PROT_READ | PROT_WRITE, MAP_SHARED, g->memfd, 0);
            regions[r].flags = MIGRATED_REGION_FD;
            regions[r].fd = g->memfd;
            regions[r].fd_offset = 0;
        } else {
            regions[r].host_addr = mmap(NULL, regions[r].size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        }
        if (regions[r].host_addr == MAP_FAILED) return -4;
        g->regions[r] = regions[r];
    }
    return 0;
}

static int on_restore_devices(void *opaque, const struct migrated_device_blob *blobs, size_t count) {
    struct guest *g = opaque;
    if (count != 1 || blobs[0].component != DEVICE_COMPONENT || blobs[0].instance != 7 || blobs[0].version != 3) return -1;
    if (blobs[0].size < 7 || memcmp(blobs[0].data, "device ", 7) != 0) return -2;
    g->restored_ok++;
    return 0;
}

static int on_start(void *opaque) {
    struct guest *g = opaque;
    g->starts++;
    return 0;
}

static void on_discard(void *opaque) {
    struct guest *g = opaque;
    g->discards++;
    for (int r = 0; r < REGIONS; r++) {
        if (g->regions[r].host_addr) munmap(g->regions[r].host_addr, region_size[r]);
        g->regions[r].host_addr = NULL;
    }
    if (g->memfd >= 0) close(g->memfd);
    g->memfd = -1;
}

static void make_destination(struct guest *g) {
    memset(g, 0, sizeof *g);
    pthread_mutex_init(&g->lock, NULL);
    g->memfd = -1;
}

static struct migrated_vm_config config_for(struct guest *g, int source) {
    struct migrated_vm_config config = {
        .abi_version = MIGRATED_ABI_VERSION,
        .dirty_mode = MIGRATED_DIRTY_CALLBACK,
        .kvm_vm_fd = -1,
        .region_count = source ? REGIONS : 0,
        .regions = source ? g->regions : NULL,
        .callbacks = {.opaque = g, .pause = on_pause, .resume = on_resume, .save_devices = on_save_devices,
                      .dirty_start = on_dirty_start, .dirty_harvest = on_dirty_harvest, .dirty_stop = on_dirty_stop,
                      .prepare_memory = on_prepare_memory, .restore_devices = on_restore_devices, .start = on_start,
                      .discard = on_discard},
    };
    return config;
}

static void expect_same_memory(const struct guest *a, const struct guest *b) {
    for (int r = 0; r < REGIONS; r++) {
        CHECK(a->regions[r].host_addr != NULL && b->regions[r].host_addr != NULL);
        for (uint64_t page = 0; page < pages_of(r); page++) {
            if (memcmp((char *)a->regions[r].host_addr + page * PAGE, (char *)b->regions[r].host_addr + page * PAGE, PAGE) != 0)
                FAIL("region %d page %llu differs", r, (unsigned long long)page);
        }
    }
}

static struct migrated_migration_options options_with(const char *address, const int *fds, uint32_t fd_count) {
    return (struct migrated_migration_options){.abi_version = MIGRATED_ABI_VERSION, .address = address, .fds = fds, .fd_count = fd_count};
}

static int progress_calls;
static void on_progress(void *opaque, const struct migrated_progress *progress) {
    (void)opaque;
    if (progress->phase <= MIGRATED_PHASE_CANCELLED) progress_calls++;
}

/* ---- the checks ------------------------------------------------------------------------------------------------ */

static void check_versions_and_arguments(void) {
    CHECK(migrated_abi_version() == MIGRATED_ABI_VERSION);
    EXPECT(migrated_abi_check(MIGRATED_ABI_VERSION), MIGRATED_OK);
    CHECK(migrated_last_error()[0] == '\0');
    EXPECT(migrated_abi_check(MIGRATED_ABI_VERSION + 1), MIGRATED_ERR_ABI_MISMATCH);
    CHECK(strstr(migrated_last_error(), "version") != NULL);
    CHECK(strcmp(migrated_error_name(MIGRATED_ERR_TRANSPORT), "MIGRATED_ERR_TRANSPORT") == 0);
    CHECK(strcmp(migrated_error_name(-5), "unknown") == 0 && strcmp(migrated_error_name(999), "unknown") == 0);

    struct guest g;
    make_destination(&g);
    migrated_vm *vm = (migrated_vm *)0x1;
    EXPECT(migrated_vm_create(NULL, &vm), MIGRATED_ERR_INVALID_ARGUMENT);
    CHECK(vm == NULL);
    struct migrated_vm_config config = config_for(&g, 0);
    EXPECT(migrated_vm_create(&config, NULL), MIGRATED_ERR_INVALID_ARGUMENT);
    config.abi_version = 0;
    EXPECT(migrated_vm_create(&config, &vm), MIGRATED_ERR_ABI_MISMATCH);
    config = config_for(&g, 0);
    config.dirty_mode = 77;
    EXPECT(migrated_vm_create(&config, &vm), MIGRATED_ERR_INVALID_ARGUMENT);
    config = config_for(&g, 0);
    config.callbacks.dirty_harvest = NULL;
    EXPECT(migrated_vm_create(&config, &vm), MIGRATED_ERR_INVALID_ARGUMENT);
    config = config_for(&g, 0);
    config.dirty_mode = MIGRATED_DIRTY_KVM_BITMAP; /* no fds */
    EXPECT(migrated_vm_create(&config, &vm), MIGRATED_ERR_INVALID_ARGUMENT);

    /* Regions: each kind of bad one is refused before anything runs. */
    char *memory = mmap(NULL, 4u << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(memory != MAP_FAILED);
    struct migrated_region good[2] = {
        {.slot = 0, .guest_phys_addr = 0, .size = 1u << 20, .host_addr = memory},
        {.slot = 1, .guest_phys_addr = 2u << 20, .size = 1u << 20, .host_addr = memory + (1u << 20)},
    };
    struct migrated_region bad[2];
    config = config_for(&g, 0);
    config.regions = bad;
    config.region_count = 2;
#define EXPECT_BAD_REGIONS(change)                                                                                     \
    do {                                                                                                               \
        memcpy(bad, good, sizeof bad);                                                                                 \
        change;                                                                                                        \
        EXPECT(migrated_vm_create(&config, &vm), MIGRATED_ERR_INVALID_ARGUMENT);                                       \
    } while (0)
    EXPECT_BAD_REGIONS(bad[1].host_addr = NULL);
    EXPECT_BAD_REGIONS(bad[1].host_addr = memory + 100);               /* not page aligned */
    EXPECT_BAD_REGIONS(bad[1].guest_phys_addr = (2u << 20) + 512);     /* not page aligned */
    EXPECT_BAD_REGIONS(bad[1].size = 12345);                           /* not a multiple of the page */
    EXPECT_BAD_REGIONS(bad[1].size = 0);
    EXPECT_BAD_REGIONS(bad[1].guest_phys_addr = 512u << 10);           /* overlaps region 0 in the guest */
    EXPECT_BAD_REGIONS(bad[1].host_addr = memory + (512u << 10));      /* overlaps region 0 in the host */
    EXPECT_BAD_REGIONS(bad[1].slot = 0);                               /* same slot */
    EXPECT_BAD_REGIONS(bad[1].flags = 0x80);                           /* unknown flag */
    EXPECT_BAD_REGIONS((bad[1].flags = MIGRATED_REGION_FD, bad[1].fd = 9999));
    EXPECT_BAD_REGIONS(bad[1].guest_phys_addr = UINT64_MAX - PAGE + 1); /* wraps */
    config.regions = NULL;
    EXPECT(migrated_vm_create(&config, &vm), MIGRATED_ERR_INVALID_ARGUMENT);
    config.regions = good;
    EXPECT(migrated_vm_create(&config, &vm), MIGRATED_OK);

    /* Options: NULL, wrong version, neither address nor fds, both, a bad address, a bad compression. */
    migrated_migration *migration = (migrated_migration *)0x1;
    EXPECT(migrated_migration_start_outgoing(vm, NULL, &migration), MIGRATED_ERR_INVALID_ARGUMENT);
    CHECK(migration == NULL);
    struct migrated_migration_options options = options_with(NULL, NULL, 0);
    EXPECT(migrated_migration_start_outgoing(vm, &options, &migration), MIGRATED_ERR_INVALID_ARGUMENT);
    int fds[1] = {0};
    options = options_with("127.0.0.1:1", fds, 1);
    EXPECT(migrated_migration_start_outgoing(vm, &options, &migration), MIGRATED_ERR_INVALID_ARGUMENT);
    options = options_with("no port here", NULL, 0);
    EXPECT(migrated_migration_start_outgoing(vm, &options, &migration), MIGRATED_ERR_INVALID_ARGUMENT);
    options = options_with("127.0.0.1:1", NULL, 0);
    options.compression = 42;
    EXPECT(migrated_migration_start_outgoing(vm, &options, &migration), MIGRATED_ERR_INVALID_ARGUMENT);
    options.compression = 0;
    options.abi_version = 0;
    EXPECT(migrated_migration_start_outgoing(vm, &options, &migration), MIGRATED_ERR_ABI_MISMATCH);
    struct migrated_tls tls = {.ca_file = "/nonexistent/ca.pem", .certificate_file = "/nonexistent/c.pem", .key_file = "/nonexistent/k.pem"};
    options = options_with("127.0.0.1:1", NULL, 0);
    options.tls = &tls;
    EXPECT(migrated_migration_start_outgoing(vm, &options, &migration), MIGRATED_ERR_INVALID_ARGUMENT); /* no peers */
    EXPECT(migrated_migration_start_outgoing(NULL, &options, &migration), MIGRATED_ERR_INVALID_ARGUMENT);
    /* Nothing listens on port 1: a transport error, and the guest was never paused. */
    options = options_with("127.0.0.1:1", NULL, 0);
    EXPECT(migrated_migration_start_outgoing(vm, &options, &migration), MIGRATED_OK);
    struct migrated_report report;
    EXPECT(migrated_migration_wait(migration, &report), MIGRATED_ERR_TRANSPORT);
    CHECK(report.error == MIGRATED_ERR_TRANSPORT && report.message[0] != '\0' && report.abi_version == MIGRATED_ABI_VERSION);
    EXPECT(migrated_migration_wait(migration, &report), MIGRATED_ERR_STATE); /* once only */
    migrated_migration_free(migration);
    CHECK(g.pauses == g.resumes);
    /* Snapshots: a diff needs a base, a bad path fails cleanly, a restore into a handle with memory is refused. */
    struct migrated_snapshot_options snapshot = {.abi_version = MIGRATED_ABI_VERSION, .flags = MIGRATED_SNAPSHOT_DIFF};
    EXPECT(migrated_snapshot_save(vm, "/tmp/never.snap", &snapshot, &report), MIGRATED_ERR_STATE);
    snapshot.flags = 0x1000;
    EXPECT(migrated_snapshot_save(vm, "/tmp/never.snap", &snapshot, &report), MIGRATED_ERR_INVALID_ARGUMENT);
    EXPECT(migrated_snapshot_restore(vm, "/tmp/never.snap", &report), MIGRATED_ERR_STATE);
    EXPECT(migrated_device_list_add(NULL, 1, 2, 3, "x", 1), MIGRATED_ERR_INVALID_ARGUMENT);
    migrated_vm_free(vm);
    migrated_vm_free(NULL);
    migrated_migration_free(NULL);
    munmap(memory, 4u << 20);
    printf("ok arguments: bad arguments, versions and states are refused with their codes and messages\n");
}

/* Moves a running source guest to a new destination handle with `options` on both sides; returns the results. */
static void migrate(migrated_vm *source_vm, struct guest *destination,
                    struct migrated_migration_options *out_options, struct migrated_migration_options *in_options,
                    int listen, int *out_status, int *in_status, struct migrated_report *out_report) {
    struct migrated_vm_config config = config_for(destination, 0);
    migrated_vm *destination_vm;
    EXPECT(migrated_vm_create(&config, &destination_vm), MIGRATED_OK);
    migrated_migration *incoming, *outgoing;
    EXPECT(migrated_migration_start_incoming(destination_vm, in_options, &incoming), MIGRATED_OK);
    char address[128];
    if (listen) {
        EXPECT(migrated_migration_address(incoming, address, sizeof address), MIGRATED_OK);
        CHECK(strncmp(address, "127.0.0.1:", 10) == 0 && strcmp(address, "127.0.0.1:0") != 0);
        EXPECT(migrated_migration_address(incoming, address, 4), MIGRATED_ERR_INVALID_ARGUMENT);
        EXPECT(migrated_migration_address(incoming, address, sizeof address), MIGRATED_OK);
        out_options->address = address;
    } else {
        EXPECT(migrated_migration_address(incoming, address, sizeof address), MIGRATED_ERR_STATE);
    }
    EXPECT(migrated_migration_start_outgoing(source_vm, out_options, &outgoing), MIGRATED_OK);
    *out_status = migrated_migration_wait(outgoing, out_report);
    if (*out_status != MIGRATED_OK) migrated_migration_cancel(incoming);
    struct migrated_report in_report;
    *in_status = migrated_migration_wait(incoming, &in_report);
    if (*in_status == MIGRATED_OK) CHECK(strlen(in_report.memory_digest) == 32 && in_report.pages > 0);
    migrated_migration_free(outgoing);
    migrated_migration_free(incoming);
    migrated_vm_free(destination_vm);
}

/* A source guest as make_source makes it, with its handle, once the writer has been at it for a moment. */
static migrated_vm *running_source(struct guest *g) {
    make_source(g);
    struct migrated_vm_config config = config_for(g, 1);
    migrated_vm *vm;
    EXPECT(migrated_vm_create(&config, &vm), MIGRATED_OK);
    usleep(100 * 1000);
    return vm;
}

static void check_migrations(void) {
    struct guest source;
    migrated_vm *vm = running_source(&source);

    /* Over a socket pair the VMM made, plaintext. */
    int pair[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) == 0);
    struct migrated_migration_options out = options_with(NULL, &pair[0], 1), in = options_with(NULL, &pair[1], 1);
    out.progress = on_progress;
    struct guest destination;
    make_destination(&destination);
    int out_status, in_status;
    struct migrated_report report;
    migrate(vm, &destination, &out, &in, 0, &out_status, &in_status, &report);
    close(pair[0]);
    close(pair[1]);
    if (out_status != MIGRATED_OK || in_status != MIGRATED_OK)
        FAIL("socket-pair migration: out %s, in %s: %s", migrated_error_name(out_status), migrated_error_name(in_status), report.message);
    CHECK(source.paused && source.pauses == 1 && source.resumes == 0); /* moved: the source stays paused */
    CHECK(destination.starts == 1 && destination.restored_ok == 1 && destination.discards == 0);
    CHECK(report.passes >= 2 && report.downtime_seconds >= 0 && report.wire_bytes > 0 && progress_calls > 0);
    expect_same_memory(&source, &destination);
    printf("ok socket pair: %u passes, %llu pages, downtime %.1f ms, memory equal, device blob restored, start once\n",
           report.passes, (unsigned long long)report.pages, report.downtime_seconds * 1000);
    on_discard(&destination);

    /* Over TCP to a listener on a port the kernel chose, two channels, zstd; the guest runs again first. */
    on_resume(&source);
    out = options_with(NULL, NULL, 0);
    out.channels = 2;
    out.compression = MIGRATED_COMPRESSION_ZSTD;
    in = options_with("127.0.0.1:0", NULL, 0);
    make_destination(&destination);
    migrate(vm, &destination, &out, &in, 1, &out_status, &in_status, &report);
    if (out_status != MIGRATED_OK || in_status != MIGRATED_OK)
        FAIL("TCP migration: out %s, in %s: %s", migrated_error_name(out_status), migrated_error_name(in_status), report.message);
    CHECK(report.channels == 2 && destination.starts == 1);
    expect_same_memory(&source, &destination);
    printf("ok tcp: 2 channels, zstd, %llu wire bytes, memory equal\n", (unsigned long long)report.wire_bytes);
    on_discard(&destination);

    /* Cancelled while pre-copy crawls under a bandwidth cap: the source runs on. */
    on_resume(&source);
    int pauses = source.pauses, resumes = source.resumes;
    out = options_with(NULL, NULL, 0);
    out.bandwidth_limit = 2e6;
    out.compression = MIGRATED_COMPRESSION_NONE;
    in = options_with("127.0.0.1:0", NULL, 0);
    struct migrated_vm_config destination_config = config_for(&destination, 0);
    make_destination(&destination);
    migrated_vm *destination_vm;
    EXPECT(migrated_vm_create(&destination_config, &destination_vm), MIGRATED_OK);
    migrated_migration *incoming, *outgoing;
    EXPECT(migrated_migration_start_incoming(destination_vm, &in, &incoming), MIGRATED_OK);
    char address[128];
    EXPECT(migrated_migration_address(incoming, address, sizeof address), MIGRATED_OK);
    out.address = address;
    EXPECT(migrated_migration_start_outgoing(vm, &out, &outgoing), MIGRATED_OK);
    /* The handle is busy: a second operation is refused. */
    EXPECT(migrated_migration_start_outgoing(vm, &out, &(migrated_migration *){NULL}), MIGRATED_ERR_STATE);
    usleep(300 * 1000);
    EXPECT(migrated_migration_cancel(outgoing), MIGRATED_OK);
    EXPECT(migrated_migration_wait(outgoing, &report), MIGRATED_ERR_CANCELLED);
    CHECK(report.error == MIGRATED_ERR_CANCELLED);
    CHECK(migrated_migration_wait(incoming, NULL) != MIGRATED_OK);
    CHECK(!source.paused && source.pauses - pauses == source.resumes - resumes);
    CHECK(destination.starts == 0);
    migrated_migration_free(outgoing);
    migrated_migration_free(incoming);
    printf("ok cancel: the source runs on, nothing started at the destination\n");

    /* The destination goes away mid-stream (its migration cancelled): the source runs on, and a retry lands. */
    make_destination(&destination);
    EXPECT(migrated_migration_start_incoming(destination_vm, &in, &incoming), MIGRATED_OK);
    EXPECT(migrated_migration_address(incoming, address, sizeof address), MIGRATED_OK);
    EXPECT(migrated_migration_start_outgoing(vm, &out, &outgoing), MIGRATED_OK);
    usleep(300 * 1000);
    EXPECT(migrated_migration_cancel(incoming), MIGRATED_OK);
    EXPECT(migrated_migration_wait(incoming, NULL), MIGRATED_ERR_CANCELLED);
    int status = migrated_migration_wait(outgoing, &report);
    CHECK(status == MIGRATED_ERR_TRANSPORT || status == MIGRATED_ERR_PROTOCOL);
    CHECK(!source.paused && destination.starts == 0 && destination.discards == 1);
    migrated_migration_free(outgoing);
    migrated_migration_free(incoming);
    migrated_vm_free(destination_vm);
    out = options_with(NULL, NULL, 0);
    in = options_with("127.0.0.1:0", NULL, 0);
    make_destination(&destination);
    migrate(vm, &destination, &out, &in, 1, &out_status, &in_status, &report);
    CHECK(out_status == MIGRATED_OK && in_status == MIGRATED_OK);
    expect_same_memory(&source, &destination);
    on_discard(&destination);
    printf("ok link cut: %s, the source runs on; the retry lands\n", migrated_error_name(status));

    /* Post-copy asked of a destination that cannot finish in it (this library's incoming side): refused at the
     * negotiation, with a message, and the source runs on. The guest runs again first. */
    on_resume(&source);
    out = options_with(NULL, NULL, 0);
    out.flags = MIGRATED_MIGRATE_POSTCOPY;
    in = options_with("127.0.0.1:0", NULL, 0);
    make_destination(&destination);
    migrate(vm, &destination, &out, &in, 1, &out_status, &in_status, &report);
    if (out_status != MIGRATED_ERR_PROTOCOL || strstr(report.message, "post-copy") == NULL)
        FAIL("post-copy to a destination without it: %s (%s)", migrated_error_name(out_status), report.message);
    CHECK(!source.paused && destination.starts == 0);
    printf("ok post-copy refused: %s\n", report.message);

    destroy_source(&source);
    migrated_vm_free(vm);
}

/* A peer that accepts the connection and never answers: a cancel, or the time limit, still ends the migration
 * at once, and the source runs on. */
static void check_silent_peer(void) {
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t length = sizeof address;
    CHECK(bind(listener, (struct sockaddr *)&address, length) == 0 && listen(listener, 8) == 0);
    CHECK(getsockname(listener, (struct sockaddr *)&address, &length) == 0);
    char text[64];
    snprintf(text, sizeof text, "127.0.0.1:%u", ntohs(address.sin_port));

    struct guest source;
    migrated_vm *vm = running_source(&source);
    for (int round = 0; round < 2; round++) {
        struct migrated_migration_options options = options_with(text, NULL, 0);
        if (round == 1) options.time_limit_seconds = 0.5;
        migrated_migration *migration;
        struct timespec start, end;
        clock_gettime(CLOCK_MONOTONIC, &start);
        EXPECT(migrated_migration_start_outgoing(vm, &options, &migration), MIGRATED_OK);
        if (round == 0) {
            usleep(300 * 1000);
            EXPECT(migrated_migration_cancel(migration), MIGRATED_OK);
        }
        struct migrated_report report;
        EXPECT(migrated_migration_wait(migration, &report), round == 0 ? MIGRATED_ERR_CANCELLED : MIGRATED_ERR_NOT_CONVERGED);
        clock_gettime(CLOCK_MONOTONIC, &end);
        double seconds = (double)(end.tv_sec - start.tv_sec) + (double)(end.tv_nsec - start.tv_nsec) / 1e9;
        CHECK(seconds < 3);
        CHECK(!source.paused && source.pauses == source.resumes);
        migrated_migration_free(migration);
    }
    migrated_vm_free(vm);
    destroy_source(&source);
    close(listener);
    printf("ok silent peer: a cancel and the time limit end a migration whose peer never answers\n");
}

static void check_snapshots(const char *directory) {
    struct guest source;
    migrated_vm *vm = running_source(&source);
    char full[512], diff[512];
    snprintf(full, sizeof full, "%s/full.snap", directory);
    snprintf(diff, sizeof diff, "%s/diff.snap", directory);
    unlink(full);
    unlink(diff);

    /* Live, left paused, so that the guest's memory is the snapshot's; then a diff after more writes. */
    /* A generous downtime limit: under a sanitizer the writer thread dirties memory about as fast as it is saved. */
    struct migrated_snapshot_options options = {.abi_version = MIGRATED_ABI_VERSION, .flags = MIGRATED_SNAPSHOT_LEAVE_PAUSED,
                                                .downtime_limit_ms = 500};
    struct migrated_report report;
    EXPECT(migrated_snapshot_save(vm, full, &options, &report), MIGRATED_OK);
    CHECK(source.paused && access(full, R_OK) == 0);
    EXPECT(migrated_snapshot_save(vm, full, &options, &report), MIGRATED_ERR_SYSTEM); /* exists: not overwritten */
    struct guest restored;
    make_destination(&restored);
    struct migrated_vm_config restore_config = config_for(&restored, 0);
    migrated_vm *restored_vm;
    EXPECT(migrated_vm_create(&restore_config, &restored_vm), MIGRATED_OK);
    EXPECT(migrated_snapshot_restore(restored_vm, full, &report), MIGRATED_OK);
    CHECK(restored.starts == 1 && restored.restored_ok == 1);
    expect_same_memory(&source, &restored);
    migrated_vm_free(restored_vm);
    on_discard(&restored);

    on_resume(&source);
    usleep(100 * 1000);
    options.flags = MIGRATED_SNAPSHOT_DIFF | MIGRATED_SNAPSHOT_COMPRESSED | MIGRATED_SNAPSHOT_LEAVE_PAUSED;
    EXPECT(migrated_snapshot_save(vm, diff, &options, &report), MIGRATED_OK);
    make_destination(&restored);
    restore_config = config_for(&restored, 0);
    EXPECT(migrated_vm_create(&restore_config, &restored_vm), MIGRATED_OK);
    EXPECT(migrated_snapshot_restore(restored_vm, diff, &report), MIGRATED_OK);
    expect_same_memory(&source, &restored);
    migrated_vm_free(restored_vm);
    on_discard(&restored);
    printf("ok snapshots: full and compressed diff saved live and restored, memory equal\n");

    /* A corrupted file is refused: nothing starts and the prepared memory is discarded. */
    FILE *file = fopen(full, "r+b");
    CHECK(file != NULL);
    CHECK(fseek(file, 1 << 20, SEEK_SET) == 0);
    int byte = fgetc(file);
    CHECK(fseek(file, 1 << 20, SEEK_SET) == 0);
    fputc(byte ^ 0x40, file);
    fclose(file);
    make_destination(&restored);
    restore_config = config_for(&restored, 0);
    EXPECT(migrated_vm_create(&restore_config, &restored_vm), MIGRATED_OK);
    EXPECT(migrated_snapshot_restore(restored_vm, full, &report), MIGRATED_ERR_SNAPSHOT);
    CHECK(report.error == MIGRATED_ERR_SNAPSHOT && restored.starts == 0 && restored.discards == 1);
    printf("ok corrupted snapshot: %s\n", report.message);
    migrated_vm_free(restored_vm);

    destroy_source(&source);
    migrated_vm_free(vm);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SCRATCH-DIRECTORY\n", argv[0]);
        return 64;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    check_versions_and_arguments();
    check_migrations();
    check_silent_peer();
    check_snapshots(argv[1]);
    printf("ok all\n");
    return 0;
}
