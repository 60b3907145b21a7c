/* What the destination's start of post-copy may cost: punching N scattered single pages out of a mapped, populated
 * 512 MiB memfd, one fallocate(FALLOC_FL_PUNCH_HOLE) each, in memstress's stride order (issue 15; see bench/README.md,
 * "Post-copy"). Usage: gcc -O2 -o /tmp/punch bench/memory/punch.c && /tmp/punch [N, default 40000]
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
	size_t pages = 512 * 256, punch = argc > 1 ? atol(argv[1]) : 40000;
	int fd = memfd_create("punch", 0);
	ftruncate(fd, pages * 4096);
	char *m = mmap(0, pages * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	for (size_t i = 0; i < pages; i++) m[i * 4096] = 1;
	size_t stride = (pages * 618) / 1000 | 1;
	double t0 = now();
	for (size_t i = 0; i < punch; i++) {
		size_t p = (i * stride) % pages;
		if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, p * 4096, 4096)) { perror("fallocate"); return 1; }
	}
	double t1 = now();
	printf("%zu scattered single-page punches in a 512 MiB memfd (mapped, populated): %.1f ms, %.1f us each\n", punch, (t1 - t0) * 1e3, (t1 - t0) * 1e6 / punch);
	return 0;
}
