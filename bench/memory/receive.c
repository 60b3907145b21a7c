/* What receiving 1 GiB from loopback TCP into guest-style memory costs on this host, for each way the
 * destination could hold guest RAM. It bounds what the migration receiver can reach: the receiver adds
 * decoding, checksums and the digest on top of one of these.
 *
 *   cc -O2 -o /tmp/receive bench/memory/receive.c
 *   /tmp/receive pwritev            # receive into a buffer, pwritev into a memfd (what the receiver does)
 *   /tmp/receive populate           # MADV_POPULATE_WRITE a memfd mapping per MiB, then receive into it
 *   /tmp/receive mapping            # receive straight into a memfd mapping (a fault per page)
 *   /tmp/receive anon               # receive straight into anonymous memory, 4 KiB pages
 *   /tmp/receive anon-thp           # the same with MADV_HUGEPAGE (what QEMU's RAM gets)
 *   /tmp/receive file-pwritev DIR   # pwritev into a file in DIR, e.g. a tmpfs mounted with huge=always
 *   /tmp/receive hugetlb            # receive straight into a MFD_HUGETLB memfd mapping (2 MiB pages from
 *                                   # the pool reserved in /proc/sys/vm/nr_hugepages: 512 for the GiB)
 *
 * A child process sends 1 GiB of random bytes in 1 MiB writes; the parent receives them in 1 MiB steps and
 * prints its wall time and CPU time (user + system) for the whole GiB. */
#include "common.h"
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

static void receive_all(int s, char *p, size_t n) {
    while (n) {
        ssize_t k = recv(s, p, n, 0);
        if (k <= 0) die("recv");
        p += k;
        n -= (size_t)k;
    }
}

static void send_gib(struct sockaddr_in *address) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)address, sizeof *address)) die("connect");
    char *block = malloc(STEP);
    for (size_t i = 0; i < STEP; i++) block[i] = (char)rand();
    for (size_t sent = 0; sent < TOTAL; sent += STEP) {
        for (size_t done = 0; done < STEP;) {
            ssize_t k = send(s, block + done, STEP - done, 0);
            if (k <= 0) die("send");
            done += (size_t)k;
        }
    }
    close(s);
}

static void pwrite_step(int fd, const char *buffer, size_t offset) {
    struct iovec v = {(void *)buffer, STEP};
    if (pwritev(fd, &v, 1, (off_t)offset) != (ssize_t)STEP) die("pwritev");
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "pwritev";
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t length = sizeof address;
    if (bind(listener, (struct sockaddr *)&address, sizeof address) || getsockname(listener, (struct sockaddr *)&address, &length) ||
        listen(listener, 1))
        die("listen");
    if (fork() == 0) {
        send_gib(&address);
        _exit(0);
    }
    int s = accept(listener, 0, 0);

    int fd = -1;
    char path[4096] = "";
    if (!strcmp(mode, "file-pwritev")) {
        if (argc < 3) { fprintf(stderr, "file-pwritev needs a directory\n"); return 2; }
        snprintf(path, sizeof path, "%s/receive-bench.%d", argv[2], getpid());
        fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
    } else {
        fd = memfd_create("receive-bench", !strcmp(mode, "hugetlb") ? MFD_HUGETLB : 0);
    }
    if (fd < 0 || ftruncate(fd, TOTAL)) die("guest memory file");
    char *shared = mmap(0, TOTAL, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    char *anon = mmap(0, TOTAL + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED || anon == MAP_FAILED) die("mmap");
    anon = (char *)(((unsigned long)anon + HUGE - 1) & ~(HUGE - 1));
    if (!strcmp(mode, "anon-thp") && madvise(anon, TOTAL, MADV_HUGEPAGE)) die("MADV_HUGEPAGE");
    char *buffer = malloc(STEP);

    double w = wall(), c = cpu();
    for (size_t offset = 0; offset < TOTAL; offset += STEP) {
        if (!strcmp(mode, "pwritev") || !strcmp(mode, "file-pwritev")) {
            receive_all(s, buffer, STEP);
            pwrite_step(fd, buffer, offset);
        } else if (!strcmp(mode, "populate")) {
            if (madvise(shared + offset, STEP, MADV_POPULATE_WRITE)) die("MADV_POPULATE_WRITE");
            receive_all(s, shared + offset, STEP);
        } else if (!strcmp(mode, "mapping") || !strcmp(mode, "hugetlb")) {
            receive_all(s, shared + offset, STEP);
        } else if (!strcmp(mode, "anon") || !strcmp(mode, "anon-thp")) {
            receive_all(s, anon + offset, STEP);
        } else {
            fprintf(stderr, "unknown mode %s\n", mode);
            return 2;
        }
    }
    double seconds = wall() - w, cpu_seconds = cpu() - c;
    wait(0);
    if (path[0]) unlink(path);
    printf("%-12s wall %.3f s, receiver CPU %.3f s per GiB\n", mode, seconds, cpu_seconds);
    return 0;
}
