import MicroVM
import XCTest

/// Skips the calling test unless the host's huge-page pool has `count` 2 MiB pages a new guest can reserve.
/// scripts/test reserves enough when it runs as root.
public func requireFreeHugePages(_ count: UInt64) throws {
    let free = GuestMemory.freeHugePages()
    guard free >= count else {
        throw XCTSkip("needs \(count) free 2 MiB pages (/proc/sys/vm/nr_hugepages); \(free) are free")
    }
}
