/*
 * main.c: c-vmm's command line, its stdin command loop and its exit status.
 *
 *   c-vmm run --kernel ELF [--memory SIZE] [--cmdline TEXT] [common options]
 *   c-vmm receive (--listen ADDRESS | --fd N[,N...]) [--tls CA,CERT,KEY,PEER[,PEER...]] [common options]
 *   c-vmm restore PATH [common options]
 *   common options: [--console FILE] [--dirty bitmap|ring|callback] [--dirty-ring-bytes N] [--verbose]
 *
 * stdout carries only replies, one line each, starting with "ok" or "error"; the guest's console goes to
 * --console FILE or to stderr, and so do this program's own messages.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cvmm.h"
#include "migrate.h"
#include "pvh.h"
#include "vm.h"

int cvmm_verbose;
static pthread_mutex_t output_lock = PTHREAD_MUTEX_INITIALIZER;

/* Formats one line and makes sure it stays one line. */
static void format_line(char *buffer, size_t size, const char *format, va_list args)
{
    vsnprintf(buffer, size, format, args);
    for (char *c = buffer; *c; c++) {
        if (*c == '\n' || *c == '\r')
            *c = ' ';
    }
}

void cvmm_reply(const char *format, ...)
{
    char line[4096];
    va_list args;
    va_start(args, format);
    format_line(line, sizeof line, format, args);
    va_end(args);
    pthread_mutex_lock(&output_lock);
    fputs(line, stdout);
    fputc('\n', stdout);
    fflush(stdout);
    pthread_mutex_unlock(&output_lock);
}

void cvmm_log(const char *format, ...)
{
    char line[4096];
    va_list args;
    va_start(args, format);
    format_line(line, sizeof line, format, args);
    va_end(args);
    pthread_mutex_lock(&output_lock);
    fprintf(stderr, "c-vmm: %s\n", line);
    fflush(stderr);
    pthread_mutex_unlock(&output_lock);
}

static void usage(FILE *to)
{
    fputs("usage:\n"
          "  c-vmm run --kernel ELF [--memory SIZE] [--cmdline TEXT] [options]\n"
          "  c-vmm receive (--listen ADDRESS | --fd N[,N...]) [--tls CA,CERT,KEY,PEER[,PEER...]] [options]\n"
          "  c-vmm restore PATH [options]\n"
          "options:\n"
          "  --console FILE          append the guest's console to FILE (default: stderr)\n"
          "  --dirty MODE            bitmap (default), ring or callback: how libmigrated finds dirty pages\n"
          "  --dirty-ring-bytes N    the KVM dirty ring's size per vCPU with --dirty ring (default 1M)\n"
          "  --verbose               log migration progress and details to stderr\n"
          "SIZE and N take K, M, G suffixes (powers of 1024). --memory defaults to 256M.\n"
          "stdin commands (one reply line each on stdout, \"ok ...\" or \"error NAME: ...\"):\n"
          "  migrate ADDRESS [channels=N] [compression=none|lz4|zstd|adaptive] [zstd_level=N]\n"
          "          [tls=CA,CERT,KEY,PEER[,PEER...]] [downtime_ms=N] [max_passes=N] [time_limit_s=N]\n"
          "          [bandwidth=BYTES] [no_auto_converge] [config=JSON-FILE] [cancel_after_ms=N] [progress]\n"
          "  migrate-fd FD[,FD...] [same options]\n"
          "  save PATH [diff] [compressed] [paused] [overwrite] [leave_paused] [downtime_ms=N] [config=FILE]\n"
          "  pause | resume | status | throttle FRACTION | quit | help\n",
          to);
}

int cvmm_parse_size(const char *text, uint64_t *out)
{
    if (text == NULL || *text < '0' || *text > '9')
        return -1;
    errno = 0;
    char *end = NULL;
    unsigned long long value = strtoull(text, &end, 10);
    if (errno != 0 || end == text)
        return -1;
    unsigned shift = 0;
    switch (*end) {
    case '\0': break;
    case 'k': case 'K': shift = 10; break;
    case 'm': case 'M': shift = 20; break;
    case 'g': case 'G': shift = 30; break;
    case 't': case 'T': shift = 40; break;
    default: return -1;
    }
    if (*end != '\0' && end[1] != '\0' && !((end[1] == 'i' || end[1] == 'I') && end[2] == '\0'))
        return -1;
    if (shift && value > (UINT64_MAX >> shift))
        return -1;
    *out = (uint64_t)value << shift;
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * The command loop
 * ------------------------------------------------------------------------------------------------------------ */

#define MAX_WORDS 64
#define LINE_LIMIT 8192
#define KEEP_RUNNING (-1)

static int split_words(char *line, char **words)
{
    int count = 0;
    char *save = NULL;
    for (char *word = strtok_r(line, " \t", &save); word != NULL; word = strtok_r(NULL, " \t", &save)) {
        if (count == MAX_WORDS)
            return -1;
        words[count++] = word;
    }
    return count;
}

/* Runs one command; KEEP_RUNNING, or the status the process exits with. */
static int execute(struct vm *vm, struct migrator *m, char *line)
{
    char *words[MAX_WORDS];
    int count = split_words(line, words);
    if (count < 0) {
        cvmm_reply("error usage: more than %d words", MAX_WORDS);
        return KEEP_RUNNING;
    }
    if (count == 0 || words[0][0] == '#')
        return KEEP_RUNNING; /* blank lines and comments get no reply */
    const char *command = words[0];
    bool bare = count == 1;
    if (strcmp(command, "migrate") == 0 || strcmp(command, "migrate-fd") == 0) {
        if (migrator_migrate(m, count - 1, words + 1, strcmp(command, "migrate-fd") == 0) == 1)
            return CVMM_EXIT_OK; /* the guest runs elsewhere now */
    } else if (strcmp(command, "save") == 0) {
        migrator_save(m, count - 1, words + 1);
    } else if (strcmp(command, "pause") == 0 && bare) {
        if (vm_pause(vm, true) < 0)
            cvmm_reply("error vmm: %s", vm->error);
        else
            cvmm_reply("ok paused");
    } else if (strcmp(command, "resume") == 0 && bare) {
        vm_resume(vm, true);
        cvmm_reply("ok running");
    } else if (strcmp(command, "throttle") == 0 && count == 2) {
        /* a test aid: what the library's set_throttle callback does during auto-converge */
        char *end = NULL;
        double fraction = strtod(words[1], &end);
        if (end == words[1] || *end != '\0' || !(fraction >= 0 && fraction < 1))
            cvmm_reply("error usage: throttle FRACTION, 0 <= FRACTION < 1");
        else if (vm_set_throttle(vm, fraction) < 0)
            cvmm_reply("error vmm: %s", vm->error);
        else
            cvmm_reply("ok throttle=%.2f", fraction > 0.99 ? 0.99 : fraction);
    } else if (strcmp(command, "status") == 0 && bare) {
        cvmm_reply(vm_is_paused(vm) ? "ok paused" : "ok running");
    } else if (strcmp(command, "quit") == 0 && bare) {
        cvmm_reply("ok quit");
        return CVMM_EXIT_OK;
    } else if (strcmp(command, "help") == 0 && bare) {
        cvmm_reply("ok commands: migrate, migrate-fd, save, pause, resume, status, throttle, quit, help");
    } else if (strcmp(command, "pause") == 0 || strcmp(command, "resume") == 0 || strcmp(command, "status") == 0 ||
               strcmp(command, "quit") == 0 || strcmp(command, "help") == 0) {
        cvmm_reply("error usage: %s takes no arguments", command);
    } else {
        cvmm_reply("error usage: unknown command '%s' (try help)", command);
    }
    return KEEP_RUNNING;
}

/* The status for a guest that has stopped by itself. */
static int stopped_status(struct vm *vm, enum vm_stop stop)
{
    int code = 0;
    char failure[VM_ERROR_SIZE];
    vm_stopped(vm, &code, failure, sizeof failure);
    switch (stop) {
    case VM_STOP_GUEST_EXIT:
        cvmm_log("guest exited with code 0x%02x%s", code,
                 code == 0x10   ? " (pass)"
                 : code == 0x11 ? " (verification failure)"
                 : code == 0x12 ? " (CPU fault)"
                 : code == 0x13 ? " (bad command line or workload too large)"
                                : "");
        return code;
    case VM_STOP_FAILED:
        cvmm_log("the VM failed: %s", failure);
        return CVMM_EXIT_ERROR;
    default:
        return CVMM_EXIT_OK;
    }
}

/* Reads commands until one ends the program or the guest stops; returns the exit status. */
static int command_loop(struct vm *vm, struct migrator *m)
{
    static char buffer[LINE_LIMIT];
    size_t used = 0;
    bool stdin_open = true, discarding = false;
    for (;;) {
        enum vm_stop stop = vm_stopped(vm, NULL, NULL, 0);
        if (stop != VM_STOP_NONE)
            return stopped_status(vm, stop);
        struct pollfd polled[2] = {
            {.fd = vm->stop_event_fd, .events = POLLIN},
            {.fd = STDIN_FILENO, .events = POLLIN},
        };
        int result = poll(polled, stdin_open ? 2 : 1, -1);
        if (result < 0) {
            if (errno == EINTR)
                continue;
            cvmm_log("poll: %s", strerror(errno));
            return CVMM_EXIT_ERROR;
        }
        if (polled[0].revents & POLLIN) {
            uint64_t value;
            ssize_t ignored = read(vm->stop_event_fd, &value, sizeof value);
            (void)ignored;
            continue; /* the loop's top reads why */
        }
        if (!stdin_open || polled[1].revents == 0)
            continue;
        ssize_t got = read(STDIN_FILENO, buffer + used, sizeof buffer - 1 - used);
        if (got < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            cvmm_log("reading stdin: %s; no more commands", strerror(errno));
            stdin_open = false;
            continue;
        }
        if (got == 0) {
            if (used > 0 && !discarding) { /* a last command without its newline */
                buffer[used] = '\0';
                used = 0;
                int status = execute(vm, m, buffer);
                if (status != KEEP_RUNNING)
                    return status;
            }
            if (cvmm_verbose)
                cvmm_log("stdin closed; the guest runs until it exits");
            stdin_open = false;
            continue;
        }
        used += (size_t)got;
        size_t start = 0;
        for (size_t i = 0; i < used; i++) {
            if (buffer[i] != '\n')
                continue;
            buffer[i] = '\0';
            if (i > start && buffer[i - 1] == '\r')
                buffer[i - 1] = '\0';
            bool skip = discarding;
            discarding = false;
            if (!skip) {
                int status = execute(vm, m, buffer + start);
                if (status != KEEP_RUNNING)
                    return status;
                /* a command may have taken long: the guest may have ended meanwhile */
                stop = vm_stopped(vm, NULL, NULL, 0);
                if (stop != VM_STOP_NONE)
                    return stopped_status(vm, stop);
            }
            start = i + 1;
        }
        memmove(buffer, buffer + start, used - start);
        used -= start;
        if (used == sizeof buffer - 1) {
            if (!discarding)
                cvmm_reply("error usage: command longer than %d bytes", LINE_LIMIT - 2);
            discarding = true;
            used = 0;
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------------
 * Subcommands
 * ------------------------------------------------------------------------------------------------------------ */

enum mode { MODE_RUN, MODE_RECEIVE, MODE_RESTORE };

struct settings {
    enum mode mode;
    const char *kernel;
    uint64_t memory;
    const char *cmdline;
    const char *console;
    enum dirty_choice dirty;
    uint32_t ring_bytes;
    const char *listen;
    const char *fds;
    const char *tls;
    const char *snapshot;
};

enum option_id {
    OPT_KERNEL = 'k',
    OPT_MEMORY = 'm',
    OPT_CMDLINE = 'c',
    OPT_VERBOSE = 'v',
    OPT_HELP = 'h',
    OPT_CONSOLE = 256,
    OPT_DIRTY,
    OPT_RING_BYTES,
    OPT_LISTEN,
    OPT_FD,
    OPT_TLS,
};

static const struct option long_options[] = {
    {"kernel", required_argument, NULL, OPT_KERNEL},
    {"memory", required_argument, NULL, OPT_MEMORY},
    {"cmdline", required_argument, NULL, OPT_CMDLINE},
    {"console", required_argument, NULL, OPT_CONSOLE},
    {"dirty", required_argument, NULL, OPT_DIRTY},
    {"dirty-ring-bytes", required_argument, NULL, OPT_RING_BYTES},
    {"listen", required_argument, NULL, OPT_LISTEN},
    {"fd", required_argument, NULL, OPT_FD},
    {"tls", required_argument, NULL, OPT_TLS},
    {"verbose", no_argument, NULL, OPT_VERBOSE},
    {"help", no_argument, NULL, OPT_HELP},
    {NULL, 0, NULL, 0},
};

__attribute__((format(printf, 1, 2))) static int bad_usage(const char *format, ...)
{
    char line[1024];
    va_list args;
    va_start(args, format);
    vsnprintf(line, sizeof line, format, args);
    va_end(args);
    fprintf(stderr, "c-vmm: %s\n", line);
    usage(stderr);
    return CVMM_EXIT_USAGE;
}

/* Parses argv after the subcommand; CVMM_EXIT_OK, or the status to exit with. */
static int parse_settings(int argc, char **argv, struct settings *s)
{
    const char *mode_name = argv[0];
    int option;
    opterr = 0;
    optind = 1;
    while ((option = getopt_long(argc, argv, ":k:m:c:vh", long_options, NULL)) != -1) {
        bool for_run = s->mode == MODE_RUN, for_receive = s->mode == MODE_RECEIVE;
        uint64_t number;
        switch (option) {
        case OPT_KERNEL:
        case OPT_MEMORY:
        case OPT_CMDLINE:
            if (!for_run)
                return bad_usage("%s does not take --%s", mode_name,
                                 option == OPT_KERNEL ? "kernel" : option == OPT_MEMORY ? "memory" : "cmdline");
            if (option == OPT_KERNEL)
                s->kernel = optarg;
            else if (option == OPT_CMDLINE)
                s->cmdline = optarg;
            else if (cvmm_parse_size(optarg, &s->memory) < 0)
                return bad_usage("--memory %s is not a size (e.g. 512M or 4G)", optarg);
            break;
        case OPT_LISTEN:
        case OPT_FD:
        case OPT_TLS:
            if (!for_receive)
                return bad_usage("%s does not take --%s", mode_name,
                                 option == OPT_LISTEN ? "listen" : option == OPT_FD ? "fd" : "tls");
            if (option == OPT_LISTEN)
                s->listen = optarg;
            else if (option == OPT_FD)
                s->fds = optarg;
            else
                s->tls = optarg;
            break;
        case OPT_CONSOLE:
            s->console = optarg;
            break;
        case OPT_DIRTY:
            if (strcmp(optarg, "bitmap") == 0)
                s->dirty = DIRTY_BITMAP;
            else if (strcmp(optarg, "ring") == 0)
                s->dirty = DIRTY_RING;
            else if (strcmp(optarg, "callback") == 0)
                s->dirty = DIRTY_CALLBACK;
            else
                return bad_usage("--dirty is bitmap, ring or callback, not %s", optarg);
            break;
        case OPT_RING_BYTES:
            if (cvmm_parse_size(optarg, &number) < 0 || number < 4096 || number > (1u << 30) || (number & (number - 1)))
                return bad_usage("--dirty-ring-bytes %s is not a power of two between 4K and 1G", optarg);
            s->ring_bytes = (uint32_t)number;
            break;
        case OPT_VERBOSE:
            cvmm_verbose = 1;
            break;
        case OPT_HELP:
            usage(stdout);
            return -1;
        case ':':
            return bad_usage("%s needs a value", argv[optind - 1]);
        default:
            return bad_usage("unknown option %s", argv[optind - 1]);
        }
    }
    int rest = argc - optind;
    if (s->mode == MODE_RESTORE) {
        if (rest != 1)
            return bad_usage("restore takes one snapshot path");
        s->snapshot = argv[optind];
    } else if (rest != 0) {
        return bad_usage("unexpected argument %s", argv[optind]);
    }
    if (s->mode == MODE_RUN && s->kernel == NULL)
        return bad_usage("run needs --kernel ELF");
    if (s->mode == MODE_RECEIVE && (s->listen == NULL) == (s->fds == NULL))
        return bad_usage("receive needs one of --listen ADDRESS and --fd N[,N...]");
    if (s->ring_bytes && s->dirty != DIRTY_RING)
        return bad_usage("--dirty-ring-bytes goes with --dirty ring");
    return CVMM_EXIT_OK;
}

static int run_vmm(const struct settings *s)
{
    if (migrator_check_abi() < 0)
        return CVMM_EXIT_ERROR;
    int console_fd = STDERR_FILENO;
    bool console_owned = false;
    if (s->console != NULL) {
        console_fd = open(s->console, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (console_fd < 0) {
            cvmm_log("cannot open console file %s: %s", s->console, strerror(errno));
            return CVMM_EXIT_ERROR;
        }
        console_owned = true;
    }
    static struct vm vm; /* static: large, and the vCPU thread holds on to it */
    struct migrator *m = NULL;
    int status = CVMM_EXIT_ERROR;
    if (vm_open(&vm, console_fd, console_owned) < 0) {
        cvmm_log("%s", vm.error);
        goto out;
    }
    m = migrator_new(&vm, s->dirty, s->ring_bytes);
    if (m == NULL)
        goto out;
    if (vm_create_platform(&vm, s->mode == MODE_RUN) < 0) {
        cvmm_log("%s", vm.error);
        goto out;
    }
    if (s->mode == MODE_RUN) {
        if (vm_create_memory(&vm, s->memory) < 0 || pvh_boot(&vm, s->kernel, s->cmdline) < 0) {
            cvmm_log("%s", vm.error);
            goto out;
        }
    }
    if (migrator_attach(m) < 0)
        goto out;
    switch (s->mode) {
    case MODE_RUN:
        if (vm_start(&vm) < 0) {
            cvmm_log("%s", vm.error);
            goto out;
        }
        cvmm_reply("ok running");
        break;
    case MODE_RECEIVE:
        if (migrator_receive(m, s->listen, s->fds, s->tls) < 0)
            goto out;
        break;
    case MODE_RESTORE:
        if (migrator_restore(m, s->snapshot) < 0)
            goto out;
        break;
    }
    status = command_loop(&vm, m);
out:
    vm_stop(&vm);
    migrator_free(m);
    vm_close(&vm);
    return status;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return bad_usage("no command given");
    struct settings settings = {.memory = 256ull << 20, .cmdline = "", .dirty = DIRTY_BITMAP};
    const char *command = argv[1];
    if (strcmp(command, "run") == 0)
        settings.mode = MODE_RUN;
    else if (strcmp(command, "receive") == 0)
        settings.mode = MODE_RECEIVE;
    else if (strcmp(command, "restore") == 0)
        settings.mode = MODE_RESTORE;
    else if (strcmp(command, "help") == 0 || strcmp(command, "--help") == 0 || strcmp(command, "-h") == 0) {
        usage(stdout);
        return CVMM_EXIT_OK;
    } else
        return bad_usage("unknown command %s", command);
    int parsed = parse_settings(argc - 1, argv + 1, &settings);
    if (parsed < 0)
        return CVMM_EXIT_OK; /* --help */
    if (parsed != CVMM_EXIT_OK)
        return parsed;

    /* Replies go to a pipe a driver reads: a driver that went away must not kill the guest with SIGPIPE. */
    signal(SIGPIPE, SIG_IGN);
    if (vm_install_kick_handler() < 0) {
        cvmm_log("sigaction: %s", strerror(errno));
        return CVMM_EXIT_ERROR;
    }
    return run_vmm(&settings);
}
