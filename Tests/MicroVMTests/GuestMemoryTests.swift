import Foundation
import Glibc
import KVMBackend
import LinuxSystem
import MicroVM
import TestSupport
import XCTest

/// Guest RAM's sizes and slots, and writing it through its memfd as a migration's receiver does. Needs no KVM:
/// the memfd is sparse, so a guest above 3 GiB (two slots) costs only the pages written.
final class GuestMemoryTests: XCTestCase {
    func testRefusesSizesThatDoNotFit() {
        for size: UInt64 in [0, 1 << 20, (64 << 20) + 4096, 2 << 40] {
            XCTAssertThrowsError(try GuestMemory(size: size), "size \(size)") { error in
                XCTAssertTrue("\(error)".contains("does not fit"), "\(error)")
            }
        }
    }

    func testLargeGuestsAreSparseAndSkipTheHoleBelow4GiB() throws {
        let memory = try GuestMemory(size: 32 << 30)
        XCTAssertEqual(memory.slots.map(\.guestPhysicalAddress), [0, 4 << 30])
        XCTAssertEqual(memory.slots.map(\.size), [3 << 30, 29 << 30])
        XCTAssertNotNil(memory.pointer(guestPhysicalAddress: (4 << 30) + 4096, length: 4096))
        XCTAssertNil(memory.pointer(guestPhysicalAddress: 3 << 30, length: 1), "3-4 GiB is not RAM")
        XCTAssertEqual(try memory.dataRanges(), [], "nothing written, nothing allocated")
        memory.pointer(guestPhysicalAddress: (4 << 30) + 8192, length: 1)!.storeBytes(of: 1, as: UInt8.self)
        XCTAssertEqual(try memory.dataRanges().reduce(0) { $0 + $1.count }, 4096)
    }

    func testPagesWrittenThroughTheFileAppearInTheMappingOfEitherSlot() throws {
        let memory = try GuestMemory(size: GuestMemory.lowMemoryLimit + (8 << 20))
        // More pages than one pwritev takes (IOV_MAX, 1024), from the start of the slot above 4 GiB; pages come
        // from buffers that are not consecutive in memory, and each carries its index.
        let count = 1100
        let buffers = (0 ..< count).map { index in
            UnsafeMutableRawPointer.allocate(byteCount: pageSize, alignment: pageSize).initializeMemory(as: UInt32.self, repeating: UInt32(index), count: pageSize / 4)
        }
        defer { buffers.forEach { $0.deallocate() } }
        try buffers.map { UnsafeRawPointer($0) }.withUnsafeBufferPointer {
            try memory.write(pages: $0, at: GuestMemory.highMemoryBase)
        }
        let high = try XCTUnwrap(memory.pointer(guestPhysicalAddress: GuestMemory.highMemoryBase, length: count * pageSize))
        for index in [0, 1, 1023, 1024, count - 1] {
            XCTAssertEqual(high.load(fromByteOffset: index * pageSize + pageSize - 4, as: UInt32.self), UInt32(index))
        }
        let lowEnd = Int64(GuestMemory.lowMemoryLimit)
        XCTAssertEqual(try memory.dataRanges(), [lowEnd ..< lowEnd + Int64(count * pageSize)])

        // Zeroing punches a hole: the page reads as zero and holds no memory.
        try memory.zero(at: GuestMemory.highMemoryBase + UInt64(pageSize), length: pageSize)
        XCTAssertEqual(try memory.dataRanges(), [lowEnd ..< lowEnd + Int64(pageSize), lowEnd + Int64(2 * pageSize) ..< lowEnd + Int64(count * pageSize)])
        XCTAssertEqual(high.load(fromByteOffset: pageSize + 64, as: UInt32.self), 0)
    }

    func testWritesThatLeaveRAMAreRefused() throws {
        let memory = try GuestMemory(size: GuestMemory.lowMemoryLimit + (8 << 20))
        let page = UnsafeMutableRawPointer.allocate(byteCount: pageSize, alignment: pageSize)
        defer { page.deallocate() }
        let two = [UnsafeRawPointer(page), UnsafeRawPointer(page)]
        // The last page below 3 GiB and the first of the hole for devices.
        XCTAssertThrowsError(try two.withUnsafeBufferPointer { try memory.write(pages: $0, at: GuestMemory.lowMemoryLimit - UInt64(pageSize)) }) { error in
            XCTAssertEqual(error as? GuestMemoryError, .outsideRAM(address: GuestMemory.lowMemoryLimit - UInt64(pageSize), length: 2 * pageSize))
        }
        XCTAssertThrowsError(try memory.zero(at: GuestMemory.highMemoryBase + (8 << 20), length: pageSize))
        XCTAssertEqual(try memory.dataRanges(), [], "nothing was written")
    }

    /// Huge pages: writes go through the mapping (hugetlbfs files cannot be written), zeroing zeroes in place,
    /// and the pages holding data are the huge pages touched (hugetlbfs reports no holes of its own).
    func testHugePageMemoryTakesWritesAndZeroesAndReportsThePagesItHolds() throws {
        let size: UInt64 = 16 << 20
        try requireFreeHugePages(size / GuestMemory.hugePageSize)
        let memory = try GuestMemory(size: size, backing: .hugePages)
        XCTAssertEqual(try memory.dataRanges(), [], "nothing touched yet")
        let huge = Int64(GuestMemory.hugePageSize)
        let buffers = (0 ..< 3).map { index in
            UnsafeMutableRawPointer.allocate(byteCount: pageSize, alignment: pageSize)
                .initializeMemory(as: UInt32.self, repeating: UInt32(index + 1), count: pageSize / 4)
        }
        defer { buffers.forEach { $0.deallocate() } }
        let at = UInt64(huge) + UInt64(pageSize)
        try buffers.map { UnsafeRawPointer($0) }.withUnsafeBufferPointer { try memory.write(pages: $0, at: at) }
        let written = try XCTUnwrap(memory.pointer(guestPhysicalAddress: at, length: 3 * pageSize))
        XCTAssertEqual((0 ..< 3).map { written.load(fromByteOffset: $0 * pageSize + 100, as: UInt32.self) }, [1, 2, 3])
        XCTAssertEqual(try memory.dataRanges(), [huge ..< 2 * huge], "the one huge page written")
        try memory.zero(at: at + UInt64(pageSize), length: pageSize)
        XCTAssertEqual((0 ..< 3).map { written.load(fromByteOffset: $0 * pageSize + 100, as: UInt32.self) }, [1, 0, 3])
        XCTAssertThrowsError(try memory.zero(at: size - UInt64(pageSize), length: 2 * pageSize)) { error in
            XCTAssertEqual(error as? GuestMemoryError, .outsideRAM(address: size - UInt64(pageSize), length: 2 * pageSize))
        }
    }

    /// All of a huge-page guest's RAM is reserved when it is created: more than the pool holds is refused then,
    /// with the figures, and not found out later by a guest killed with SIGBUS.
    func testHugePagesBeyondThePoolAreRefusedWhenTheMemoryIsCreated() throws {
        if (try? makeMemoryFile(name: "probe", size: 0, hugePages: true)) == nil { throw XCTSkip("no hugetlbfs in this kernel") }
        let free = GuestMemory.freeHugePages()
        let size = max(GuestMemory.minimumSize, (free + 1) * GuestMemory.hugePageSize)
        XCTAssertThrowsError(try GuestMemory(size: size, backing: .hugePages)) { error in
            XCTAssertEqual(error as? GuestMemoryError, .notEnoughHugePages(needed: size / GuestMemory.hugePageSize, free: free))
            XCTAssertTrue("\(error)".contains("nr_hugepages"), "\(error)")
        }
    }

    /// A file's bytes copied into the memfd in the kernel (as a MicroVM save file is restored) read back through
    /// the mapping; a source that ends early is an error.
    func testFileRangesCopyIntoTheMemfd() throws {
        let memory = try GuestMemory(size: 16 << 20)
        let path = NSTemporaryDirectory() + "guest-memory-copy-\(getpid())"
        defer { unlink(path) }
        let file = try OwnedFileDescriptor(opening: path, flags: O_RDWR | O_CREAT | O_TRUNC)
        let bytes = (0 ..< 3 * pageSize).map { UInt8(truncatingIfNeeded: $0 * 7) }
        try bytes.withUnsafeBytes { try file.write(all: $0, at: 4096) }
        try memory.file.copy(bytes.count, from: file, at: 4096, to: 5 * Int64(pageSize))
        let copied = UnsafeRawBufferPointer(start: memory.pointer(guestPhysicalAddress: 5 * UInt64(pageSize), length: bytes.count), count: bytes.count)
        XCTAssertTrue(bytes.elementsEqual(copied))
        XCTAssertThrowsError(try memory.file.copy(bytes.count, from: file, at: 8192, to: 0)) { error in
            XCTAssertTrue("\(error)".contains("source ends"), "\(error)")
        }
    }
}
