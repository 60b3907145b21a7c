import KVMMigration
import MicroVM
import MigrationEngine
import MigrationWire
import XCTest

/// The receiver holds every channel to the agreement it wrote on its reply stream (stream.md §6.2), whether or not
/// the sender copies it onto its main channel. Hand-made streams over real sockets; no KVM, as nothing gets as far
/// as building a VM.
final class ReceiverAgreementTests: XCTestCase {
    let layout = GuestMemoryLayout(regions: [MemoryRegion(guestPhysicalAddress: 0, size: 16 << 20)])
    /// What the receiver accepts: every codec, but not whole-batch compression.
    let receiverCapabilities = Capabilities(codecs: .all, maxChannels: 2)
    /// What the sender offers: every codec and flag.
    let offer = Capabilities(codecs: .all, maxChannels: 2, flags: [.wholeBatchCompression, .passAcknowledgement])

    /// The opening of channel `index` of `count`: header, on the main channel the offer and `copy` (the sender's
    /// copy of the agreement), then the layout.
    func opening(channel index: Int, of count: Int, copy: Capabilities? = nil) -> (StreamEncoder, [UInt8]) {
        let encoder = StreamEncoder(header: StreamHeader(features: .liveMigration, channel: UInt16(index), channelCount: UInt16(count)))
        var stream: [UInt8] = []
        encoder.encodeHeader(into: &stream)
        if index == 0 { encoder.encodeCapabilities(offer, agreed: false, into: &stream) }
        if let copy { encoder.encodeCapabilities(copy, agreed: true, into: &stream) }
        encoder.encodeLayout(layout, into: &stream)
        return (encoder, stream)
    }

    /// A batch compressed as a whole with lz4: offered by the sender, not agreed by the receiver.
    func wholeBatch(_ encoder: inout StreamEncoder) -> [UInt8] {
        var record = [UInt8](repeating: 0, count: StreamEncoder.batchLength(pageCount: 1, payloadLength: 64))
        let payload = [UInt8](repeating: 0x11, count: 64)
        record.withUnsafeMutableBytes { out in
            payload.withUnsafeBytes {
                _ = encoder.encodeCompressedPageBatch(pass: 0, pages: [(frame: 3, encoding: .raw)], pageSize: 4096,
                                                      compression: .lz4, compressedPayload: $0, into: out)
            }
        }
        return record
    }

    /// Runs a receiver on `streams` (one per channel, each sent in full and then ended) and returns its error.
    func receiverError(_ streams: [[UInt8]]) throws -> String {
        let pairs = streams.map { _ in SocketPairChannel.pair() }
        for (pair, stream) in zip(pairs, streams) {
            try stream.withUnsafeBytes { try pair.1.send([$0]) }
            pair.1.finishSending()
        }
        let sink = MicroVMGuestSink(console: SerialConsole(output: nil))
        var message = ""
        XCTAssertThrowsError(try MigrationReceiver(sink: sink, channels: pairs.map { $0.0 }, capabilities: receiverCapabilities).run()) {
            message = "\($0)"
        }
        XCTAssertNil(sink.machine)
        XCTAssertNil(sink.memory, "memory is discarded")
        return message
    }

    func testMainChannelWithoutACopyIsHeldToTheAgreement() throws {
        var (encoder, stream) = opening(channel: 0, of: 1)
        stream += wholeBatch(&encoder)
        let error = try receiverError([stream])
        XCTAssertTrue(error.contains("codecNotAgreed"), error)
    }

    /// A secondary channel never carries the agreement; its failure is the one reported, not the main channel's
    /// "closed" that follows from it.
    func testSecondaryChannelIsHeldToTheAgreement() throws {
        let main = opening(channel: 0, of: 2).1
        var (encoder, stream) = opening(channel: 1, of: 2)
        stream += wholeBatch(&encoder)
        let error = try receiverError([main, stream])
        XCTAssertTrue(error.contains("codecNotAgreed"), error)
    }

    func testASendersCopyOfTheAgreementIsAcceptedAndHeldTo() throws {
        var (encoder, stream) = opening(channel: 0, of: 1, copy: receiverCapabilities.agreed(with: offer))
        stream += wholeBatch(&encoder)
        let error = try receiverError([stream])
        XCTAssertTrue(error.contains("codecNotAgreed"), "the copy is accepted, the batch refused: \(error)")
    }

    func testACopyThatDiffersFromTheReceiversAgreementIsRefused() throws {
        let (_, stream) = opening(channel: 0, of: 1, copy: offer)
        let error = try receiverError([stream])
        XCTAssertTrue(error.contains("the sender's copy of the agreement"), error)
        XCTAssertTrue(error.contains("differs from the receiver's"), error)
    }
}
