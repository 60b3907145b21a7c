import Glibc
import KVMBackend
import LinuxSystem

/// Guest RAM: one memfd, mapped once, presented to KVM as one or two memory slots.
///
/// RAM starts at guest-physical 0. The 1 GiB below 4 GiB is left for devices (LAPIC, IOAPIC and their
/// kind live there), so RAM beyond 3 GiB continues at 4 GiB in a second slot. The memfd is sparse: a
/// VM of tens of GiB costs nothing until the guest writes to it.
public final class GuestMemory: @unchecked Sendable {
    public let size: UInt64
    public let file: OwnedFileDescriptor
    public let mapping: MemoryMapping
    public let slots: [MemorySlot]

    /// RAM below this address; the rest of RAM starts at 4 GiB.
    public static let lowMemoryLimit: UInt64 = 3 << 30
    public static let highMemoryBase: UInt64 = 4 << 30
    /// Sizes are whole 2 MiB pages, so that the guest may map all of its RAM with large pages.
    public static let sizeGranularity: UInt64 = 2 << 20
    public static let minimumSize: UInt64 = 16 << 20
    /// The largest guest this VMM will create: 1 TiB, well inside the 40+ physical address bits of any x86-64
    /// host, and more than a test guest will ever need.
    public static let maximumSize: UInt64 = 1 << 40

    public init(size: UInt64) throws {
        try Self.validate(size: size)
        self.size = size
        file = try makeMemoryFile(name: "guest-ram", size: Int64(size))
        mapping = try MemoryMapping(file: file, size: Int(size), flags: MAP_SHARED | MAP_NORESERVE)
        let low = min(size, Self.lowMemoryLimit)
        var slots = [MemorySlot(id: 0, guestPhysicalAddress: 0, size: low, hostAddress: mapping.base)]
        if size > low {
            slots.append(MemorySlot(id: 1, guestPhysicalAddress: Self.highMemoryBase, size: size - low,
                                    hostAddress: mapping.base + Int(low)))
        }
        self.slots = slots
    }

    public static func validate(size: UInt64) throws(GuestMemoryError) {
        guard size >= minimumSize else { throw .sizeDoesNotFit(size, "it is below the minimum of \(minimumSize >> 20) MiB") }
        guard size <= maximumSize else { throw .sizeDoesNotFit(size, "it exceeds the maximum of \(maximumSize >> 30) GiB") }
        guard size % sizeGranularity == 0 else { throw .sizeDoesNotFit(size, "it is not a multiple of 2 MiB") }
    }

    /// A host pointer to `length` bytes of guest RAM at `address`, or nil when that range is not all RAM.
    public func pointer(guestPhysicalAddress address: UInt64, length: Int) -> UnsafeMutableRawPointer? {
        for slot in slots where address >= slot.guestPhysicalAddress {
            let offset = address - slot.guestPhysicalAddress
            if offset <= slot.size, UInt64(length) <= slot.size - offset { return slot.hostAddress + Int(offset) }
        }
        return nil
    }

    /// Writes whole pages to guest RAM from `address` on, page i from `pages[i]`, through the memfd rather than
    /// the mapping. A page the mapping has not touched yet would cost, written through it, a fault, a zero fill
    /// and a page-table update; written here, it costs none of the three (about half the time on this host),
    /// and KVM maps it when the guest first uses it.
    public func write(pages: UnsafeBufferPointer<UnsafeRawPointer>, at address: UInt64) throws {
        let offset = try fileOffset(guestPhysicalAddress: address, length: pages.count * pageSize)
        try file.write(pages: pages, pageSize: pageSize, at: offset)
    }

    /// Makes `length` bytes of guest RAM from `address` read as zero, and gives their memory back.
    public func zero(at address: UInt64, length: Int) throws {
        try file.punchHole(at: fileOffset(guestPhysicalAddress: address, length: length), length: Int64(length))
    }

    private func fileOffset(guestPhysicalAddress address: UInt64, length: Int) throws(GuestMemoryError) -> Int64 {
        guard let pointer = pointer(guestPhysicalAddress: address, length: length) else {
            throw .outsideRAM(address: address, length: length)
        }
        return Int64(pointer - mapping.base)
    }

    /// The guest-physical address of a byte of the memfd (which holds the slots back to back).
    public func guestPhysicalAddress(fileOffset offset: UInt64) -> UInt64 {
        let slot = slots.last { UInt64($0.hostAddress - mapping.base) <= offset }!
        return slot.guestPhysicalAddress + offset - UInt64(slot.hostAddress - mapping.base)
    }

    /// The byte ranges of the memfd that hold data (others are holes, which read as zero).
    public func dataRanges() throws -> [Range<Int64>] { try file.dataRanges(below: Int64(size)) }
}

public enum GuestMemoryError: Error, CustomStringConvertible, Equatable {
    case sizeDoesNotFit(UInt64, String)
    case outsideRAM(address: UInt64, length: Int)

    public var description: String {
        switch self {
        case .sizeDoesNotFit(let size, let why): "guest memory of \(size) bytes does not fit: \(why)"
        case .outsideRAM(let address, let length): "\(length) bytes at guest-physical 0x\(String(address, radix: 16)) are not all RAM"
        }
    }
}
