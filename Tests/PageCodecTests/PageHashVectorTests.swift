import Foundation
import XCTest
import PageCodec

/// Known answers for the page hash and digest of protocol/stream.md §7, stored in
/// protocol/vectors/page-hash.json so that a second implementation can check itself.
/// MIGRATED_WRITE_VECTORS=1 rewrites the file.
final class PageHashVectorTests: XCTestCase {
    let file = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../../protocol/vectors/page-hash.json").standardized

    /// The pages: described in the JSON so that they can be rebuilt without this code.
    let cases: [(description: String, frame: UInt64, page: [UInt8])] = [
        ("all zero", 5, [UInt8](repeating: 0, count: 4096)),
        ("byte i = (1 + 7*i) mod 251", 0, (0..<4096).map { UInt8((1 + $0 * 7) % 251) }),
        ("byte i = (1 + 7*i) mod 251", 0x12345, (0..<4096).map { UInt8((1 + $0 * 7) % 251) }),
        ("zero except byte 4095 = 1", 0, [UInt8](repeating: 0, count: 4095) + [1]),
        ("byte i = i mod 256", 0xFFFF_FFFF_FFFF, (0..<4096).map { UInt8($0 & 0xFF) }),
        ("byte i = i mod 256, 16 KiB page", 7, (0..<16384).map { UInt8($0 & 0xFF) }),
    ]

    func hex(_ v: UInt64) -> String { let s = String(v, radix: 16); return String(repeating: "0", count: 16 - s.count) + s }

    func testPageHashKnownAnswers() throws {
        var digest = MemoryDigest()
        var entries: [[String: Any]] = []
        for c in cases {
            let h = c.page.withUnsafeBytes { PageHash.of(frame: c.frame, page: $0) }
            digest.add(h)
            entries.append(["page": c.description, "length": c.page.count, "frame": hex(c.frame),
                            "low": hex(h.low), "high": hex(h.high), "data_crc32c": String(FastCRC32C.checksum(c.page), radix: 16)])
        }
        let object: [String: Any] = [
            "description": "page_sum_128 page hashes (stream.md §7); digest = sums of all the cases' low and high halves",
            "cases": entries,
            "digest_low": hex(digest.low), "digest_high": hex(digest.high),
            "digest_bytes_hex": digest.bytes.map { String(format: "%02x", $0) }.joined(),
        ]
        let text = String(decoding: try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys]), as: UTF8.self) + "\n"
        if ProcessInfo.processInfo.environment["MIGRATED_WRITE_VECTORS"] == "1" {
            try text.write(to: file, atomically: true, encoding: .utf8)
            return
        }
        XCTAssertEqual(try String(contentsOf: file, encoding: .utf8), text)
        // The same answers through the portable path.
        CPUPaths.forcePortable(true)
        defer { CPUPaths.forcePortable(false) }
        for c in cases {
            let h = c.page.withUnsafeBytes { PageHash.of(frame: c.frame, page: $0) }
            XCTAssertTrue(entries.contains { $0["low"] as? String == hex(h.low) && $0["high"] as? String == hex(h.high) })
        }
    }
}
