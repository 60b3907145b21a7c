/* What the memory experiments (populate.c, receive.c) share: the gibibyte they fill in mebibyte steps, and how
 * they time it. */
#ifndef BENCH_MEMORY_COMMON_H
#define BENCH_MEMORY_COMMON_H
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

#define TOTAL (1UL << 30)
#define STEP (1UL << 20)
#define HUGE (2UL << 20)

/* Seconds of CPU this process has used, user and system. */
static double cpu(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_utime.tv_usec * 1e-6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec * 1e-6;
}

static double wall(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}
#endif
