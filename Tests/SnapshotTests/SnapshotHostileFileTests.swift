import Foundation
import MigrationWire
import PageCodec
import Snapshots
import XCTest

/// Random damage to real snapshot files: every read must end in a SnapshotError, never a crash, a hang or an
/// allocation the file's size does not justify. Half of the damaged files are "resealed" (their header and
/// part checksums recomputed after the damage), so that the reader's checks behind the checksums are reached.
/// CI runs a short round; SNAPSHOT_FUZZ_ITERATIONS sets a longer one.
final class SnapshotHostileFileTests: XCTestCase {
    let iterations = Int(ProcessInfo.processInfo.environment["SNAPSHOT_FUZZ_ITERATIONS"] ?? "") ?? 400

    func testRandomDamageIsRefusedCleanly() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("snapshot-hostile-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let layout = GuestMemoryLayout(regions: [MemoryRegion(guestPhysicalAddress: 0, size: 1 << 20), MemoryRegion(guestPhysicalAddress: 4 << 20, size: 1 << 20)])
        var originals: [Data] = []
        for format in [SnapshotMemoryFormat.plain, .compressed] {
            let path = directory.appendingPathComponent("\(format)").path
            let writer = try SnapshotWriter(path: path, layout: layout, kind: .full, memoryFormat: format)
            for index in stride(from: 0, to: 512, by: 3) {
                let page = (0 ..< 4096).map { UInt8(truncatingIfNeeded: $0 / 9 &+ index) | 0x40 }
                try page.withUnsafeBytes { try writer.write(pages: $0, firstIndex: index) }
            }
            try writer.finish(deviceState: [DeviceState(componentID: 2, instance: 0, componentVersion: 1, blob: ByteSlice([1, 2, 3, 4, 5]))])
            originals.append(try Data(contentsOf: URL(fileURLWithPath: path)))
        }
        var random = SplitMix(seed: 0x5eed)
        let damaged = directory.appendingPathComponent("damaged").path
        var refused = 0
        for iteration in 0 ..< iterations {
            var bytes = originals[iteration % originals.count]
            let metadataEnd = bytes.count // parts may lie anywhere; bias towards the header and the file's tail
            for _ in 0 ..< 1 + Int(random.next() % 8) {
                let offset = random.next() % 2 == 0 ? Int(random.next() % 4096) : Int(random.next() % UInt64(metadataEnd))
                bytes[offset] = UInt8(truncatingIfNeeded: random.next())
            }
            if random.next() % 8 == 0 { bytes = bytes.prefix(Int(random.next() % UInt64(bytes.count))) }
            if iteration % 2 == 1 { reseal(&bytes) }
            try bytes.write(to: URL(fileURLWithPath: damaged))
            if isRefused(damaged) { refused += 1 }
        }
        XCTAssertGreaterThan(refused, iterations / 2, "most damage must be detected")
    }

    /// Whether the file is refused (every error these calls throw is a SnapshotError: their signatures say so).
    private func isRefused(_ path: String) -> Bool {
        do throws(SnapshotError) {
            _ = try SnapshotVerifier.verify(try SnapshotChain(files: [try SnapshotFile(path: path)]))
            return false
        } catch {
            return true
        }
    }

    /// Recomputes the header's part checksums and its own checksum, as a hostile writer would.
    private func reseal(_ bytes: inout Data) {
        guard bytes.count >= 4096 else { return }
        let parts = min(Int(bytes.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 20, as: UInt32.self) }), 16)
        for part in 0 ..< parts {
            let entry = 512 + part * 32
            let offset = bytes.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: entry + 8, as: UInt64.self) }
            let length = bytes.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: entry + 16, as: UInt64.self) }
            guard offset < UInt64(bytes.count), length <= UInt64(bytes.count) - offset, length < 64 << 20 else { continue }
            let crc = bytes[Int(offset) ..< Int(offset + length)].withUnsafeBytes { FastCRC32C.update(0, $0) }
            bytes.replaceSubrange(entry + 24 ..< entry + 28, with: littleEndianBytes(crc))
        }
        let crc = bytes[0 ..< 4092].withUnsafeBytes { FastCRC32C.update(0, $0) }
        bytes.replaceSubrange(4092 ..< 4096, with: littleEndianBytes(crc))
    }
}

private func littleEndianBytes(_ value: UInt32) -> [UInt8] { withUnsafeBytes(of: value.littleEndian) { Array($0) } }

/// A small deterministic generator, so that a failing damage can be replayed.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
