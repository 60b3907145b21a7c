import CMigratedABI
import Glibc
import KVMBackend
import LinuxSystem
import MigrationWire

/// A VMM's guest RAM, as its `migrated_region`s describe it, checked once so that the hot paths need not: regions
/// are page aligned, sorted and disjoint in guest-physical and host addresses, and frames found in them are
/// inside them.
///
/// Sendable: immutable after init; the host addresses in it point at the VMM's guest RAM, whose bytes the engine's
/// callers order (GuestSource and GuestSink contracts).
final class VMMMemory: @unchecked Sendable {
    struct Region {
        let slot: UInt32
        let guestPhysicalAddress: UInt64
        let size: UInt64
        let host: UnsafeMutableRawPointer
        /// The file behind the mapping (MIGRATED_REGION_FD), a duplicate this object owns, and where in it the
        /// region starts.
        let file: OwnedFileDescriptor?
        let fileOffset: Int64

        var firstFrame: UInt64 { guestPhysicalAddress >> 12 }
        var frameCount: UInt64 { size >> 12 }
    }

    let regions: [Region]
    let layout: GuestMemoryLayout
    let slots: [MemorySlot]

    /// Checks `described` (what a VMM passed) and takes it over.
    init(_ described: UnsafeBufferPointer<migrated_region>) throws {
        guard !described.isEmpty else { throw CABIError.invalid("no memory regions") }
        guard described.count <= 1024 else { throw CABIError.invalid("\(described.count) memory regions; at most 1024") }
        let page = UInt64(MIGRATED_PAGE_SIZE)
        var regions: [Region] = []
        for (index, region) in described.enumerated() {
            let name = "region \(index)"
            guard region.size > 0, region.size % page == 0 else { throw CABIError.invalid("\(name): size \(region.size) is not a non-zero multiple of \(page)") }
            guard region.guest_phys_addr % page == 0 else { throw CABIError.invalid("\(name): guest-physical address 0x\(String(region.guest_phys_addr, radix: 16)) is not page aligned") }
            guard region.guest_phys_addr.addingReportingOverflow(region.size).overflow == false else { throw CABIError.invalid("\(name): extends past the end of the address space") }
            guard let host = region.host_addr else { throw CABIError.invalid("\(name): host_addr is NULL") }
            guard UInt(bitPattern: host) % UInt(page) == 0 else { throw CABIError.invalid("\(name): host address \(host) is not page aligned") }
            guard UInt(bitPattern: host).addingReportingOverflow(UInt(region.size)).overflow == false else { throw CABIError.invalid("\(name): host range wraps around") }
            guard region.flags & ~MIGRATED_REGION_FD == 0, region.reserved == 0 else { throw CABIError.invalid("\(name): unknown flags 0x\(String(region.flags, radix: 16)) or reserved field set") }
            var file: OwnedFileDescriptor?
            if region.flags & MIGRATED_REGION_FD != 0 {
                guard region.fd_offset % page == 0, region.fd_offset <= UInt64(Int64.max) - region.size else {
                    throw CABIError.invalid("\(name): file offset \(region.fd_offset) is not page aligned")
                }
                var status = stat()
                guard region.fd >= 0, fstat(region.fd, &status) == 0 else { throw CABIError.invalid("\(name): fd \(region.fd) is not open") }
                guard UInt64(status.st_size) >= region.fd_offset + region.size else {
                    throw CABIError.invalid("\(name): the file of fd \(region.fd) holds \(status.st_size) bytes, less than offset \(region.fd_offset) + size \(region.size)")
                }
                file = OwnedFileDescriptor(taking: try systemCall("fcntl F_DUPFD_CLOEXEC") { fcntl(region.fd, F_DUPFD_CLOEXEC, 0) })
            }
            regions.append(Region(slot: region.slot, guestPhysicalAddress: region.guest_phys_addr, size: region.size, host: host,
                                  file: file, fileOffset: Int64(region.fd_offset)))
        }
        for (index, pair) in zip(regions, regions.dropFirst()).enumerated() {
            guard pair.0.guestPhysicalAddress + pair.0.size <= pair.1.guestPhysicalAddress else {
                throw CABIError.invalid("region \(index + 1) overlaps region \(index) or comes before it: regions must be sorted by guest-physical address and disjoint")
            }
        }
        let byHost = regions.sorted { UInt(bitPattern: $0.host) < UInt(bitPattern: $1.host) }
        for pair in zip(byHost, byHost.dropFirst()) where UInt(bitPattern: pair.0.host) + UInt(pair.0.size) > UInt(bitPattern: pair.1.host) {
            throw CABIError.invalid("the host memory of the regions at guest-physical 0x\(String(pair.0.guestPhysicalAddress, radix: 16)) and 0x\(String(pair.1.guestPhysicalAddress, radix: 16)) overlaps")
        }
        guard Set(regions.map(\.slot)).count == regions.count else { throw CABIError.invalid("two regions have the same slot id") }
        self.regions = regions
        layout = GuestMemoryLayout(regions: regions.map { MemoryRegion(guestPhysicalAddress: $0.guestPhysicalAddress, size: $0.size) })
        slots = regions.map { MemorySlot(id: $0.slot, guestPhysicalAddress: $0.guestPhysicalAddress, size: $0.size, hostAddress: $0.host) }
    }

    /// The region holding `frame`, which the engine has checked lies in the layout. A VMM has one region or a few
    /// (below and above the PCI hole), so a scan beats a search.
    @inline(__always)
    private func region(of frame: UInt64) -> Region {
        for region in regions where frame &- region.firstFrame < region.frameCount { return region }
        preconditionFailure("frame \(frame) is outside the guest's memory layout")
    }

    func pointer(frame: UInt64) -> UnsafeMutableRawPointer {
        let region = region(of: frame)
        return region.host + Int((frame - region.firstFrame) << 12)
    }

    /// Frames that may hold data, in order: a region with a file skips the file's holes, the rest are visited whole.
    func forEachPopulatedFrame(_ visit: (UInt64) -> Void) throws {
        for region in regions {
            guard let file = region.file else {
                for frame in region.firstFrame ..< region.firstFrame + region.frameCount { visit(frame) }
                continue
            }
            for range in try file.dataRanges(from: region.fileOffset, below: region.fileOffset + Int64(region.size)) {
                for offset in stride(from: range.lowerBound, to: range.upperBound, by: 4096) {
                    visit(region.firstFrame + UInt64(offset - region.fileOffset) >> 12)
                }
            }
        }
    }

    /// Writes consecutive frames, through the region's file when it has one.
    func write(frames first: UInt64, pages: UnsafeBufferPointer<UnsafeRawPointer>) throws {
        try forEachPiece(first: first, count: pages.count) { region, frame, index, count in
            let piece = UnsafeBufferPointer(rebasing: pages[index ..< index + count])
            if let file = region.file {
                try file.write(pages: piece, pageSize: 4096, at: region.fileOffset + Int64((frame - region.firstFrame) << 12))
            } else {
                for (i, bytes) in piece.enumerated() { pointer(frame: frame + UInt64(i)).copyMemory(from: bytes, byteCount: 4096) }
            }
        }
    }

    /// Makes consecutive frames read as zero: a hole punched in the region's file when it has one (no memory held).
    func zero(frames first: UInt64, count: Int) throws {
        try forEachPiece(first: first, count: count) { region, frame, _, count in
            if let file = region.file {
                try file.punchHole(at: region.fileOffset + Int64((frame - region.firstFrame) << 12), length: Int64(count * 4096))
            } else {
                pointer(frame: frame).initializeMemory(as: UInt8.self, repeating: 0, count: count * 4096)
            }
        }
    }

    /// Splits a run of frames where it crosses from one region into the next (regions may lie back to back).
    private func forEachPiece(first: UInt64, count: Int, _ body: (Region, UInt64, Int, Int) throws -> Void) throws {
        var index = 0
        while index < count {
            let frame = first + UInt64(index)
            let region = region(of: frame)
            let piece = min(count - index, Int(region.firstFrame + region.frameCount - frame))
            try body(region, frame, index, piece)
            index += piece
        }
    }

    /// Whether pages are best received straight into the mapping: when there is no file to write them through.
    var takesPagesInPlace: Bool { regions.allSatisfy { $0.file == nil } }
}
