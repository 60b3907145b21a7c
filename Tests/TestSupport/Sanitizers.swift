import Glibc

/// How many times slower this test process runs than a plain build: 10 under ThreadSanitizer (`scripts/tsan`),
/// which instruments every memory access, else 1. Tests that wait for a guest or a migration, or bound how long
/// something may take, scale their limits by it, so that the same tests run in both builds.
public let sanitizerSlowdown: Double = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "__tsan_init") != nil ? 10 : 1
