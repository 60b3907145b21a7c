import Foundation
import KVMBackend
import MigrationWire
import XCTest
@testable import XenAdapter

/// Images from the writer pass Xen's own verifier and read back; every way an image can be bad is refused
/// with its byte offset.
final class XenImageFormatTests: XenFileTestCase {
    func testPlainSavePassesXenVerifierAndReadsBack() throws {
        let file = path("plain.xl")
        let frames: [UInt64] = Array(0 ..< 300) + [4000, 16383]
        try writeImage(to: file, frames: frames)
        let (ok, output) = try xenVerifier(file)
        XCTAssertTrue(ok, output)
        XCTAssertTrue(output.contains("Libxc Record: HVM context"), output)

        let image = try XenImage(path: file)
        XCTAssertEqual(image.layout.regions, [MemoryRegion(guestPhysicalAddress: 0, size: 64 << 20)])
        XCTAssertEqual(image.xenVersion.major, 4)
        var seen: [UInt64] = []
        image.forEachDataFrame { seen.append($0) }
        XCTAssertEqual(seen, frames)
        for f in frames { XCTAssertEqual(Array(UnsafeRawBufferPointer(start: image.page(frame: f), count: 4096)), pattern(frame: f, pass: 0)) }
        XCTAssertNil(image.page(frame: 5000))
        XCTAssertEqual(image.domainState, XenStateMapping.domainState(from: syntheticMachine()))
        XCTAssertEqual(image.carriedState?.count, 1)
    }

    func testLiveStreamWithRepeatedPagesPassesVerifierAndLastCopyWins() throws {
        let file = path("live.xl")
        let resent: [UInt64] = [1, 2, 3, 200]
        try writeImage(to: file, frames: Array(0 ..< 256), passes: 4, resent: resent, invalid: [7])
        let (ok, output) = try xenVerifier(file)
        XCTAssertTrue(ok, output)
        let image = try XenImage(path: file)
        for f in resent { XCTAssertEqual(Array(UnsafeRawBufferPointer(start: image.page(frame: f), count: 4096)), pattern(frame: f, pass: 3)) }
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: image.page(frame: 9), count: 4096)), pattern(frame: 9, pass: 0))
        XCTAssertNil(image.page(frame: 7), "an XTAB after the data takes the frame away")
        XCTAssertEqual(image.pageEntries, 256 + 3 * 4 + 1)
    }

    /// What real Xen writes and our writer does not: HVM_PARAMS before HVM_CONTEXT, optional records in
    /// both streams, emulator records, and toolstack special pages above RAM.
    func testReaderAcceptsWhatRealXenWrites() throws {
        let file = path("base.xl")
        try writeImage(to: file, frames: [0, 1])
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: file)))
        let (_, _, recs) = records(bytes)
        let context = recs.first { $0.stream == .libxc && $0.type == 9 }!
        let params = recs.first { $0.stream == .libxc && $0.type == 10 }!
        XCTAssertEqual(context.end, params.offset)
        // swap the two records, and add an optional libxc record and a special page before END
        let contextBytes = Array(bytes[context.offset ..< context.end]), paramsBytes = Array(bytes[params.offset ..< params.end])
        let special = pageDataBody(frame: 0xFEFFC, contents: [UInt8](repeating: 0xAB, count: 4096))
        let inserted = paramsBytes + contextBytes + record(type: 0x8000_0042, body: [1, 2, 3]) + record(type: 1, body: special)
        bytes.replaceSubrange(context.offset ..< params.end, with: inserted)
        // an emulator context and an optional libxl record before the libxl END
        var emulator = [UInt8]()
        withUnsafeBytes(of: UInt32(2)) { emulator += $0 }
        withUnsafeBytes(of: UInt32(0)) { emulator += $0 }
        emulator += Array("QEVM".utf8)
        // and xenstore data, which Xen 4.17's verifier wrongly refuses when non-empty
        var xenstore = [UInt8]()
        withUnsafeBytes(of: UInt32(2)) { xenstore += $0 }
        withUnsafeBytes(of: UInt32(0)) { xenstore += $0 }
        xenstore += Array("physmap/1/start_addr\0f0000000\0".utf8)
        bytes.replaceSubrange(bytes.count - 8 ..< bytes.count - 8,
                              with: record(type: 2, body: xenstore) + record(type: 3, body: emulator) + record(type: 0x8000_0001, body: [9]))
        let image = try XenImage(bytes: bytes.withUnsafeBytes { $0 })
        XCTAssertEqual(image.emulatorRecords.map(\.type), [.emulatorXenstoreData, .emulatorContext])
        XCTAssertEqual(image.emulatorRecords.last?.data, Array("QEVM".utf8))
        XCTAssertEqual(image.optionalRecords.map(\.type), [0x8000_0042, 0x8000_0001])
        XCTAssertEqual(image.specialPages.keys.sorted(), [0xFEFFC])
        XCTAssertEqual(image.hvmParamsCount, 1)
    }

    /// The libxl stream starts wherever the xl header ends: the JSON's length decides the alignment.
    func testUnalignedLibxlStreamIsRead() throws {
        for name in ["a", "ab", "abc", "abcd", "abcde"] {
            let file = path("\(name).xl")
            let fd = open(file, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            let writer = try XenImageWriter(fileDescriptor: fd, configuration: XenDomainConfiguration(name: name, vcpus: 2, memoryBytes: 64 << 20, mmioHoleBytes: 1 << 30), carriedState: [])
            let domain = XenStateMapping.domainState(from: syntheticMachine())
            try writer.writeStaticData(cpuid: domain.cpuidPolicy, msrs: [])
            try writer.writeDomainState(domain)
            try writer.finish()
            close(fd)
            let image = try XenImage(path: file)
            XCTAssertEqual(image.configuration.name, name)
            XCTAssertNil(image.carriedState)
        }
    }

    // MARK: refusals

    func refused(_ bytes: [UInt8], at offset: Int?, _ reason: String, file: StaticString = #filePath, line: UInt = #line) {
        do {
            _ = try XenImage(bytes: bytes.withUnsafeBytes { $0 })
            XCTFail("accepted an image that should fail with \(reason)", file: file, line: line)
        } catch let error as XenImageError {
            XCTAssertTrue(error.reason.contains(reason), "\(error)", file: file, line: line)
            if let offset { XCTAssertEqual(error.offset, UInt64(offset), "\(error)", file: file, line: line) }
            XCTAssertLessThanOrEqual(error.offset, UInt64(bytes.count), file: file, line: line)
        } catch {
            XCTFail("untyped error \(error)", file: file, line: line)
        }
    }

    func testEveryCorruptionIsRefusedWithItsOffset() throws {
        let file = path("good.xl")
        try writeImage(to: file, frames: Array(0 ..< 20))
        let good = [UInt8](try Data(contentsOf: URL(fileURLWithPath: file)))
        let (libxl, libxc, recs) = records(good)
        func patched(_ at: Int, _ values: [UInt8]) -> [UInt8] { var b = good; b.replaceSubrange(at ..< at + values.count, with: values); return b }
        func le32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
        let page = recs.first { $0.type == 1 && $0.stream == .libxc }!
        let tsc = recs.first { $0.type == 8 }!
        let context = recs.first { $0.type == 9 }!
        let staticEnd = recs.first { $0.type == 16 }!

        refused(patched(0, [0x00]), at: 0, "bad magic")
        refused(patched(32, [1, 2, 3, 4]), at: 32, "byte order")
        refused(patched(36, le32(0x7)), at: 36, "unknown mandatory flags")
        refused(patched(40, le32(1)), at: 40, "unknown optional flags")
        refused(patched(libxl, [0]), at: libxl, "bad magic")
        refused(patched(libxl + 15, [1]), at: libxl + 12, "big-endian")
        refused(patched(libxc, [0]), at: libxc, "bad magic")
        refused(patched(libxc + 17, [1]), at: libxc + 16, "big-endian")
        refused(patched(libxc + 24, le32(1)), at: libxc + 24, "PV")
        // padding: TSC_INFO is 24 bytes, none; the HVM_PARAMS record of 24 neither; use the END of a body with padding
        // padding: every record we write is a multiple of 8, so insert a 3-byte optional one before libxc END
        let libxcEnd = recs.first { $0.stream == .libxc && $0.type == 0 }!
        var padded = good
        padded.insert(contentsOf: record(type: 0x8000_0042, body: [1, 2, 3]), at: libxcEnd.offset)
        XCTAssertNoThrow(try XenImage(bytes: padded.withUnsafeBytes { $0 }))
        padded[libxcEnd.offset + 8 + 5] = 1
        refused(padded, at: libxcEnd.offset + 8 + 5, "non-zero padding")
        refused(patched(page.offset, le32(0x13)), at: page.offset, "unknown mandatory libxc record")
        refused(patched(recs.last!.offset, le32(0x6)), at: recs.last!.offset, "unknown mandatory libxl record")
        refused(patched(page.offset + 8, le32(21)), at: page.offset + 8, "PAGE_DATA count")
        refused(patched(page.offset + 8, le32(19)), at: page.offset + 8, "inconsistent")
        refused(patched(page.offset + 16, withUnsafeBytes(of: UInt64(0x10_0000)) { Array($0) }), at: page.offset + 16, "outside the guest")
        refused(patched(page.offset + 16 + 6, [0x10]), at: page.offset + 16, "reserved bits")
        refused(patched(page.offset + 16 + 7, [0x50]), at: page.offset + 16, "unknown page type")
        refused(patched(tsc.offset + 4, le32(20)), at: tsc.offset, "X86_TSC_INFO of 20 bytes")
        refused(patched(context.offset + 8, [0xFF]), at: context.offset + 8, "does not open with HEADER")
        refused(patched(context.offset + 16, [0]), at: context.offset + 16, "HEADER magic")
        refused(patched(context.offset + 8 + 32 + 4, le32(1000)), at: context.offset + 8 + 32, "length 1000")
        // PAGE_DATA before STATIC_DATA_END: swap STATIC_DATA_END (8 bytes) to just after the first PAGE_DATA
        var early = good
        early.removeSubrange(staticEnd.offset ..< staticEnd.end)
        early.insert(contentsOf: good[staticEnd.offset ..< staticEnd.end], at: page.end - 8)
        refused(early, at: staticEnd.offset, "PAGE_DATA before STATIC_DATA_END")
        // truncation anywhere: a sample of cut points, each refused within the file
        for cut in [10, 47, 60, libxl + 3, libxc + 20, page.offset + 100, context.offset + 500, good.count - 1] {
            refused(Array(good[0 ..< cut]), at: nil, "truncated")
        }
        refused(good + [0, 0, 0, 0, 0, 0, 0, 0], at: good.count, "after the libxl END")
        var carriedBad = good
        carriedBad[48 + 4 + Int(good.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 48, as: UInt32.self) }) + 20] ^= 1
        refused(carriedBad, at: nil, "CRC32C")
    }

    /// Xen 4.21's LAPIC entry is 32 bytes (pending_esr); older ones 24. Both are read, and kept as they are.
    func testHVMContextAcceptsBothLAPICSizesAndKeepsUnknownEntries() throws {
        var context = XenStateMapping.domainState(from: syntheticMachine()).hvmContext
        let i = context.entries.firstIndex { $0.typecode == HVMSaveType.lapic }!
        context.entries[i].data += [0, 0, 0, 0, 0, 0, 0, 0]
        context.entries.append(HVMSaveEntry(typecode: 99, instance: 3, data: [1, 2, 3]))
        let parsed = try context.encoded().withUnsafeBytes { try HVMContext.parse($0, base: 0) }
        XCTAssertEqual(parsed, context)
        XCTAssertEqual(parsed.encoded(), context.encoded())
    }

    func testCheckpointRecordIsRefused() throws {
        let file = path("checkpoint.xl")
        try writeImage(to: file, frames: [0])
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: file)))
        let end = records(bytes).records.first { $0.stream == .libxc && $0.type == 0 }!
        bytes.insert(contentsOf: record(type: 0x0E, body: []), at: end.offset)
        refused(bytes, at: end.offset, "checkpointed")
    }

    func testMappingFromXenRecordsRoundTripsTheHVMContext() throws {
        let domain = XenStateMapping.domainState(from: syntheticMachine())
        let machine = try XenStateMapping.machineState(from: domain)
        XCTAssertEqual(XenStateMapping.domainState(from: machine).hvmContext, domain.hvmContext)
        XCTAssertEqual(machine.vcpus.map(\.registers.rip), [0x10_0000, 0x10_0001])
        XCTAssertEqual(machine.vcpus[0].specialRegisters.gs.base, 0x7000)
        XCTAssertEqual(machine.vcpus[0].modelSpecificRegisters.first { $0.index == 0xC000_0082 }?.data, 0xFFFF_8000_0000_1000)
    }
}

extension XenImage {
    var hvmParamsCount: Int { domainState.hvmParams.count }
}
