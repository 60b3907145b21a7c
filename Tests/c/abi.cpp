// The header from C++: it compiles pedantically and links as is (extern "C" guards, no C-only constructs).
#include <migrated.h>

#include <cstdio>

int main() {
    migrated_vm *vm = nullptr;
    migrated_vm_config config{};  // zero: the documented defaults, and an ABI version of 0, which must be refused
    int refused = migrated_vm_create(&config, &vm);
    std::printf("abi %u %s %s\n", migrated_abi_version(), migrated_error_name(migrated_abi_check(MIGRATED_ABI_VERSION)),
                migrated_error_name(refused));
    return vm == nullptr ? 0 : 1;
}
