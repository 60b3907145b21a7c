import KVMMigration
import MicroVM
@testable import MigrationEngine
import MigrationWire
import PageCodec
import XCTest

/// The receiver's page writer hands a batch's pages to the sink in runs of consecutive frames, and a MicroVM sink
/// writes them through its memfd. No KVM: the memory is a real memfd, the batches real decoded records.
final class PageWriterTests: XCTestCase {
    let layout = GuestMemoryLayout(regions: [MemoryRegion(guestPhysicalAddress: 0, size: 16 << 20)])

    /// A page of `byte`, with its frame number in the first bytes so that a page written to the wrong frame shows.
    func page(_ frame: UInt64, _ byte: UInt8) -> [UInt8] {
        var bytes = [UInt8](repeating: byte, count: 4096)
        withUnsafeBytes(of: frame.littleEndian) { bytes.replaceSubrange(0 ..< 8, with: $0) }
        return bytes
    }

    /// Encodes one batch per element of `batches` and decodes them again, as a receiver's channel would.
    func decodedBatches(_ batches: [[(frame: UInt64, encoding: PageEncoding, bytes: [UInt8])]]) throws -> [PageBatch] {
        var encoder = StreamEncoder(header: StreamHeader(features: .liveMigration, channel: 0, channelCount: 1))
        var stream: [UInt8] = []
        encoder.encodeHeader(into: &stream)
        encoder.encodeLayout(layout, into: &stream)
        for batch in batches {
            let buffers = batch.map { $0.bytes }
            withExtendedLifetime(buffers) {
                let sources = zip(batch, buffers).map { page, bytes in
                    PageSource(frame: page.frame, encoding: page.encoding,
                               bytes: bytes.withUnsafeBytes { UnsafeRawBufferPointer(start: $0.baseAddress, count: $0.count) })
                }
                encoder.encodePageBatch(pass: 0, pages: sources, into: &stream)
            }
        }
        let decoder = StreamDecoder()
        decoder.feed(stream)
        var decoded: [PageBatch] = []
        while let event = try decoder.next() {
            if case .pageBatch(let batch) = event { decoded.append(batch) }
        }
        XCTAssertEqual(decoded.count, batches.count)
        return decoded
    }

    func testRunsLandOnTheirFramesInStreamOrder() throws {
        let lz4 = try BlockCompressor(.lz4(acceleration: 1))
        let twelve = page(12, 0xC0)
        var compressed = [UInt8](repeating: 0, count: lz4.bound(4096))
        let compressedLength = twelve.withUnsafeBytes { source in compressed.withUnsafeMutableBytes { lz4.compress(source, into: $0) } }!
        // Batch 1: a run 5–7, frame 6 again later (the newer version must win), a zero run 8–9 with frame 9
        // written earlier in the batch, a page compressed on its own, and a page past a gap.
        // Batch 2: frame 5, written in batch 1, becomes zero.
        let batches = try decodedBatches([
            [(9, .raw, page(9, 0x99)), (5, .raw, page(5, 0x55)), (6, .raw, page(6, 0x66)), (7, .raw, page(7, 0x77)),
             (8, .zero, []), (9, .zero, []), (6, .raw, page(6, 0x67)), (12, .lz4, Array(compressed[..<compressedLength])),
             (4000, .raw, page(4000, 0xAB))],
            [(5, .zero, [])],
        ])
        let sink = MicroVMGuestSink(console: SerialConsole(output: nil))
        try sink.prepare(layout: layout)
        let writer = PageWriter(sink: sink, layout: layout)
        for batch in batches { try writer.apply(batch) }

        // Zero pages are holes in the memfd: they cost no memory. (Looked at first: reading a hole through the
        // mapping would allocate it.)
        let memory = try XCTUnwrap(sink.memory)
        let pages = try memory.dataRanges().map { ($0.lowerBound / 4096) ..< ($0.upperBound / 4096) }
        XCTAssertEqual(pages, [6 ..< 8, 12 ..< 13, 4000 ..< 4001])

        func holds(_ frame: UInt64, _ expected: [UInt8]) -> Bool {
            expected.elementsEqual(UnsafeRawBufferPointer(start: sink.page(frame: frame), count: 4096))
        }
        let zero = [UInt8](repeating: 0, count: 4096)
        XCTAssertTrue(holds(5, zero), "a later zero page replaces data")
        XCTAssertTrue(holds(6, page(6, 0x67)), "the later version of a page wins")
        XCTAssertTrue(holds(7, page(7, 0x77)))
        XCTAssertTrue(holds(8, zero))
        XCTAssertTrue(holds(9, zero), "a zero page after the page's data wins")
        XCTAssertTrue(holds(12, twelve), "a page compressed on its own")
        XCTAssertTrue(holds(4000, page(4000, 0xAB)))
        XCTAssertEqual(writer.pagesWritten, 10)
    }

    /// A lost channel's writer (stream.md §6.16) drops its share of the digest and leaves its pages in memory, naming the
    /// frames that held data, for memory kept for a resume to hash again.
    func testALostChannelsWriterDropsItsShareAndNamesWhatItWrote() throws {
        let batches = try decodedBatches([[(3, .raw, page(3, 0x33)), (4, .zero, []), (700, .raw, page(700, 0x70))]])
        let sink = MicroVMGuestSink(console: SerialConsole(output: nil))
        try sink.prepare(layout: layout)
        let writer = PageWriter(sink: sink, layout: layout)
        try writer.apply(batches[0])
        XCTAssertNotEqual(writer.digest.digest, MemoryDigest())
        writer.forgetAll()
        XCTAssertEqual(writer.digest.digest, MemoryDigest())
        XCTAssertEqual(writer.droppedFrames, [3, 700])
        XCTAssertTrue(page(700, 0x70).elementsEqual(UnsafeRawBufferPointer(start: sink.page(frame: 700), count: 4096)), "memory keeps it")
    }
}
