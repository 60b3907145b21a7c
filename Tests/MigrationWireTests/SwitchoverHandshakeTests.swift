import MigrationWire
import XCTest

/// The switchover handshake: verify and commit travel with the sender's main stream, verified and started
/// in the receiver's reply stream; each is refused anywhere else.
final class SwitchoverHandshakeTests: XCTestCase {
    let digest = DigestRecord(algorithm: DigestAlgorithm.pageSum128, digest: Array(0 ..< 16))
    let layout = GuestMemoryLayout(regions: [MemoryRegion(guestPhysicalAddress: 0, size: 1 << 20)])

    func forward(_ records: (StreamEncoder, inout [UInt8]) -> Void) -> [UInt8] {
        let encoder = StreamEncoder(header: StreamHeader(channel: 0, channelCount: 1))
        var out: [UInt8] = []
        encoder.encodeHeader(into: &out)
        encoder.encodeCapabilities(Capabilities(), agreed: false, into: &out)
        encoder.encodeLayout(layout, into: &out)
        records(encoder, &out)
        return out
    }

    func reply(_ records: (StreamEncoder, inout [UInt8]) -> Void) -> [UInt8] {
        let encoder = StreamEncoder(header: StreamHeader(channel: 0, channelCount: 1))
        var out: [UInt8] = []
        encoder.encodeHeader(into: &out)
        encoder.encodeCapabilities(Capabilities(), agreed: true, into: &out)
        records(encoder, &out)
        return out
    }

    func testForwardAndReplyStreamsDecode() {
        let sent = forward { e, out in
            e.encodeSwitchover(Switchover(finalPass: 3), into: &out)
            e.encodeVerify(digest, into: &out)
            e.encodeCommit(into: &out)
            e.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        }
        let (events, error) = decodeAll(sent, chunks: [3, 5, 7])
        XCTAssertNil(error)
        guard case .verify(let d)? = events.dropLast(2).last else { return XCTFail("\(events)") }
        XCTAssertEqual(d, digest)
        guard case .commit? = events.dropLast().last else { return XCTFail("\(events)") }

        let answered = reply { e, out in
            e.encodeVerified(digest, into: &out)
            e.encodeStarted(into: &out)
            e.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        }
        let (replies, replyError) = decodeAll(answered)
        XCTAssertNil(replyError)
        XCTAssertEqual(replies.count, 5)
    }

    /// PASS_APPLIED travels in the reply stream only; a reader that does not know it skips it (it is optional).
    func testPassAppliedOnlyInTheReplyStream() {
        let answered = reply { e, out in
            e.encodePassApplied(pass: 0, into: &out)
            e.encodePassApplied(pass: 1, into: &out)
            e.encodeVerified(digest, into: &out)
            e.encodeStarted(into: &out)
            e.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        }
        let (replies, error) = decodeAll(answered, chunks: [5, 9])
        XCTAssertNil(error)
        guard replies.count == 7, case .passApplied(pass: 1) = replies[3] else { return XCTFail("\(replies)") }
        let sent = forward { e, out in e.encodePassApplied(pass: 0, into: &out) }
        XCTAssertEqual(decodeAll(sent).error?.reason, .unexpectedRecord(RecordType.passApplied.rawValue))
    }

    func testCommitBeforeVerifyIsRefused() {
        let sent = forward { e, out in
            e.encodeSwitchover(Switchover(finalPass: 1), into: &out)
            e.encodeCommit(into: &out)
        }
        XCTAssertEqual(decodeAll(sent).error?.reason, .unexpectedRecord(RecordType.commit.rawValue))
    }

    func testVerifyBeforeSwitchoverIsRefused() {
        let sent = forward { e, out in e.encodeVerify(digest, into: &out) }
        XCTAssertEqual(decodeAll(sent).error?.reason, .unexpectedRecord(RecordType.verify.rawValue))
    }

    func testVerifiedInASenderStreamIsRefused() {
        let sent = forward { e, out in e.encodeVerified(digest, into: &out) }
        XCTAssertEqual(decodeAll(sent).error?.reason, .unexpectedRecord(RecordType.verified.rawValue))
    }

    func testStartedBeforeVerifiedIsRefused() {
        let answered = reply { e, out in e.encodeStarted(into: &out) }
        XCTAssertEqual(decodeAll(answered).error?.reason, .unexpectedRecord(RecordType.started.rawValue))
    }
}
