import Foundation
import MigrationWire
import Snapshots
import TestSupport
import XCTest
@testable import XenAdapter

/// Xen's special pages (xenstore, console and ioreq rings near 0xFEFF_F000, outside RAM) survive
/// `vmsnap convert` to a native snapshot and back, byte for byte, and the conversion names every one of
/// them. No KVM needed.
final class XenSpecialPagesTests: XenFileTestCase {
    func page(_ image: XenImage, _ frame: UInt64) -> [UInt8]? {
        image.special(frame) ?? image.page(frame: frame).map { Array(UnsafeRawBufferPointer(start: $0, count: 4096)) }
    }

    /// The JSON document of a `vmsnap convert --json`; its special frames as (pfn, contents).
    func convert(_ arguments: [String]) async throws -> (json: [String: Any], frames: [String]) {
        let run = try await runTool("vmsnap", ["convert"] + arguments + ["--json"])
        XCTAssertEqual(run.status, 0, run.text)
        let json = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(run.text.utf8)) as? [String: Any], run.text)
        let frames = try XCTUnwrap(json["special_frames"] as? [[String: String]], run.text)
        XCTAssertEqual((json["dropped_frames"] as? [Any])?.count, 0, run.text)
        return (json, frames.map { "\($0["pfn"]!) \($0["contents"]!)" })
    }

    func testSpecialPagesSurviveXenToNativeToXen() async throws {
        let original = path("xen.xl")
        let ram: [UInt64] = Array(0 ..< 64) + [16383]
        let special: [UInt64] = [0xFEFF0, 0xFEFFC, 0xFEFFF]
        // A live stream: 0xFEFFC is sent twice (the last copy counts), two frames are only allocated, and one
        // is XTAB (nothing there), as in real images.
        try writeImage(to: original, frames: ram + special, passes: 2, resent: [3, 0xFEFFC], invalid: [0xFEFF5],
                       allocateOnly: [0xFEFF1, 0xFEFF8])
        let xen = try XenImage(path: original)
        XCTAssertEqual(xen.specialPages.keys.sorted(), special)
        XCTAssertEqual(xen.specialAllocateOnlyFrames, [0xFEFF1, 0xFEFF8])
        XCTAssertEqual(page(xen, 0xFEFFC), pattern(frame: 0xFEFFC, pass: 1))
        let expected = ["0xfeff0 page", "0xfeffc page", "0xfefff page", "0xfeff1 allocate-only", "0xfeff8 allocate-only"]

        // Xen -> native: the frames become one device state; the snapshot's memory is the RAM alone.
        let native = path("native.snap")
        let there = try await convert([original, native, "--to", "native"])
        XCTAssertEqual(there.frames, expected)
        XCTAssertEqual(there.json["special_frames_are"] as? String, "kept as device state 0x10005850 (Xen special pages)")
        let snapshot = try SnapshotFile(path: native)
        XCTAssertEqual(snapshot.layout, xen.layout, "the special frames are not RAM: MicroVM's layout check still holds")
        let states = snapshot.deviceState.filter { $0.componentID == XenDeviceComponent.specialPages }
        XCTAssertEqual(states.count, 1)
        XCTAssertEqual(try XenSpecialPages(deviceState: states[0]), XenSpecialPages(image: xen))

        // native -> Xen: page data again, byte for byte; the carried chunk does not hold them twice.
        let back = path("back.xl")
        let returned = try await convert([native, back, "--to", "xen"])
        XCTAssertEqual(returned.frames, expected)
        let again = try XenImage(path: back)
        XCTAssertEqual(again.specialPages.keys.sorted(), special)
        XCTAssertEqual(again.specialAllocateOnlyFrames, xen.specialAllocateOnlyFrames)
        for frame in ram + special + [0xFEFF1, 0xFEFF5, 0xFEFF8, 100] {
            XCTAssertEqual(page(again, frame), page(xen, frame), "frame 0x\(String(frame, radix: 16))")
        }
        XCTAssertEqual(again.carriedState?.map(\.componentID), [DeviceComponent.kvmVM])
        if let (ok, output) = try? xenVerifier(back) { XCTAssertTrue(ok, output) }

        // And once more to native: the same blob, so the round trip is stable.
        _ = try await convert([back, path("again.snap"), "--to", "native"])
        XCTAssertEqual(try SnapshotFile(path: path("again.snap")).deviceState.filter { $0.componentID == XenDeviceComponent.specialPages }
            .map { try XenSpecialPages(deviceState: $0) }, [XenSpecialPages(image: xen)])

        // The human output names every frame too.
        let text = try await runTool("vmsnap", ["convert", original, native, "--to", "native", "--overwrite"])
        XCTAssertEqual(text.status, 0, text.text)
        XCTAssertTrue(text.text.contains("Xen special frames outside RAM: 5, kept as device state 0x10005850 (Xen special pages): "
            + "0xfeff0, 0xfeffc, 0xfefff, 0xfeff1 (allocate-only), 0xfeff8 (allocate-only); dropped: none"), text.text)
    }

    func testImageWithoutSpecialPagesConvertsWithoutTheBlob() async throws {
        let original = path("plain.xl")
        try writeImage(to: original, frames: Array(0 ..< 8))
        let there = try await convert([original, path("plain.snap"), "--to", "native"])
        XCTAssertEqual(there.frames, [])
        XCTAssertEqual(there.json["special_frames_are"] as? String, "none in the input")
        XCTAssertFalse(try SnapshotFile(path: path("plain.snap")).deviceState.contains { $0.componentID == XenDeviceComponent.specialPages })
    }

    /// The blob becomes page data of a Xen image, so anything our writer would not produce is refused.
    func testMalformedBlobIsRefused() throws {
        let pages = XenSpecialPages(pages: [.init(frame: 0xFEFFC, bytes: [UInt8](repeating: 7, count: 4096))], allocateOnly: [0xFEFF1])
        let good = pages.deviceState.blob.withUnsafeBytes { Array($0) }
        XCTAssertEqual(try XenSpecialPages(deviceState: pages.deviceState), pages)
        func refused(_ blob: [UInt8], version: UInt32 = 1, _ reason: String, line: UInt = #line) {
            let state = DeviceState(componentID: XenDeviceComponent.specialPages, instance: 0, componentVersion: version, blob: ByteSlice(blob))
            XCTAssertThrowsError(try XenSpecialPages(deviceState: state), line: line) {
                XCTAssertTrue("\($0)".contains(reason), "\($0)", line: line)
            }
        }
        func word(_ at: Int, _ value: UInt64) -> [UInt8] {
            var b = good
            withUnsafeBytes(of: value.littleEndian) { b.replaceSubrange(at ..< at + 8, with: $0) }
            return b
        }
        refused(good, version: 2, "newer")
        refused(Array(good.prefix(4)), "no header")
        refused(word(8, 0x10_0000), "not a frame of the special window")
        refused(word(8, 0xFEFFC | 1 << 60), "page type 1")
        refused(word(16, 0xFEFFC | 0xE << 60), "named twice")
        refused(word(16, 0xFEFF1), "cut short")
        refused(Array(good.dropLast()), "cut short")
        refused(good + [0], "bytes after the last page")
        var reserved = good
        reserved[5] = 1
        refused(reserved, "reserved")
    }

    /// A special frame inside RAM (a configuration with a tiny MMIO hole) would overwrite a guest page.
    func testSpecialFrameInsideRAMIsRefusedByTheWriter() throws {
        let fd = open(path("clash.xl"), O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        defer { close(fd) }
        let writer = try XenImageWriter(fileDescriptor: fd, configuration: XenDomainConfiguration(name: "t", vcpus: 1, memoryBytes: 64 << 20, mmioHoleBytes: 1 << 30), carriedState: [])
        let pages = XenSpecialPages(pages: [], allocateOnly: [0xFEFF1])
        let layout = GuestMemoryLayout(regions: [MemoryRegion(guestPhysicalAddress: 0, size: 0xFF00_0000)])
        XCTAssertThrowsError(try pages.write(to: writer, layout: layout)) { XCTAssertTrue("\($0)".contains("lies in the guest's RAM"), "\($0)") }
    }
}

extension XenImage {
    func special(_ frame: UInt64) -> [UInt8]? {
        specialPages[frame].map { Array(UnsafeRawBufferPointer(start: $0, count: 4096)) }
    }
}
