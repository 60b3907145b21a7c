/*
 * cvmm.h: what the parts of c-vmm share: the command channel on stdout and the log on stderr.
 */
#ifndef CVMM_H
#define CVMM_H

#include <stdint.h>

/* Exit statuses of the process (besides the guest's own exit code). */
#define CVMM_EXIT_OK 0
#define CVMM_EXIT_ERROR 2
#define CVMM_EXIT_USAGE 64

/* One line on stdout (the reply channel): it must start with "ok" or "error". Thread safe; flushed at once. */
void cvmm_reply(const char *format, ...) __attribute__((format(printf, 1, 2)));
/* One line on stderr, prefixed with "c-vmm: ". Thread safe. */
void cvmm_log(const char *format, ...) __attribute__((format(printf, 1, 2)));
/* A byte count with an optional K, M, G or T suffix (powers of 1024) into *out: 0, or -1 if it is not one. */
int cvmm_parse_size(const char *text, uint64_t *out);
/* Whether --verbose was given. */
extern int cvmm_verbose;

#endif
