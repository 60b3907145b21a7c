import Glibc
import KVMBackend
import LinuxSystem

/// Guest RAM: one memfd, mapped once, presented to KVM as one or two memory slots.
///
/// RAM starts at guest-physical 0. The 1 GiB below 4 GiB is left for devices (LAPIC, IOAPIC and their
/// kind live there), so RAM beyond 3 GiB continues at 4 GiB in a second slot. A shared-memory memfd is
/// sparse: a VM of tens of GiB costs nothing until the guest writes to it.
public final class GuestMemory: Sendable {
    /// What holds guest RAM.
    public enum Backing: String, Sendable, Equatable, CaseIterable {
        /// 4 KiB shared-memory pages, allocated as the guest (or a migration) first writes them.
        case sharedMemory = "shared-memory"
        /// 2 MiB pages from the host's reserved pool (`/proc/sys/vm/nr_hugepages`), as VMMs offer for
        /// hugetlbfs. All of RAM is reserved when the VM is created, so a guest cannot find the pool empty
        /// later. A page costs one fault and one page-table entry per 2 MiB instead of 512, which on this
        /// nested host makes receiving a GiB about 3.5 times cheaper (bench/memory/receive.c). Lazy snapshot
        /// restore (userfaultfd, which copies 4 KiB pages) needs shared memory; eager restore takes either.
        case hugePages = "huge-pages"
    }

    public let size: UInt64
    public let backing: Backing
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
    public static let hugePageSize: UInt64 = 2 << 20

    public init(size: UInt64, backing: Backing = .sharedMemory) throws {
        try Self.validate(size: size)
        self.size = size
        self.backing = backing
        file = try makeMemoryFile(name: "guest-ram", size: Int64(size), hugePages: backing == .hugePages)
        switch backing {
        case .sharedMemory:
            mapping = try MemoryMapping(file: file, size: Int(size), flags: MAP_SHARED | MAP_NORESERVE)
        case .hugePages:
            // Without MAP_NORESERVE the kernel reserves every huge page now, or refuses: a guest that later
            // touched a page the pool could not give would be killed with SIGBUS.
            do {
                mapping = try MemoryMapping(file: file, size: Int(size), flags: MAP_SHARED)
            } catch let error as SystemError where error.errno == ENOMEM {
                throw GuestMemoryError.notEnoughHugePages(needed: size / Self.hugePageSize, free: Self.freeHugePages())
            }
        }
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
    ///
    /// Huge pages take the copy through the mapping: hugetlbfs files cannot be written, and a 2 MiB page costs
    /// one fault for 512 small pages.
    public func write(pages: UnsafeBufferPointer<UnsafeRawPointer>, at address: UInt64) throws {
        let offset = try fileOffset(guestPhysicalAddress: address, length: pages.count * pageSize)
        switch backing {
        case .sharedMemory:
            try file.write(pages: pages, pageSize: pageSize, at: offset)
        case .hugePages:
            for (index, page) in pages.enumerated() {
                (mapping.base + Int(offset) + index * pageSize).copyMemory(from: page, byteCount: pageSize)
            }
        }
    }

    /// Makes `length` bytes of guest RAM from `address` read as zero; shared memory gives their memory back.
    /// A huge page is zeroed in place: a hole smaller than the page would free nothing, and kernels before
    /// 6.3 leave such a partial hole's bytes as they were.
    public func zero(at address: UInt64, length: Int) throws {
        let offset = try fileOffset(guestPhysicalAddress: address, length: length)
        switch backing {
        case .sharedMemory: try file.punchHole(at: offset, length: Int64(length))
        case .hugePages: (mapping.base + Int(offset)).initializeMemory(as: UInt8.self, repeating: 0, count: length)
        }
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

    /// The byte ranges of the memfd that hold data (others are holes, which read as zero). hugetlbfs does not
    /// report holes (it calls the whole file data), so for huge pages these are the pages the mapping holds,
    /// which are all the pages anyone wrote: this process, and KVM for the guest, through the same mapping.
    public func dataRanges() throws -> [Range<Int64>] {
        switch backing {
        case .sharedMemory: return try file.dataRanges(below: Int64(size))
        case .hugePages: return try residentHugePages()
        }
    }

    private func residentHugePages() throws -> [Range<Int64>] {
        let hugePage = Int(Self.hugePageSize), step = min(1 << 30, Int(size)) // one mincore call per GiB
        var present = [UInt8](repeating: 0, count: step / pageSize)
        var ranges: [Range<Int64>] = []
        for start in stride(from: 0, to: Int(size), by: step) {
            let length = min(step, Int(size) - start)
            try systemCall("mincore") { mincore(mapping.base + start, length, &present) }
            // mincore reports each 4 KiB part of a huge page; the first stands for the whole page.
            for page in stride(from: 0, to: length, by: hugePage) where present[page / pageSize] & 1 != 0 {
                let offset = Int64(start + page)
                if let last = ranges.last, last.upperBound == offset {
                    ranges[ranges.count - 1] = last.lowerBound ..< offset + Int64(hugePage)
                } else {
                    ranges.append(offset ..< offset + Int64(hugePage))
                }
            }
        }
        return ranges
    }

    /// Huge pages a new guest can still reserve: the pool's free pages (HugePages_Free) less those that other
    /// mappings have reserved but not yet touched (HugePages_Rsvd).
    public static func freeHugePages() -> UInt64 {
        let free = memoryInfo("HugePages_Free") ?? 0, reserved = memoryInfo("HugePages_Rsvd") ?? 0
        return free - min(free, reserved)
    }
}

public enum GuestMemoryError: Error, CustomStringConvertible, Equatable {
    case sizeDoesNotFit(UInt64, String)
    case outsideRAM(address: UInt64, length: Int)
    case notEnoughHugePages(needed: UInt64, free: UInt64)

    public var description: String {
        switch self {
        case .notEnoughHugePages(let needed, let free):
            "guest memory needs \(needed) huge pages of 2 MiB and the host's pool has \(free) free (raise /proc/sys/vm/nr_hugepages)"
        case .sizeDoesNotFit(let size, let why): "guest memory of \(size) bytes does not fit: \(why)"
        case .outsideRAM(let address, let length): "\(length) bytes at guest-physical 0x\(String(address, radix: 16)) are not all RAM"
        }
    }
}
