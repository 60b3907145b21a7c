/* What it costs on this host to make 1 GiB of guest-style memory present and fill it with data, without any
 * network: the part of the destination's work that depends only on how guest RAM is held (issue 16 item 1).
 * Each mode prints the CPU time (user + system) of two phases, per GiB:
 *   populate  making the memory present ahead of the data (0 for modes that do not)
 *   fill      writing 1 GiB of data into it, in 1 MiB steps (memcpy through the mapping, or pwritev)
 * and, with --again, a third: the same fill once more into memory that is now present (the copy alone).
 * With --prewarm it first touches and frees 1.25 GiB of anonymous memory, so that the pages the mode then gets
 * from the kernel's free lists were used a moment ago. This host's kernel reports free 8 MiB blocks to the
 * outer hypervisor (page_reporting.page_reporting_order=11 on its command line), which takes them back; the
 * first write to such a page then costs a fault in the outer hypervisor as well, invisible to this kernel.
 * Comparing a mode with and without --prewarm separates that cost from the kernel's own.
 *
 *   cc -O2 -o /tmp/populate bench/memory/populate.c
 *   /tmp/populate MODE [--again] [--prewarm] [--dir DIR]
 *
 * With --dir DIR the memfd-* modes use an unlinked file in DIR instead of a memfd, e.g. a tmpfs mounted with
 * huge=within_size, whose files take transparent huge pages whatever shmem_enabled says.
 *
 * Modes:
 *   memfd-pwritev      pwritev into a 4 KiB memfd (what the receiver does today on shared memory)
 *   memfd-fallocate    fallocate the whole memfd, then pwritev
 *   memfd-mapping      memcpy into a MAP_SHARED memfd mapping: a fault and a zero fill per 4 KiB page
 *   memfd-populate     MADV_POPULATE_WRITE over the whole mapping, then memcpy into it
 *   memfd-thp          MADV_HUGEPAGE on the memfd mapping, then memcpy (does nothing while shmem_enabled=never)
 *   anon               memcpy into private anonymous memory, 4 KiB pages
 *   anon-populate      MADV_POPULATE_WRITE over private anonymous memory, then memcpy
 *   anon-thp           MADV_HUGEPAGE on private anonymous memory (2 MiB aligned), then memcpy
 *   anon-thp-populate  the same, populated with MADV_POPULATE_WRITE first
 *   hugetlb            memcpy into a MFD_HUGETLB memfd mapping (needs 512 free pages in nr_hugepages)
 * After the fill it prints how much of the memory ended up on huge pages (this process's AnonHugePages, the
 * growth of the host's ShmemHugePages, the hugetlb pool's use), from /proc/self/smaps_rollup and /proc/meminfo. */
#include "common.h"
#include <fcntl.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* The kB figure of the first line of `file` that starts with `key`, or -1. */
static long kilobytes(const char *file, const char *key) {
    FILE *f = fopen(file, "r");
    if (!f) return -1;
    char line[256];
    long value = -1;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, strlen(key))) {
            value = strtol(line + strlen(key), 0, 10);
            break;
        }
    fclose(f);
    return value;
}

static int is(const char *mode, const char *name) { return !strcmp(mode, name); }

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODE [--again] [--prewarm]\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1];
    static const char *modes[] = {"memfd-pwritev", "memfd-fallocate", "memfd-mapping", "memfd-populate", "memfd-thp", "anon",
                                  "anon-populate", "anon-thp", "anon-thp-populate", "hugetlb"};
    int known = 0;
    for (size_t i = 0; i < sizeof modes / sizeof *modes; i++) known |= is(mode, modes[i]);
    if (!known) {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    int again = 0, prewarm = 0;
    const char *dir = 0;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--again")) again = 1;
        else if (!strcmp(argv[i], "--prewarm")) prewarm = 1;
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc) dir = argv[++i];
        else { fprintf(stderr, "unknown option %s\n", argv[i]); return 2; }
    }
    if (prewarm) {
        size_t size = TOTAL + TOTAL / 4;
        char *warm = mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (warm == MAP_FAILED) die("mmap prewarm");
        memset(warm, 1, size);
        munmap(warm, size);
    }
    int memfd = !strncmp(mode, "memfd", 5) || is(mode, "hugetlb");
    int pwrite_mode = is(mode, "memfd-pwritev") || is(mode, "memfd-fallocate");

    char *source = malloc(STEP);
    for (size_t i = 0; i < STEP; i++) source[i] = (char)rand();

    long huge_free_before = kilobytes("/proc/meminfo", "HugePages_Free:");
    long shmem_huge_before = kilobytes("/proc/meminfo", "ShmemHugePages:");
    int fd = -1;
    char *memory;
    if (memfd) {
        fd = dir && !is(mode, "hugetlb") ? open(dir, O_TMPFILE | O_RDWR, 0600)
                                         : memfd_create("populate-bench", is(mode, "hugetlb") ? MFD_HUGETLB : 0);
        if (fd < 0 || ftruncate(fd, TOTAL)) die("memfd");
        memory = mmap(0, TOTAL, PROT_READ | PROT_WRITE, MAP_SHARED | (is(mode, "hugetlb") ? 0 : MAP_NORESERVE), fd, 0);
        if (memory == MAP_FAILED) die("mmap memfd");
    } else {
        char *raw = mmap(0, TOTAL + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (raw == MAP_FAILED) die("mmap anonymous");
        memory = (char *)(((unsigned long)raw + HUGE - 1) & ~(HUGE - 1));
    }
    if ((is(mode, "memfd-thp") || !strncmp(mode, "anon-thp", 8)) && madvise(memory, TOTAL, MADV_HUGEPAGE))
        die("MADV_HUGEPAGE");

    double c0 = cpu(), w0 = wall();
    if (is(mode, "memfd-fallocate") && fallocate(fd, 0, 0, TOTAL)) die("fallocate");
    if ((is(mode, "memfd-populate") || is(mode, "anon-populate") || is(mode, "anon-thp-populate")) &&
        madvise(memory, TOTAL, MADV_POPULATE_WRITE))
        die("MADV_POPULATE_WRITE");
    double c1 = cpu();
    for (int round = 0; round < 1 + again; round++) {
        for (size_t offset = 0; offset < TOTAL; offset += STEP) {
            /* vary the data a little so that no step is a copy of the last */
            source[offset / STEP % STEP] ^= 1;
            if (pwrite_mode) {
                struct iovec v = {source, STEP};
                if (pwritev(fd, &v, 1, (off_t)offset) != (ssize_t)STEP) die("pwritev");
            } else {
                memcpy(memory + offset, source, STEP);
            }
        }
        if (round == 0) {
            double c2 = cpu(), w2 = wall();
            long anon_huge = kilobytes("/proc/self/smaps_rollup", "AnonHugePages:");
            long shmem_huge = kilobytes("/proc/meminfo", "ShmemHugePages:") - shmem_huge_before;
            long huge_free_after = kilobytes("/proc/meminfo", "HugePages_Free:");
            long hugetlb_mib = is(mode, "hugetlb") ? (huge_free_before - huge_free_after) * 2 : 0;
            printf("%-18s populate %.3f  fill %.3f  total %.3f CPU-s/GiB (wall %.3f s)  huge: anon %ld MiB, shmem %ld MiB, hugetlb %ld MiB",
                   mode, c1 - c0, c2 - c1, c2 - c0, w2 - w0, anon_huge / 1024, shmem_huge / 1024, hugetlb_mib);
            c1 = c2;
        } else {
            printf("  again %.3f", cpu() - c1);
        }
    }
    printf("\n");
    return 0;
}
