import CKVM
import Glibc

/// A region mapped with mmap, unmapped when this object goes away.
///
/// Sendable: the address and size never change; the bytes behind them are synchronized by their users.
public final class MemoryMapping: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let size: Int

    /// Maps `size` bytes of `file` from `offset`.
    public init(file: OwnedFileDescriptor, offset: Int64 = 0, size: Int,
                protection: Int32 = PROT_READ | PROT_WRITE, flags: Int32 = MAP_SHARED) throws {
        guard let address = mmap(nil, size, protection, flags, file.rawValue, off_t(offset)),
              address != MAP_FAILED else {
            throw SystemError("mmap of \(size) bytes at offset \(offset)", errno: errno)
        }
        self.base = address
        self.size = size
    }

    public var buffer: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base, count: size) }

    deinit { munmap(base, size) }
}

/// Anonymous shared memory (memfd_create), for guest RAM: sparse until written, so a VM of tens of GiB costs
/// nothing to create, and a file descriptor that another process or userfaultfd can be handed later.
/// With `hugePages`, the file's pages are 2 MiB pages from the host's reserved pool (hugetlbfs).
public func makeMemoryFile(name: String, size: Int64, hugePages: Bool = false) throws -> OwnedFileDescriptor {
    let flags = CKVM_MFD_CLOEXEC | (hugePages ? CKVM_MFD_HUGETLB : 0)
    let fd = try systemCall("memfd_create \(name)") { ckvm_memfd_create(name, flags) }
    let file = OwnedFileDescriptor(taking: fd)
    try file.truncate(to: size)
    return file
}
