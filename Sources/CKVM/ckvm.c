#define _GNU_SOURCE
#include "ckvm.h"
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

int ckvm_ioctl_ptr(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }
int ckvm_ioctl_val(int fd, unsigned long request, unsigned long arg) { return ioctl(fd, request, arg); }

static void ckvm_kick(int signo) { (void)signo; }

int ckvm_install_kick_handler(int signo) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = ckvm_kick;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; // no SA_RESTART: KVM_RUN must return EINTR
    return sigaction(signo, &sa, NULL);
}

int ckvm_sigrtmin(void) { return SIGRTMIN; }
int ckvm_memfd_create(const char *name, unsigned int flags) { return memfd_create(name, flags); }

int ckvm_unblock_signal(int signo) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, signo);
    return pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}
