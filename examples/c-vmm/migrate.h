/*
 * migrate.h: c-vmm's use of libmigrated (include/migrated.h): the migrated_vm handle and its callbacks, outgoing
 * and incoming live migration, snapshot save and restore. Nothing else in c-vmm calls the library.
 */
#ifndef CVMM_MIGRATE_H
#define CVMM_MIGRATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vm.h"

enum dirty_choice { DIRTY_BITMAP, DIRTY_RING, DIRTY_CALLBACK };

#define MIGRATE_DEFAULT_RING_BYTES (1u << 20)

struct migrated_vm;
struct migrator;

/* Checks the library's ABI; 0, or -1 after logging why. */
int migrator_check_abi(void);

/* Makes the migrator for `vm`. Call right after vm_open (before vm_create_platform): with the ring it enables
 * KVM's dirty ring on the VM, which must happen before the vCPU exists. NULL after logging why. */
struct migrator *migrator_new(struct vm *vm, enum dirty_choice dirty, uint32_t ring_bytes);

/* Creates the migrated_vm handle once the vCPU exists: over the VM's RAM when it has some (a booted guest), or
 * empty (a guest to receive or restore). 0, or -1 after logging why. */
int migrator_attach(struct migrator *m);

/* Stdin commands; each writes its one reply line. argv[0] is the command's first argument (not its name).
 * migrator_migrate returns 1 when the guest has moved away (the caller stops it and exits 0), else 0. */
int migrator_migrate(struct migrator *m, int argc, char **argv, bool over_fds);
void migrator_save(struct migrator *m, int argc, char **argv);

/* Receives a guest (listen_address or fds_text, "N[,N...]"), replying "ok listening ..." and then
 * "ok received ..."; tls_text is "CA,CERT,KEY,PEER[,PEER...]" or NULL. 0 once the guest runs, else -1 after
 * an "error" reply. */
int migrator_receive(struct migrator *m, const char *listen_address, const char *fds_text, const char *tls_text);

/* Restores a snapshot eagerly and starts it, replying "ok restored ..."; 0, or -1 after an "error" reply. */
int migrator_restore(struct migrator *m, const char *path);

/* Frees the handle (which ends the library's dirty tracking) and the migrator; before vm_close. NULL is fine. */
void migrator_free(struct migrator *m);

#endif
