/*
 * migrate.c: every use of libmigrated in c-vmm, through include/migrated.h only.
 */
#define _GNU_SOURCE
#include "migrate.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <migrated.h>

#include "cvmm.h"
#include "kvmstate.h"

#define MAX_FDS 64
#define MAX_PEERS 16
#define MAX_CONFIG_BLOB ((16u << 20) - 64u)

struct migrator {
    struct vm *vm;
    enum dirty_choice dirty;
    uint32_t ring_bytes;
    migrated_vm *handle;
    int vcpu_fds[1];
    /* The daemon configuration blob save_devices adds during the current operation, if any. */
    const void *config_blob;
    size_t config_size;
    /* Progress lines, at most one per 200 ms and one per phase change. */
    double last_progress;
    uint32_t last_phase;
};

static double monotonic_seconds(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

/* "error NAME: message" for a library failure; the message from the report when it has one. */
static void reply_failure(int code, const char *message)
{
    if (message == NULL || message[0] == '\0')
        message = "(no message)";
    cvmm_reply("error %s: %s", migrated_error_name(code), message);
}

static void reply_library_failure(int code) { reply_failure(code, migrated_last_error()); }

int migrator_check_abi(void)
{
    int status = migrated_abi_check(MIGRATED_ABI_VERSION);
    if (status != MIGRATED_OK) {
        cvmm_log("libmigrated ABI check failed (%s): %s", migrated_error_name(status), migrated_last_error());
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Callbacks
 * ------------------------------------------------------------------------------------------------------------ */

/* A vm_* call's result as a callback returns it: 0, or -1 after saying which callback failed and why. */
static int callback_result(const struct migrator *m, const char *callback, int result)
{
    if (result < 0) {
        cvmm_log("%s: %s", callback, m->vm->error);
        return -1;
    }
    return 0;
}

static int cb_pause(void *opaque)
{
    struct migrator *m = opaque;
    return callback_result(m, "pause", vm_pause(m->vm, false));
}

static int cb_resume(void *opaque)
{
    struct migrator *m = opaque;
    return vm_resume(m->vm, false);
}

static int cb_set_throttle(void *opaque, double fraction)
{
    struct migrator *m = opaque;
    if (cvmm_verbose)
        cvmm_log("throttle %.0f%%", fraction * 100);
    return callback_result(m, "set_throttle", vm_set_throttle(m->vm, fraction));
}

static int cb_save_devices(void *opaque, migrated_device_list *list)
{
    struct migrator *m = opaque;
    if (m->dirty == DIRTY_CALLBACK) {
        /* The library holds no KVM descriptors in callback mode: the machine state is this VMM's to write, in the
         * format the library writes in the KVM modes, so that any receiver can restore it. */
        uint8_t *blob = NULL;
        size_t size = 0;
        if (kvmstate_capture(m->vm, &blob, &size) < 0) {
            cvmm_log("save_devices: capturing the machine state: %s", m->vm->error);
            return -1;
        }
        int status = migrated_device_list_add(list, MIGRATED_COMPONENT_KVM_VM, 0, KVMSTATE_VERSION, blob, size);
        free(blob);
        if (status != MIGRATED_OK) {
            cvmm_log("save_devices: adding the machine state: %s: %s", migrated_error_name(status), migrated_last_error());
            return -1;
        }
    }
    if (m->config_blob != NULL) {
        int status =
            migrated_device_list_add(list, MIGRATED_COMPONENT_DAEMON_CONFIG, 0, 1, m->config_blob, m->config_size);
        if (status != MIGRATED_OK) {
            cvmm_log("save_devices: adding the daemon configuration: %s: %s", migrated_error_name(status),
                     migrated_last_error());
            return -1;
        }
    }
    return 0;
}

static int cb_dirty_start(void *opaque)
{
    struct migrator *m = opaque;
    return callback_result(m, "dirty_start", vm_set_dirty_logging(m->vm, true));
}

static int cb_dirty_harvest(void *opaque, uint32_t region, uint64_t *bitmap, size_t words)
{
    struct migrator *m = opaque;
    return callback_result(m, "dirty_harvest", vm_get_dirty_log(m->vm, region, bitmap, words));
}

static int cb_dirty_stop(void *opaque)
{
    struct migrator *m = opaque;
    return callback_result(m, "dirty_stop", vm_set_dirty_logging(m->vm, false));
}

static int cb_prepare_memory(void *opaque, struct migrated_region *regions, uint32_t count)
{
    struct migrator *m = opaque;
    if (regions == NULL || count == 0 || count > VM_MAX_REGIONS) {
        cvmm_log("prepare_memory: a layout of %u regions; this VMM holds 1 or 2 (RAM below 3 GiB, the rest from 4 GiB)",
                 count);
        return -1;
    }
    uint64_t gpas[VM_MAX_REGIONS], sizes[VM_MAX_REGIONS], total = 0;
    for (uint32_t i = 0; i < count; i++) {
        gpas[i] = regions[i].guest_phys_addr;
        sizes[i] = regions[i].size;
        total += regions[i].size;
    }
    if (vm_check_layout(m->vm, gpas, sizes, count) < 0 || vm_create_memory(m->vm, total) < 0) {
        cvmm_log("prepare_memory: %s", m->vm->error);
        return -1;
    }
    for (uint32_t i = 0; i < count; i++) {
        const struct vm_region *made = &m->vm->regions[i];
        regions[i].slot = made->slot;
        regions[i].host_addr = made->host_addr;
        regions[i].flags = MIGRATED_REGION_FD;
        regions[i].fd = m->vm->mem_fd;
        regions[i].fd_offset = made->fd_offset;
        regions[i].reserved = 0;
    }
    if (cvmm_verbose)
        cvmm_log("prepared %llu MiB of guest memory in %u region(s)", (unsigned long long)(total >> 20), count);
    return 0;
}

static int cb_restore_devices(void *opaque, const struct migrated_device_blob *blobs, size_t count)
{
    struct migrator *m = opaque;
    bool have_machine = m->dirty != DIRTY_CALLBACK; /* in the KVM modes the library restored it already */
    for (size_t i = 0; i < count; i++) {
        /* The machine state is this VMM's to restore in callback mode. Its serial port keeps no state; other
         * blobs are not its business, the daemon's configuration among them. */
        if (blobs[i].component == MIGRATED_COMPONENT_KVM_VM && m->dirty == DIRTY_CALLBACK) {
            if (have_machine) {
                cvmm_log("restore_devices: two machine states");
                return -1;
            }
            if (blobs[i].instance != 0 || blobs[i].version != KVMSTATE_VERSION) {
                cvmm_log("restore_devices: machine state instance %u version %u (this VMM reads instance 0, "
                         "version %u)",
                         blobs[i].instance, blobs[i].version, KVMSTATE_VERSION);
                return -1;
            }
            if (kvmstate_restore(m->vm, blobs[i].data, blobs[i].size) < 0) {
                cvmm_log("restore_devices: %s", m->vm->error);
                return -1;
            }
            have_machine = true;
        } else if (blobs[i].component == MIGRATED_COMPONENT_DAEMON_CONFIG)
            cvmm_log("ignoring the migrated daemon's VM configuration (%zu bytes)", blobs[i].size);
        else
            cvmm_log("ignoring device state component 0x%08x instance %u version %u (%zu bytes)", blobs[i].component,
                     blobs[i].instance, blobs[i].version, blobs[i].size);
    }
    if (!have_machine) {
        cvmm_log("restore_devices: the guest came without its machine state (component 0x%08x)",
                 MIGRATED_COMPONENT_KVM_VM);
        return -1;
    }
    return 0;
}

static int cb_start(void *opaque)
{
    struct migrator *m = opaque;
    return callback_result(m, "start", vm_start(m->vm));
}

static void cb_discard(void *opaque)
{
    struct migrator *m = opaque;
    vm_destroy_memory(m->vm);
}

static int ring_full(void *opaque, uint32_t vcpu)
{
    struct migrator *m = opaque;
    if (m->handle == NULL)
        return -1;
    int status = migrated_vm_dirty_ring_full(m->handle, vcpu);
    if (status != MIGRATED_OK) {
        cvmm_log("migrated_vm_dirty_ring_full: %s: %s", migrated_error_name(status), migrated_last_error());
        return -1;
    }
    return 0;
}

static const char *phase_name(uint32_t phase)
{
    switch (phase) {
    case MIGRATED_PHASE_SETUP: return "setup";
    case MIGRATED_PHASE_PRECOPY: return "precopy";
    case MIGRATED_PHASE_SWITCHOVER: return "switchover";
    case MIGRATED_PHASE_COMPLETED: return "completed";
    case MIGRATED_PHASE_FAILED: return "failed";
    case MIGRATED_PHASE_CANCELLED: return "cancelled";
    default: return "unknown";
    }
}

static void on_progress(void *opaque, const struct migrated_progress *p)
{
    struct migrator *m = opaque;
    double now = monotonic_seconds();
    if (p->phase == m->last_phase && now - m->last_progress < 0.2)
        return;
    m->last_phase = p->phase;
    m->last_progress = now;
    cvmm_log("progress %s pass=%u pages=%llu/%llu wire=%llu bandwidth=%.0fMB/s dirty=%.0fMB/s expected_downtime=%.3fs "
             "throttle=%.2f elapsed=%.3fs",
             phase_name(p->phase), p->pass, (unsigned long long)p->pages_done, (unsigned long long)p->pages_total,
             (unsigned long long)p->bytes_on_wire, p->bandwidth / 1e6, p->dirty_rate / 1e6, p->expected_downtime,
             p->throttle, p->elapsed);
}

/* ---------------------------------------------------------------------------------------------------------------
 * The handle
 * ------------------------------------------------------------------------------------------------------------ */

struct migrator *migrator_new(struct vm *vm, enum dirty_choice dirty, uint32_t ring_bytes)
{
    struct migrator *m = calloc(1, sizeof *m);
    if (m == NULL) {
        cvmm_log("out of memory");
        return NULL;
    }
    m->vm = vm;
    m->dirty = dirty;
    m->ring_bytes = ring_bytes ? ring_bytes : MIGRATE_DEFAULT_RING_BYTES;
    m->last_phase = UINT32_MAX;
    if (dirty == DIRTY_RING) {
        int status = migrated_kvm_enable_dirty_ring(vm->vm_fd, m->ring_bytes);
        if (status != MIGRATED_OK) {
            cvmm_log("migrated_kvm_enable_dirty_ring(%u bytes): %s: %s", m->ring_bytes, migrated_error_name(status),
                     migrated_last_error());
            free(m);
            return NULL;
        }
    }
    return m;
}

int migrator_attach(struct migrator *m)
{
    struct vm *vm = m->vm;
    struct migrated_region regions[VM_MAX_REGIONS];
    memset(regions, 0, sizeof regions);
    for (uint32_t i = 0; i < vm->region_count; i++) {
        regions[i].slot = vm->regions[i].slot;
        regions[i].flags = MIGRATED_REGION_FD;
        regions[i].guest_phys_addr = vm->regions[i].guest_phys_addr;
        regions[i].size = vm->regions[i].size;
        regions[i].host_addr = vm->regions[i].host_addr;
        regions[i].fd = vm->mem_fd;
        regions[i].fd_offset = vm->regions[i].fd_offset;
    }

    struct migrated_vm_config config;
    memset(&config, 0, sizeof config);
    config.abi_version = MIGRATED_ABI_VERSION;
    switch (m->dirty) {
    case DIRTY_BITMAP: config.dirty_mode = MIGRATED_DIRTY_KVM_BITMAP; break;
    case DIRTY_RING: config.dirty_mode = MIGRATED_DIRTY_KVM_RING; break;
    case DIRTY_CALLBACK: config.dirty_mode = MIGRATED_DIRTY_CALLBACK; break;
    }
    if (m->dirty == DIRTY_CALLBACK) {
        config.kvm_vm_fd = -1;
        config.vcpu_count = 0;
        config.kvm_vcpu_fds = NULL;
    } else {
        m->vcpu_fds[0] = vm->vcpu_fd;
        config.kvm_vm_fd = vm->vm_fd;
        config.vcpu_count = 1;
        config.kvm_vcpu_fds = m->vcpu_fds;
        config.dirty_ring_bytes = m->dirty == DIRTY_RING ? m->ring_bytes : 0;
    }
    config.region_count = vm->region_count;
    config.regions = vm->region_count ? regions : NULL;
    config.callbacks = (struct migrated_vm_callbacks){
        .opaque = m,
        .pause = cb_pause,
        .resume = cb_resume,
        .set_throttle = cb_set_throttle,
        .save_devices = cb_save_devices,
        .dirty_start = cb_dirty_start,
        .dirty_harvest = cb_dirty_harvest,
        .dirty_stop = cb_dirty_stop,
        .prepare_memory = cb_prepare_memory,
        .restore_devices = cb_restore_devices,
        .start = cb_start,
        .discard = cb_discard,
    };
    int status = migrated_vm_create(&config, &m->handle);
    if (status != MIGRATED_OK) {
        cvmm_log("migrated_vm_create: %s: %s", migrated_error_name(status), migrated_last_error());
        m->handle = NULL;
        return -1;
    }
    if (m->dirty == DIRTY_RING) {
        vm->ring_full = ring_full;
        vm->ring_full_opaque = m;
    }
    return 0;
}

void migrator_free(struct migrator *m)
{
    if (m == NULL)
        return;
    if (m->vm != NULL) {
        m->vm->ring_full = NULL;
        m->vm->ring_full_opaque = NULL;
    }
    migrated_vm_free(m->handle);
    free(m);
}

/* ---------------------------------------------------------------------------------------------------------------
 * Parsing the words of a command
 * ------------------------------------------------------------------------------------------------------------ */

static bool parse_u64(const char *text, uint64_t *out)
{
    if (text == NULL || *text < '0' || *text > '9')
        return false;
    errno = 0;
    char *end = NULL;
    unsigned long long value = strtoull(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0')
        return false;
    *out = value;
    return true;
}


struct tls_words {
    char *copy;
    const char *peers[MAX_PEERS];
    struct migrated_tls tls;
};

/* "CA,CERT,KEY,PEER[,PEER...]" */
static bool parse_tls(const char *text, struct tls_words *out, char *why, size_t why_size)
{
    memset(out, 0, sizeof *out);
    out->copy = strdup(text);
    if (out->copy == NULL) {
        snprintf(why, why_size, "out of memory");
        return false;
    }
    char *fields[3 + MAX_PEERS];
    size_t count = 0;
    char *cursor = out->copy;
    for (;;) {
        char *comma = strchr(cursor, ',');
        if (count == sizeof fields / sizeof fields[0]) {
            snprintf(why, why_size, "tls= takes CA,CERT,KEY and at most %d peer names", MAX_PEERS);
            return false;
        }
        fields[count++] = cursor;
        if (comma == NULL)
            break;
        *comma = '\0';
        cursor = comma + 1;
    }
    if (count < 4) {
        snprintf(why, why_size, "tls= takes CA,CERT,KEY,PEER[,PEER...] (%zu fields given)", count);
        return false;
    }
    for (size_t i = 0; i < count; i++) {
        if (fields[i][0] == '\0') {
            snprintf(why, why_size, "tls= has an empty field (number %zu)", i + 1);
            return false;
        }
    }
    for (size_t i = 3; i < count; i++)
        out->peers[i - 3] = fields[i];
    out->tls.ca_file = fields[0];
    out->tls.certificate_file = fields[1];
    out->tls.key_file = fields[2];
    out->tls.allowed_peers = out->peers;
    out->tls.allowed_peer_count = (uint32_t)(count - 3);
    return true;
}

/* "N[,N...]": descriptors this process has open. */
static bool parse_fds(const char *text, int *fds, uint32_t *count, char *why, size_t why_size)
{
    *count = 0;
    const char *cursor = text;
    while (*cursor) {
        char number[16];
        size_t length = strcspn(cursor, ",");
        if (length == 0 || length >= sizeof number) {
            snprintf(why, why_size, "'%s' is not a list of file descriptors", text);
            return false;
        }
        memcpy(number, cursor, length);
        number[length] = '\0';
        uint64_t value;
        if (!parse_u64(number, &value) || value > 1000000) {
            snprintf(why, why_size, "'%s' is not a file descriptor", number);
            return false;
        }
        if (*count == MAX_FDS) {
            snprintf(why, why_size, "at most %d file descriptors", MAX_FDS);
            return false;
        }
        if (fcntl((int)value, F_GETFD) < 0) {
            snprintf(why, why_size, "file descriptor %d is not open", (int)value);
            return false;
        }
        fds[(*count)++] = (int)value;
        cursor += length;
        if (*cursor == ',') {
            cursor++;
            if (*cursor == '\0') {
                snprintf(why, why_size, "'%s' ends with a comma", text);
                return false;
            }
        }
    }
    if (*count == 0) {
        snprintf(why, why_size, "no file descriptor given");
        return false;
    }
    return true;
}

/* Reads the daemon configuration file whose contents go out as MIGRATED_COMPONENT_DAEMON_CONFIG. */
static void *read_config(const char *path, size_t *size, char *why, size_t why_size)
{
    FILE *file = fopen(path, "rb");
    if (file == NULL) {
        snprintf(why, why_size, "cannot open config file %s: %s", path, strerror(errno));
        return NULL;
    }
    size_t capacity = 4096, used = 0;
    char *bytes = malloc(capacity);
    while (bytes != NULL) {
        size_t got = fread(bytes + used, 1, capacity - used, file);
        used += got;
        if (got == 0)
            break;
        if (used > MAX_CONFIG_BLOB)
            break;
        if (used == capacity) {
            char *grown = realloc(bytes, capacity * 2);
            if (grown == NULL) {
                free(bytes);
                bytes = NULL;
                break;
            }
            bytes = grown;
            capacity *= 2;
        }
    }
    bool failed = ferror(file);
    fclose(file);
    if (bytes == NULL) {
        snprintf(why, why_size, "out of memory reading %s", path);
        return NULL;
    }
    if (failed || used > MAX_CONFIG_BLOB || used == 0) {
        snprintf(why, why_size, "config file %s: %s", path,
                 failed ? "read error" : used == 0 ? "empty" : "larger than 16 MiB - 64 bytes");
        free(bytes);
        return NULL;
    }
    *size = used;
    return bytes;
}

/* ---------------------------------------------------------------------------------------------------------------
 * migrate / migrate-fd
 * ------------------------------------------------------------------------------------------------------------ */

struct canceller {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool done;
    uint64_t delay_ms;
    migrated_migration *migration;
    pthread_t thread;
};

static void *canceller_main(void *argument)
{
    struct canceller *c = argument;
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += (time_t)(c->delay_ms / 1000);
    deadline.tv_nsec += (long)(c->delay_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&c->lock);
    while (!c->done) {
        if (pthread_cond_timedwait(&c->cond, &c->lock, &deadline) == ETIMEDOUT)
            break;
    }
    bool cancel = !c->done;
    pthread_mutex_unlock(&c->lock);
    if (cancel) {
        cvmm_log("cancelling the migration after %llu ms", (unsigned long long)c->delay_ms);
        int status = migrated_migration_cancel(c->migration);
        if (status != MIGRATED_OK)
            cvmm_log("migrated_migration_cancel: %s: %s", migrated_error_name(status), migrated_last_error());
    }
    return NULL;
}

int migrator_migrate(struct migrator *m, int argc, char **argv, bool over_fds)
{
    const char *usage = over_fds ? "migrate-fd FD[,FD...] [options]" : "migrate ADDRESS [options]";
    if (argc < 1) {
        cvmm_reply("error usage: %s", usage);
        return 0;
    }
    if (m->handle == NULL) {
        cvmm_reply("error state: no guest to migrate");
        return 0;
    }
    struct migrated_migration_options options;
    memset(&options, 0, sizeof options);
    options.abi_version = MIGRATED_ABI_VERSION;
    int fds[MAX_FDS];
    uint32_t fd_count = 0;
    char why[512];
    if (over_fds) {
        if (!parse_fds(argv[0], fds, &fd_count, why, sizeof why)) {
            cvmm_reply("error usage: %s", why);
            return 0;
        }
        options.fds = fds;
        options.fd_count = fd_count;
    } else {
        options.address = argv[0];
    }

    struct tls_words tls;
    memset(&tls, 0, sizeof tls);
    bool have_tls = false, progress = false, have_cancel = false, ok = true;
    why[0] = '\0';
    uint64_t cancel_after_ms = 0;
    const char *config_path = NULL;
    for (int i = 1; i < argc && ok; i++) {
        const char *word = argv[i];
        const char *value = strchr(word, '=');
        size_t key_length = value ? (size_t)(value - word) : strlen(word);
        if (value)
            value++;
#define KEY(name) (key_length == strlen(name) && strncmp(word, name, key_length) == 0)
        uint64_t number = 0;
        if (KEY("no_auto_converge") && !value) {
            options.flags |= MIGRATED_MIGRATE_NO_AUTO_CONVERGE;
        } else if (KEY("progress") && !value) {
            progress = true;
        } else if (!value) {
            snprintf(why, sizeof why, "unknown option '%s'", word);
            ok = false;
        } else if (KEY("channels")) {
            ok = parse_u64(value, &number) && number >= 1 && number <= MAX_FDS;
            options.channels = (uint32_t)number;
        } else if (KEY("compression")) {
            if (strcmp(value, "none") == 0) options.compression = MIGRATED_COMPRESSION_NONE;
            else if (strcmp(value, "lz4") == 0) options.compression = MIGRATED_COMPRESSION_LZ4;
            else if (strcmp(value, "zstd") == 0) options.compression = MIGRATED_COMPRESSION_ZSTD;
            else if (strcmp(value, "adaptive") == 0) options.compression = MIGRATED_COMPRESSION_ADAPTIVE;
            else if (strcmp(value, "default") == 0) options.compression = MIGRATED_COMPRESSION_DEFAULT;
            else ok = false;
        } else if (KEY("zstd_level")) {
            char *end = NULL;
            long level = strtol(value, &end, 10);
            ok = end != value && *end == '\0' && level >= -7 && level <= 22 && level != 0;
            options.zstd_level = (int32_t)level;
        } else if (KEY("tls")) {
            if (have_tls)
                free(tls.copy);
            ok = parse_tls(value, &tls, why, sizeof why);
            have_tls = ok;
            if (!ok) {
                free(tls.copy);
                tls.copy = NULL;
                cvmm_reply("error usage: %s", why);
                return 0;
            }
        } else if (KEY("downtime_ms")) {
            ok = parse_u64(value, &number) && number >= 1 && number <= UINT32_MAX;
            options.downtime_limit_ms = (uint32_t)number;
        } else if (KEY("max_passes")) {
            ok = parse_u64(value, &number) && number >= 1 && number <= UINT32_MAX;
            options.max_passes = (uint32_t)number;
        } else if (KEY("time_limit_s")) {
            ok = parse_u64(value, &number) && number >= 1 && number <= 86400;
            options.time_limit_seconds = (double)number;
        } else if (KEY("bandwidth")) {
            ok = cvmm_parse_size(value, &number) == 0 && number > 0;
            options.bandwidth_limit = (double)number;
        } else if (KEY("config")) {
            config_path = value;
            ok = value[0] != '\0';
        } else if (KEY("cancel_after_ms")) {
            ok = parse_u64(value, &cancel_after_ms) && cancel_after_ms <= 86400000ull;
            have_cancel = ok;
        } else {
            snprintf(why, sizeof why, "unknown option '%s'", word);
            ok = false;
            break;
        }
#undef KEY
        if (!ok && why[0] == '\0')
            snprintf(why, sizeof why, "bad value in '%s'", word);
        if (!ok)
            break;
        why[0] = '\0';
    }
    if (!ok) {
        free(tls.copy);
        cvmm_reply("error usage: %s", why);
        return 0;
    }
    if (have_tls)
        options.tls = &tls.tls;
    if (progress || cvmm_verbose) {
        options.progress = on_progress;
        options.progress_opaque = m;
        m->last_phase = UINT32_MAX;
    }
    void *config = NULL;
    size_t config_size = 0;
    if (config_path != NULL) {
        config = read_config(config_path, &config_size, why, sizeof why);
        if (config == NULL) {
            free(tls.copy);
            cvmm_reply("error usage: %s", why);
            return 0;
        }
    }
    m->config_blob = config;
    m->config_size = config_size;

    migrated_migration *migration = NULL;
    int status = migrated_migration_start_outgoing(m->handle, &options, &migration);
    free(tls.copy); /* the library copied what it keeps */
    tls.copy = NULL;
    if (status != MIGRATED_OK) {
        reply_library_failure(status);
        m->config_blob = NULL;
        free(config);
        return 0;
    }

    struct canceller canceller;
    bool canceller_running = false;
    if (have_cancel) {
        memset(&canceller, 0, sizeof canceller);
        pthread_mutex_init(&canceller.lock, NULL);
        pthread_condattr_t attr;
        pthread_condattr_init(&attr);
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
        pthread_cond_init(&canceller.cond, &attr);
        pthread_condattr_destroy(&attr);
        canceller.delay_ms = cancel_after_ms;
        canceller.migration = migration;
        int error = pthread_create(&canceller.thread, NULL, canceller_main, &canceller);
        if (error != 0) {
            cvmm_log("pthread_create (canceller): %s; cancelling at once", strerror(error));
            (void)migrated_migration_cancel(migration);
        } else {
            canceller_running = true;
        }
    }

    struct migrated_report report;
    memset(&report, 0, sizeof report);
    status = migrated_migration_wait(migration, &report);
    const char *last = migrated_last_error();
    char message[sizeof report.message];
    snprintf(message, sizeof message, "%s", report.message[0] ? report.message : last);

    if (have_cancel) {
        pthread_mutex_lock(&canceller.lock);
        canceller.done = true;
        pthread_cond_broadcast(&canceller.cond);
        pthread_mutex_unlock(&canceller.lock);
        if (canceller_running)
            pthread_join(canceller.thread, NULL);
        pthread_cond_destroy(&canceller.cond);
        pthread_mutex_destroy(&canceller.lock);
    }
    migrated_migration_free(migration);
    m->config_blob = NULL;
    free(config);

    /* What the source's dirty tracking cost, on stderr whatever the outcome (bench/cabi reads it). */
    cvmm_log("migration report: passes=%u harvests=%u harvest_seconds=%.6f wire_bytes=%llu", report.passes, report.harvests,
             report.harvest_seconds, (unsigned long long)report.wire_bytes);
    if (status == MIGRATED_ERR_IN_DOUBT) {
        /* The destination may run the guest: it stays paused here until the operator, having asked the destination,
         * says `resume` (it does not run there) or `quit` (it does): the library's pause becomes the operator's. */
        vm_adopt_library_pause(m->vm);
        cvmm_log("migration in doubt: the guest stays paused; resume it only if it does not run at the destination");
        reply_failure(status, message);
        return 0;
    }
    if (status != MIGRATED_OK) {
        /* The library resumes the guest unthrottled on any failure before the commit. Make sure, so that a failed
         * migration can never leave the guest stuck. */
        if (vm_lift_library_holds(m->vm))
            cvmm_log("warning: the guest was left paused or throttled after a failed migration; resumed it");
        reply_failure(status, message);
        return 0;
    }
    cvmm_reply("ok migrated total=%.6f downtime=%.6f wire_bytes=%llu passes=%u pages=%llu channels=%u",
               report.total_seconds, report.downtime_seconds, (unsigned long long)report.wire_bytes, report.passes,
               (unsigned long long)report.pages, report.channels);
    return 1;
}

/* ---------------------------------------------------------------------------------------------------------------
 * save
 * ------------------------------------------------------------------------------------------------------------ */

void migrator_save(struct migrator *m, int argc, char **argv)
{
    if (argc < 1) {
        cvmm_reply("error usage: save PATH [diff] [compressed] [paused] [overwrite] [leave_paused] [downtime_ms=N] "
                   "[config=FILE] [progress]");
        return;
    }
    if (m->handle == NULL) {
        cvmm_reply("error state: no guest to save");
        return;
    }
    struct migrated_snapshot_options options;
    memset(&options, 0, sizeof options);
    options.abi_version = MIGRATED_ABI_VERSION;
    const char *path = argv[0];
    const char *config_path = NULL;
    bool progress = false;
    for (int i = 1; i < argc; i++) {
        const char *word = argv[i];
        uint64_t number;
        if (strcmp(word, "diff") == 0) options.flags |= MIGRATED_SNAPSHOT_DIFF;
        else if (strcmp(word, "compressed") == 0) options.flags |= MIGRATED_SNAPSHOT_COMPRESSED;
        else if (strcmp(word, "paused") == 0) options.flags |= MIGRATED_SNAPSHOT_PAUSED;
        else if (strcmp(word, "overwrite") == 0) options.flags |= MIGRATED_SNAPSHOT_OVERWRITE;
        else if (strcmp(word, "leave_paused") == 0) options.flags |= MIGRATED_SNAPSHOT_LEAVE_PAUSED;
        else if (strcmp(word, "progress") == 0) progress = true;
        else if (strncmp(word, "downtime_ms=", 12) == 0 && parse_u64(word + 12, &number) && number >= 1 &&
                 number <= UINT32_MAX)
            options.downtime_limit_ms = (uint32_t)number;
        else if (strncmp(word, "config=", 7) == 0 && word[7] != '\0')
            config_path = word + 7;
        else {
            cvmm_reply("error usage: unknown or malformed save option '%s'", word);
            return;
        }
    }
    if (progress || cvmm_verbose) {
        options.progress = on_progress;
        options.progress_opaque = m;
        m->last_phase = UINT32_MAX;
    }
    char why[512];
    void *config = NULL;
    size_t config_size = 0;
    if (config_path != NULL) {
        config = read_config(config_path, &config_size, why, sizeof why);
        if (config == NULL) {
            cvmm_reply("error usage: %s", why);
            return;
        }
    }
    m->config_blob = config;
    m->config_size = config_size;
    struct migrated_report report;
    memset(&report, 0, sizeof report);
    int status = migrated_snapshot_save(m->handle, path, &options, &report);
    const char *last = migrated_last_error();
    m->config_blob = NULL;
    free(config);
    if (status != MIGRATED_OK) {
        reply_failure(status, report.message[0] ? report.message : last);
        return;
    }
    /* Left paused by the library's pause: from now on it is the operator's pause, which `resume` lifts. */
    if (options.flags & MIGRATED_SNAPSHOT_LEAVE_PAUSED)
        vm_adopt_library_pause(m->vm);
    cvmm_reply("ok saved path=%s total=%.6f downtime=%.6f pages=%llu passes=%u digest=%s", path, report.total_seconds,
               report.downtime_seconds, (unsigned long long)report.pages, report.passes,
               report.memory_digest[0] ? report.memory_digest : "-");
}

/* ---------------------------------------------------------------------------------------------------------------
 * receive / restore
 * ------------------------------------------------------------------------------------------------------------ */

int migrator_receive(struct migrator *m, const char *listen_address, const char *fds_text, const char *tls_text)
{
    struct migrated_migration_options options;
    memset(&options, 0, sizeof options);
    options.abi_version = MIGRATED_ABI_VERSION;
    int fds[MAX_FDS];
    uint32_t fd_count = 0;
    char why[512];
    if (fds_text != NULL) {
        if (!parse_fds(fds_text, fds, &fd_count, why, sizeof why)) {
            cvmm_reply("error usage: %s", why);
            return -1;
        }
        options.fds = fds;
        options.fd_count = fd_count;
    } else {
        options.address = listen_address;
    }
    struct tls_words tls;
    memset(&tls, 0, sizeof tls);
    if (tls_text != NULL) {
        if (!parse_tls(tls_text, &tls, why, sizeof why)) {
            free(tls.copy);
            cvmm_reply("error usage: %s", why);
            return -1;
        }
        options.tls = &tls.tls;
    }
    migrated_migration *migration = NULL;
    int status = migrated_migration_start_incoming(m->handle, &options, &migration);
    free(tls.copy);
    if (status != MIGRATED_OK) {
        reply_library_failure(status);
        return -1;
    }
    if (fds_text == NULL) {
        char address[512];
        status = migrated_migration_address(migration, address, sizeof address);
        if (status != MIGRATED_OK) {
            reply_library_failure(status);
            migrated_migration_free(migration);
            return -1;
        }
        cvmm_reply("ok listening %s", address);
    } else {
        cvmm_reply("ok listening fd:%s", fds_text);
    }
    struct migrated_report report;
    memset(&report, 0, sizeof report);
    status = migrated_migration_wait(migration, &report);
    char message[sizeof report.message];
    snprintf(message, sizeof message, "%s", report.message[0] ? report.message : migrated_last_error());
    migrated_migration_free(migration);
    if (status != MIGRATED_OK) {
        reply_failure(status, message);
        return -1;
    }
    cvmm_reply("ok received pages=%llu digest=%s total=%.6f channels=%u", (unsigned long long)report.pages,
               report.memory_digest[0] ? report.memory_digest : "-", report.total_seconds, report.channels);
    return 0;
}

int migrator_restore(struct migrator *m, const char *path)
{
    struct migrated_report report;
    memset(&report, 0, sizeof report);
    int status = migrated_snapshot_restore(m->handle, path, &report);
    if (status != MIGRATED_OK) {
        reply_failure(status, report.message[0] ? report.message : migrated_last_error());
        return -1;
    }
    cvmm_reply("ok restored path=%s pages=%llu digest=%s total=%.6f", path, (unsigned long long)report.pages,
               report.memory_digest[0] ? report.memory_digest : "-", report.total_seconds);
    return 0;
}
