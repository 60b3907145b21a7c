import XCTest
@testable import MigrationWire

/// How the decoder moves between buffers while a consumer still holds slices of earlier ones, as the receiver's
/// page writers do: the bytes must come out unchanged, moves should fall on record boundaries, and buffers should
/// be reused once released.
final class DecoderBufferTests: XCTestCase {
    /// Decodes `batches` batches of 1-7 pages through `receive(maximum:)` from a "socket" that returns at most
    /// `readSize` bytes per call, holding the last `held` batches before checking and releasing each.
    private func decodeHolding(batches count: Int, maximum: Int, readSize: Int, held: Int) throws -> StreamDecoder {
        let pageCounts = (0..<count).map { 1 + ($0 * 5) % 7 }
        let bytes = stream { enc, out in
            for (i, n) in pageCounts.enumerated() {
                batch(&enc, &out, pass: 0, pages: (0..<n).map { (UInt64((i % 20) * 8 + $0), patternPage(i * 8 + $0)) })
            }
            enc.encodeEnd(endRecord, into: &out)
        }
        let d = StreamDecoder()
        let source = ChunkedSource(bytes, sizes: [readSize])
        var window: [(index: Int, batch: PageBatch)] = []
        var decoded = 0
        func release(_ entry: (index: Int, batch: PageBatch)) {
            XCTAssertEqual(entry.batch.pages.count, pageCounts[entry.index])
            for p in 0..<entry.batch.pages.count {
                entry.batch.withPageBytes(p) {
                    XCTAssertTrue($0.elementsEqual(patternPage(entry.index * 8 + p)), "batch \(entry.index) page \(p)")
                }
            }
        }
        while true {
            let n = d.receive(maximum: maximum, source.read)
            while let e = try d.next() {
                guard case .pageBatch(let b) = e else { continue }
                window.append((decoded, b))
                decoded += 1
                if window.count > held { release(window.removeFirst()) }
            }
            if n == 0 { break }
        }
        try d.finish()
        window.forEach(release)
        XCTAssertEqual(decoded, count)
        return d
    }

    func testBuffersAreReusedAndMovesFallOnRecordBoundaries() throws {
        // Records of 4-29 KiB, reads of up to 16 KiB into 64 KiB buffers, three batches held at a time.
        let d = try decodeHolding(batches: 400, maximum: 16 << 10, readSize: 16 << 10, held: 3)
        // 400 batches of 4 pages on average take about 6.5 MiB, a hundred buffers' worth: reused, not allocated.
        XCTAssertLessThanOrEqual(d.storagesAllocated, 6)
        // Near a buffer's end the decoder reads a record's header first and the record only if it fits, so little
        // is carried into the next buffer (12.7 KB here). Reading on regardless carries a partial record at nearly
        // every move: 1.5 MB here.
        XCTAssertLessThan(d.carriedByteCount, 65_000, "carried \(d.carriedByteCount) bytes")
    }

    func testShortReadsAndLongHoldsStillDecodeEverything() throws {
        // Reads that stop anywhere, and more held batches than the decoder keeps buffers for.
        let d = try decodeHolding(batches: 150, maximum: 8 << 10, readSize: 3001, held: 40)
        XCTAssertGreaterThan(d.storagesAllocated, 1)
    }
}
