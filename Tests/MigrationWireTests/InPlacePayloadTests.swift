import XCTest
@testable import MigrationWire

/// The decoder's in-place mode: uncompressed batches whose checksum covers their descriptors are yielded once
/// their descriptors are in, and their payload goes straight to where the caller says, never through the
/// decoder's buffer when the decoder does the reading.
final class InPlacePayloadTests: XCTestCase {
    /// Frames 0 ..< 512 of `vectorLayout` (its first two regions cover them), as "guest memory".
    private final class Memory {
        let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: 512 * 4096, alignment: 4096)
        var targetsAsked = 0
        init() { bytes.initializeMemory(as: UInt8.self, repeating: 0xEE) }
        deinit { bytes.deallocate() }
        func page(_ frame: UInt64) -> UnsafeMutableRawPointer {
            targetsAsked += 1
            precondition(frame < 512, "frame \(frame) outside the test memory")
            return bytes.baseAddress! + Int(frame) * 4096
        }
        func contents(_ frame: UInt64) -> [UInt8] { Array(bytes[Int(frame) * 4096 ..< Int(frame + 1) * 4096]) }
    }

    private let agreement = Capabilities(codecs: .all, maxChannels: 1, flags: [.wholeBatchCompression, .descriptorChecksum])

    /// Raw pages 0-2 and 7 with a zero page between, a batch compressed as a whole (buffered as before), a pass
    /// boundary, then frame 1 again with new contents.
    private func migrationStream(agreed: Capabilities, damage: ((inout StreamEncoder, inout [UInt8]) -> Void)? = nil) -> [UInt8] {
        stream(features: .liveMigration, layout: nil) { enc, out in
            enc.encodeCapabilities(agreed, agreed: true, into: &out)
            enc.encodeLayout(vectorLayout, into: &out)
            enc.checksumsPayload = !agreed.flags.contains(.descriptorChecksum)
            if let damage { return damage(&enc, &out) }
            batch(&enc, &out, pass: 0, pages: [(0, patternPage(10)), (1, patternPage(11)), (2, patternPage(12)), (5, nil), (7, patternPage(17))])
            let compressed: [UInt8] = Array(repeating: 0x5A, count: 40)
            var record = [UInt8](repeating: 0, count: StreamEncoder.batchLength(pageCount: 1, payloadLength: compressed.count))
            record.withUnsafeMutableBytes { buf in
                compressed.withUnsafeBytes {
                    _ = enc.encodeCompressedPageBatch(pass: 0, pages: [(9, .raw)], pageSize: 4096, compression: .lz4,
                                                      compressedPayload: $0, into: buf)
                }
            }
            out += record
            enc.encodePassBoundary(PassBoundary(pass: 0, dirtyPages: 1, pagesSent: 6), into: &out)
            batch(&enc, &out, pass: 1, pages: [(1, patternPage(21))])
            enc.encodeEnd(endRecord, into: &out)
        }
    }

    private enum Seen: Equatable { case inPlace([UInt64]), buffered([UInt64]), boundary, end, other }

    /// Decodes `bytes` in place from a socket with read sizes `sizes`, or, with `sizes` nil, fed whole.
    private func decode(_ bytes: [UInt8], sizes: [Int]?, into memory: Memory) throws -> (seen: [Seen], decoder: StreamDecoder) {
        let decoder = StreamDecoder(options: StreamDecoder.Options(payloadsInPlace: true))
        let source = ChunkedSource(bytes, sizes: sizes ?? [bytes.count])
        if sizes == nil { decoder.feed(bytes); source.position = bytes.count }
        var seen: [Seen] = []
        while !decoder.isComplete {
            guard let event = try decoder.next() else {
                if decoder.receive(maximum: 1 << 20, source.read) == 0 { throw WireError(offset: decoder.offset, reason: .truncated) }
                continue
            }
            switch event {
            case .pageBatchAwaitingPayload(let batch):
                XCTAssertEqual(batch.payload.count, 0)
                try decoder.receivePayload(into: { memory.page($0.frame) }, source.read)
                seen.append(.inPlace(batch.pages.map(\.frame)))
            case .pageBatch(let batch): seen.append(.buffered(batch.pages.map(\.frame)))
            case .passBoundary: seen.append(.boundary)
            case .end: seen.append(.end)
            default: seen.append(.other)
            }
        }
        return (seen, decoder)
    }

    func testPayloadsGoStraightIntoPlace() throws {
        let bytes = migrationStream(agreed: agreement)
        for sizes in [[1 << 20], [7, 4096, 100_000, 3], [1]] {
            let memory = Memory()
            let (seen, decoder) = try decode(bytes, sizes: sizes, into: memory)
            XCTAssertEqual(seen, [.other, .other, .other, .inPlace([0, 1, 2, 5, 7]), .buffered([9]), .boundary, .inPlace([1]), .end], "\(sizes)")
            for (frame, seed) in [(0, 10), (1, 21), (2, 12), (7, 17)] as [(UInt64, Int)] {
                XCTAssertEqual(memory.contents(frame), patternPage(seed), "frame \(frame), reads of \(sizes)")
            }
            XCTAssertEqual(memory.contents(5), [UInt8](repeating: 0xEE, count: 4096), "a zero page is the caller's to apply")
            XCTAssertEqual(decoder.payloadBytesCopied, 0, "reads stop at each batch's descriptors (\(sizes))")
            XCTAssertEqual(decoder.offset, UInt64(bytes.count))
        }
    }

    /// An unchanged page (stream.md §6.4.1) has no bytes: no target is asked for it, and its memory stays as it was.
    func testUnchangedPagesAskForNoTarget() throws {
        let agreed = Capabilities(codecs: .all, maxChannels: 1, flags: [.descriptorChecksum, .unchangedPages])
        let bytes = stream(features: .liveMigration, layout: nil) { enc, out in
            enc.encodeCapabilities(agreed, agreed: true, into: &out)
            enc.encodeLayout(vectorLayout, into: &out)
            enc.checksumsPayload = false
            batch(&enc, &out, pass: 0, pages: [(0, patternPage(10)), (1, patternPage(11))])
            enc.encodePassBoundary(PassBoundary(pass: 0, dirtyPages: 2), into: &out)
            batch(&enc, &out, pass: 1, pages: [(1, patternPage(21))], unchanged: [0])
            batch(&enc, &out, pass: 1, pages: [], unchanged: [0, 1])
            enc.encodeEnd(endRecord, into: &out)
        }
        for sizes in [[1 << 20], [1], [7, 4096, 3]] {
            let memory = Memory()
            let (seen, _) = try decode(bytes, sizes: sizes, into: memory)
            XCTAssertEqual(seen, [.other, .other, .other, .inPlace([0, 1]), .boundary, .inPlace([1, 0]), .buffered([0, 1]), .end], "\(sizes)")
            XCTAssertEqual(memory.targetsAsked, 3, "frames 0 and 1 of pass 0, frame 1 of pass 1")
            XCTAssertEqual(memory.contents(0), patternPage(10))
            XCTAssertEqual(memory.contents(1), patternPage(21))
        }
    }

    /// Bytes the decoder already holds (fed whole) are copied into place; the result is the same.
    func testBufferedPayloadsAreCopiedIntoPlace() throws {
        let memory = Memory()
        let (seen, decoder) = try decode(migrationStream(agreed: agreement), sizes: nil, into: memory)
        XCTAssertEqual(seen.count, 8)
        XCTAssertEqual(memory.contents(1), patternPage(21))
        XCTAssertEqual(decoder.payloadBytesCopied, 5 * 4096)
    }

    /// Without descriptor checksums agreed, the payload is covered by the batch checksum and is buffered as before.
    func testWithoutDescriptorChecksumsBatchesAreBuffered() throws {
        let memory = Memory()
        let (seen, _) = try decode(migrationStream(agreed: Capabilities(codecs: .all, maxChannels: 1, flags: [.wholeBatchCompression])),
                                   sizes: [4096], into: memory)
        XCTAssertEqual(seen, [.other, .other, .other, .buffered([0, 1, 2, 5, 7]), .buffered([9]), .boundary, .buffered([1]), .end])
        XCTAssertEqual(memory.targetsAsked, 0)
    }

    /// A descriptor outside the layout is refused before any target is asked for; a stream that ends inside a
    /// payload is `truncated`.
    func testHostileBatchesWriteNothing() throws {
        let outside = migrationStream(agreed: agreement) { enc, out in
            batch(&enc, &out, pass: 0, pages: [(0, patternPage(1)), (0x5000, patternPage(2))])
        }
        let memory = Memory()
        XCTAssertThrowsError(try decode(outside, sizes: [512], into: memory)) { error in
            XCTAssertEqual((error as? WireError)?.reason, .pageOutsideLayout(index: 1, frame: 0x5000))
        }
        XCTAssertEqual(memory.targetsAsked, 0)

        let whole = migrationStream(agreed: agreement)
        let cut = Array(whole[..<(whole.count / 2)])
        XCTAssertThrowsError(try decode(cut, sizes: [3000], into: Memory())) { error in
            XCTAssertEqual((error as? WireError)?.reason, .truncated)
        }
    }
}
