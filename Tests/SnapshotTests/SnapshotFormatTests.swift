import Foundation
import MigrationWire
import PageCodec
import Snapshots
import TestSupport
import XCTest

/// The file format on its own: real files written and read back, damaged on purpose, without a guest.
final class SnapshotFormatTests: XCTestCase {
    /// Two regions with a gap, as MicroVM lays out guests above 3 GiB, kept small.
    let layout = GuestMemoryLayout(regions: [
        MemoryRegion(guestPhysicalAddress: 0, size: 4 << 20),
        MemoryRegion(guestPhysicalAddress: 8 << 20, size: 2 << 20),
    ])
    var directory: URL!

    override func setUpWithError() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("snapshot-format-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(at: directory)
    }

    func path(_ name: String) -> String { directory.appendingPathComponent(name).path }

    /// Guest memory as a plain array of pages, indexed like the snapshot's frames.
    struct Memory {
        var pages: [[UInt8]]
        init(frames: Int) { pages = Array(repeating: [UInt8](repeating: 0, count: 4096), count: frames) }

        /// Page `index` filled with text-like bytes derived from `seed` (compressible, distinct).
        mutating func stamp(_ index: Int, seed: Int) {
            pages[index] = (0 ..< 4096).map { UInt8(truncatingIfNeeded: ($0 / 7) &* 31 &+ seed &* 131 &+ index) | 0x20 }
        }
    }

    let devices = [DeviceState(componentID: DeviceComponent.kvmVM, instance: 0, componentVersion: 1, blob: ByteSlice(Array("state".utf8))),
                   DeviceState(componentID: DeviceComponent.vmmPrivateBase + 1, instance: 0, componentVersion: 1, blob: ByteSlice([1, 2, 3]))]

    /// Writes the pages at `indices` of `memory` (all of them for a full snapshot); a compressed file with a
    /// dictionary of the first of them unless `dictionary` is false.
    @discardableResult
    func write(_ memory: Memory, to name: String, format: SnapshotMemoryFormat = .plain, base: SnapshotBase? = nil,
               indices: [Int]? = nil, dictionary: Bool = true) throws -> (SnapshotHeader, SnapshotBase?) {
        let writer = try SnapshotWriter(path: path(name), layout: layout, kind: base == nil ? .full : .diff, memoryFormat: format, base: base)
        if dictionary, let first = (indices ?? Array(memory.pages.indices)).first(where: { memory.pages[$0].contains { $0 != 0 } }) {
            try writer.useDictionary(memory.pages[first])
        }
        for index in indices ?? Array(memory.pages.indices) {
            try memory.pages[index].withUnsafeBytes { try writer.write(pages: $0, firstIndex: index) }
        }
        let header = try writer.finish(deviceState: devices)
        return (header, writer.base(header: header))
    }

    func assertRestores(_ chain: SnapshotChain, to memory: Memory, file: StaticString = #filePath, line: UInt = #line) throws {
        let reader = ChainReader(chain)
        var page = [UInt8](repeating: 0, count: 4096)
        for index in memory.pages.indices {
            page = [UInt8](repeating: 0, count: 4096)
            _ = try page.withUnsafeMutableBytes { try reader.readPage(index: index, into: $0.baseAddress!) }
            XCTAssertEqual(page, memory.pages[index], "frame index \(index)", file: file, line: line)
        }
        XCTAssertNoThrow(try SnapshotVerifier.verify(chain), file: file, line: line)
    }

    func sampleMemory() -> Memory {
        var memory = Memory(frames: 1536)
        for index in stride(from: 0, to: 1536, by: 3) { memory.stamp(index, seed: 1) }
        return memory
    }

    func testFullSnapshotRoundTripsInBothFormats() throws {
        let memory = sampleMemory()
        for format in [SnapshotMemoryFormat.plain, .compressed] {
            let (header, _) = try write(memory, to: "full-\(format)", format: format)
            XCTAssertEqual(header.dataPages, 512)
            let chain = try SnapshotChain.open(path("full-\(format)"))
            XCTAssertEqual(chain.top.deviceState.map(\.blob.bytes), devices.map(\.blob.bytes))
            XCTAssertEqual(chain.top.layout, layout)
            try assertRestores(chain, to: memory)
        }
        let plainSize = try FileManager.default.attributesOfItem(atPath: path("full-plain"))[.size] as! Int
        let compressedSize = try FileManager.default.attributesOfItem(atPath: path("full-compressed"))[.size] as! Int
        XCTAssertLessThan(compressedSize * 4, plainSize, "text pages compress")
    }

    /// A compressed file written as a live save writes it: every page once in order, then later passes that write
    /// pages again (patched into their blocks), clear them (they stay data, of zeros), or give data to frames
    /// that had none (every block after them is cut again); a full snapshot, and a diff on top of it.
    func testCompressedFileTakesPagesAgainInLaterPasses() throws {
        for kind in [SnapshotKind.full, .diff] {
            var memory = sampleMemory()
            var base: SnapshotBase?
            if kind == .diff { base = try write(memory, to: "parent-\(kind)").1 }
            let writer = try SnapshotWriter(path: path("live-\(kind)"), layout: layout, kind: kind, memoryFormat: .compressed, base: base)
            func put(_ index: Int) throws { try memory.pages[index].withUnsafeBytes { try writer.write(pages: $0, firstIndex: index) } }
            // Pass 0: a diff starts from the pages dirtied since its parent, one of them cleared.
            if kind == .diff { memory.stamp(9, seed: 7); memory.pages[12] = [UInt8](repeating: 0, count: 4096) }
            for index in kind == .full ? Array(memory.pages.indices) : [9, 12, 600] { try put(index) }
            // Later passes, out of order and repeated.
            var later: [Int] = []
            memory.stamp(600, seed: 2); later.append(600)
            memory.stamp(3, seed: 2); later.append(3)
            memory.pages[6] = [UInt8](repeating: 0, count: 4096); later.append(6)
            memory.stamp(1, seed: 2); later.append(1)       // data where there was none: the blocks after it move
            memory.stamp(12, seed: 3); later.append(12)
            memory.stamp(600, seed: 3); later.append(600)   // the same page again: the last write wins
            memory.stamp(1535, seed: 2); later.append(1535)
            for index in later { try put(index) }
            let header = try writer.finish(deviceState: devices)
            XCTAssertEqual(header.memoryFormat, .compressed)
            let chain = try SnapshotChain.open(path("live-\(kind)"))
            try assertRestores(chain, to: memory)
            // The same memory written once, in order, has the same digest.
            let once = kind == .full ? try write(memory, to: "once-\(kind)", format: .compressed).0 : nil
            if let once { XCTAssertEqual(once.memoryDigest, header.memoryDigest) }
        }
    }

    /// A compressed file with a dictionary is version 2, smaller than without, and restores; one without stays
    /// version 1, which older builds read; a version 1 file that lists a dictionary is refused.
    func testCompressedFileWithADictionaryIsVersionTwo() throws {
        let memory = sampleMemory()
        let (with, _) = try write(memory, to: "with", format: .compressed)
        let (without, _) = try write(memory, to: "without", format: .compressed, dictionary: false)
        XCTAssertEqual(with.version, 2)
        XCTAssertEqual(without.version, 1)
        XCTAssertEqual(with.memoryDigest, without.memoryDigest)
        try assertRestores(try SnapshotChain.open(path("with")), to: memory)
        try assertRestores(try SnapshotChain.open(path("without")), to: memory)
        let size = { (name: String) in try FileManager.default.attributesOfItem(atPath: self.path(name))[.size] as! Int }
        let memoryPart = { (name: String) in try SnapshotFile(path: self.path(name)).header.part(.memory)!.length }
        XCTAssertLessThan(try memoryPart("with"), try memoryPart("without"), "blocks refer back to the dictionary")
        XCTAssertGreaterThan(try size("with"), 0)
        // Version 1 written over version 2, the header checksum made right again: the dictionary is refused.
        var bytes = try Data(contentsOf: URL(fileURLWithPath: path("with")))
        bytes[8] = 1
        let crc = [UInt8](bytes[0 ..< 4092]).withUnsafeBytes { FastCRC32C.update(0, $0) }
        withUnsafeBytes(of: crc.littleEndian) { bytes.replaceSubrange(4092 ..< 4096, with: $0) }
        try bytes.write(to: URL(fileURLWithPath: path("v1-with-dictionary")))
        XCTAssertThrowsError(try SnapshotFile(path: path("v1-with-dictionary"))) { error in
            XCTAssertTrue("\(error)".contains("dictionary"), "\(error)")
        }
    }

    func testConvertKeepsIdentityAndContents() throws {
        let memory = sampleMemory()
        let (header, _) = try write(memory, to: "a")
        let compressed = try SnapshotConvert.convert(path("a"), to: path("b"), memoryFormat: .compressed)
        let plain = try SnapshotConvert.convert(path("b"), to: path("c"), memoryFormat: .plain)
        XCTAssertEqual(compressed.id, header.id)
        XCTAssertEqual(plain.memoryDigest, header.memoryDigest)
        try assertRestores(try SnapshotChain.open(path("c")), to: memory)
    }

    /// A full snapshot, five diffs (pages written, pages cleared), merged, and a full one of the last state.
    func testChainOfDiffsRestoresMergesAndRefusesTheWrongParent() throws {
        var memory = sampleMemory()
        var (_, base) = try write(memory, to: "0-full")
        for step in 1 ... 5 {
            var changed: [Int] = []
            for index in stride(from: step * 7, to: 1536, by: 50) { memory.stamp(index, seed: step * 10); changed.append(index) }
            let cleared = step * 3 // a page that held data becomes zero
            memory.pages[cleared] = [UInt8](repeating: 0, count: 4096)
            changed.append(cleared)
            let format: SnapshotMemoryFormat = step % 2 == 0 ? .compressed : .plain
            (_, base) = try write(memory, to: "\(step)-diff", format: format, base: base, indices: changed.sorted())
        }
        let chain = try SnapshotChain.open(path("5-diff"))
        XCTAssertEqual(chain.files.count, 6)
        try assertRestores(chain, to: memory)
        try write(memory, to: "same-moment-full")
        XCTAssertEqual(try SnapshotCompare.differences(chain, try SnapshotChain.open(path("same-moment-full"))), [])

        try SnapshotConvert.merge(chain, to: path("merged"))
        try assertRestores(try SnapshotChain.open(path("merged")), to: memory)

        // Diff 3 on top of diff 1 (skipping 2): refused by id.
        XCTAssertThrowsError(try SnapshotChain.open(path("3-diff"), parents: [path("1-diff")])) { error in
            guard case SnapshotError.chain(let why) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(why.contains("was taken on top of"), why)
        }
        let differences = try SnapshotCompare.differences(try SnapshotChain.open(path("1-diff")), chain)
        XCTAssertFalse(differences.isEmpty)
    }

    func testEveryPartDetectsAFlippedByte() throws {
        for format in [SnapshotMemoryFormat.plain, .compressed] {
            let name = "flip-\(format)"
            try write(sampleMemory(), to: name, format: format)
            let original = try Data(contentsOf: URL(fileURLWithPath: path(name)))
            let file = try SnapshotFile(path: path(name))
            var targets: [(String, Int)] = [("header", 40)]
            for part in file.header.parts where part.length > 0 {
                // Memory: a byte inside the first data page (plain) or the first block (compressed).
                let offset = part.type == .memory && format == .plain ? Int(part.offset) + file.dataIndices[0] * 4096 + 100 : Int(part.offset) + Int(part.length) / 2
                targets.append(("\(part.type)", offset))
            }
            for (expected, offset) in targets {
                var damaged = original
                damaged[offset] ^= 0x40
                let damagedPath = path("\(name)-damaged")
                try? FileManager.default.removeItem(atPath: damagedPath)
                try damaged.write(to: URL(fileURLWithPath: damagedPath))
                XCTAssertThrowsError(try SnapshotVerifier.verify(try SnapshotChain.open(damagedPath)), "\(format) \(expected)") { error in
                    let text = "\(error)"
                    let named = expected == "memory" ? text.contains("memory") : text.contains(expected)
                    XCTAssertTrue(named, "flipping a byte of \(expected) in a \(format) file gave: \(text)")
                }
            }
        }
    }

    func testTruncatedAndForeignFilesGetClearErrors() throws {
        try write(sampleMemory(), to: "whole")
        let data = try Data(contentsOf: URL(fileURLWithPath: path("whole")))
        for length in [0, 100, 4096, 8192, data.count - 1] {
            try data.prefix(length).write(to: URL(fileURLWithPath: path("cut")))
            XCTAssertThrowsError(try SnapshotFile(path: path("cut")), "\(length) bytes") { error in
                guard case SnapshotError.truncated = error else { return XCTFail("\(length) bytes: \(error)") }
            }
        }
        try Data(repeating: 0x7f, count: 8192).write(to: URL(fileURLWithPath: path("foreign")))
        XCTAssertThrowsError(try SnapshotFile(path: path("foreign"))) { error in
            guard case SnapshotError.notASnapshot = error else { return XCTFail("\(error)") }
        }
    }

    func testAFailedWriteLeavesNothingAndAnExistingFileIsKept() throws {
        try write(sampleMemory(), to: "kept")
        XCTAssertThrowsError(try SnapshotWriter(path: path("kept"), layout: layout, kind: .full))
        let writer = try SnapshotWriter(path: path("abandoned"), layout: layout, kind: .full)
        try [UInt8](repeating: 9, count: 4096).withUnsafeBytes { try writer.write(pages: $0, firstIndex: 0) }
        writer.discard()
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: directory.path), ["kept"])
    }

    /// A disk that fills up while pages are written: a clear error, and no file of any name left behind.
    func testFullDiskGivesAClearErrorAndLeavesNoFile() throws {
        let disk = try SmallDisk(at: directory.appendingPathComponent("small-disk").path, size: "1m")
        defer { disk.unmount() }
        let target = disk.path + "/snap"
        XCTAssertThrowsError(try {
            let writer = try SnapshotWriter(path: target, layout: layout, kind: .full)
            let memory = sampleMemory()
            for index in memory.pages.indices { try memory.pages[index].withUnsafeBytes { try writer.write(pages: $0, firstIndex: index) } }
            try writer.finish(deviceState: devices)
        }()) { error in
            XCTAssertTrue("\(error)".contains("No space left on device"), "\(error)")
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: disk.path), [])
    }
}
