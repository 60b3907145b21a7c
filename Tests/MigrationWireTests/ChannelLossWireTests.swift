import MigrationWire
import XCTest

/// Losing a secondary channel (stream.md §6.16): the capability, and where CHANNEL_LOST may stand.
final class ChannelLossWireTests: XCTestCase {
    let agreement = Capabilities(codecs: [.zero, .raw], maxChannels: 4, flags: [.passAcknowledgement, .channelLoss])

    /// Channel 0 of 4 with `agreement`, the layout and pass 0 ended, then `records`.
    func main(agreement: Capabilities? = nil, _ records: (inout StreamEncoder, inout [UInt8]) -> Void) -> [UInt8] {
        stream(features: .liveMigration, layout: nil, channelCount: 4) { enc, out in
            enc.encodeCapabilities(agreement ?? self.agreement, agreed: true, into: &out)
            enc.encodeLayout(vectorLayout, into: &out)
            enc.encodePassBoundary(PassBoundary(pass: 0, dirtyPages: 1), into: &out)
            records(&enc, &out)
        }
    }

    func reply(_ records: (inout StreamEncoder, inout [UInt8]) -> Void) -> [UInt8] {
        stream(features: .liveMigration, layout: nil, channelCount: 4) { enc, out in
            enc.encodeCapabilities(agreement, agreed: true, into: &out)
            records(&enc, &out)
        }
    }

    func reason(_ bytes: [UInt8]) -> WireError.Reason? { decodeAll(bytes).error?.reason }

    func testTheCapabilityIsAgreedOnlyWhenBothOfferIt() {
        let both = Capabilities(maxChannels: 4, flags: [.passAcknowledgement, .channelLoss])
        let older = Capabilities(maxChannels: 4, flags: [.passAcknowledgement])
        XCTAssertEqual(CapabilityFlags.channelLoss.rawValue, 1 << 7)
        XCTAssertTrue(both.agreed(with: both).flags.contains(.channelLoss))
        XCTAssertFalse(both.agreed(with: older).flags.contains(.channelLoss))
        XCTAssertFalse(older.agreed(with: both).flags.contains(.channelLoss))
    }

    func testRecordsRoundTrip() {
        let decoded = decodeAll(main { enc, out in
            enc.encodeChannelLost(channel: 3, pass: 1, into: &out)
            enc.encodePassBoundary(PassBoundary(pass: 1, dirtyPages: 0), into: &out)
            enc.encodeChannelLost(channel: 1, pass: 2, into: &out)
            enc.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        })
        XCTAssertNil(decoded.error)
        guard case .channelLost(let first, let firstPass) = decoded.events[4], case .channelLost(let second, let secondPass) = decoded.events[6]
        else { return XCTFail("\(decoded.events)") }
        XCTAssertEqual([first, second], [3, 1])
        XCTAssertEqual([firstPass, secondPass], [1, 2])

        let replies = decodeAll(reply { enc, out in
            enc.encodeChannelLost(channel: 2, pass: 0, into: &out)
            enc.encodePassApplied(pass: 0, into: &out)
            enc.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        })
        XCTAssertNil(replies.error)
        guard case .channelLost(2, 0) = replies.events[2] else { return XCTFail("\(replies.events)") }
    }

    func testWhereTheRecordMayNotStand() {
        let lost = { (enc: inout StreamEncoder, out: inout [UInt8]) in enc.encodeChannelLost(channel: 1, pass: 1, into: &out) }
        // Without channel_loss agreed, and without any agreement (a snapshot file).
        XCTAssertEqual(reason(main(agreement: Capabilities(codecs: .all, maxChannels: 4, flags: [.passAcknowledgement]), lost)),
                       .unexpectedRecord(RecordType.channelLost.rawValue))
        XCTAssertEqual(reason(stream(lost)), .unexpectedRecord(RecordType.channelLost.rawValue))
        // On a secondary channel, which a receiver holds to the agreement.
        var secondary = StreamEncoder(header: StreamHeader(features: .liveMigration, channel: 1, channelCount: 4))
        var bytes: [UInt8] = []
        secondary.encodeHeader(into: &bytes)
        secondary.encodeLayout(vectorLayout, into: &bytes)
        lost(&secondary, &bytes)
        let decoder = StreamDecoder()
        decoder.hold(to: agreement)
        XCTAssertEqual(decodeAll(bytes, decoder: decoder).error?.reason, .unexpectedRecord(RecordType.channelLost.rawValue))
        // Before the layout (after the offer: a stream that opens with the agreement is a reply stream), after the
        // switchover or the start of post-copy.
        XCTAssertEqual(reason(stream(features: .liveMigration, layout: nil, channelCount: 4) { enc, out in
            enc.encodeCapabilities(self.agreement, agreed: false, into: &out)
            enc.encodeCapabilities(self.agreement, agreed: true, into: &out)
            lost(&enc, &out)
        }), .unexpectedRecord(RecordType.channelLost.rawValue))
        XCTAssertEqual(reason(main { enc, out in
            enc.encodeSwitchover(Switchover(finalPass: 1), into: &out)
            lost(&enc, &out)
        }), .unexpectedRecord(RecordType.channelLost.rawValue))
        XCTAssertEqual(reason(main(agreement: Capabilities(maxChannels: 4, flags: [.passAcknowledgement, .channelLoss, .postCopy])) { enc, out in
            enc.encodePostCopy(PostCopyStart(finalPass: 1, missingPages: 0), into: &out)
            lost(&enc, &out)
        }), .unexpectedRecord(RecordType.channelLost.rawValue))
        // On the reply stream, after VERIFIED.
        XCTAssertEqual(reason(reply { enc, out in
            enc.encodeVerified(DigestRecord(algorithm: DigestAlgorithm.pageSum128, digest: Array(0 ..< 16)), into: &out)
            lost(&enc, &out)
        }), .unexpectedRecord(RecordType.channelLost.rawValue))
    }

    func testChannelAndPassAreChecked() {
        // Channel 0, a channel beyond the count, a channel lost twice.
        for channel: UInt16 in [0, 4] {
            XCTAssertEqual(reason(main { enc, out in enc.encodeChannelLost(channel: channel, pass: 1, into: &out) }), .wrongChannel(channel))
        }
        XCTAssertEqual(reason(reply { enc, out in
            enc.encodeChannelLost(channel: 2, pass: 0, into: &out)
            enc.encodeChannelLost(channel: 2, pass: 1, into: &out)
        }), .wrongChannel(2))
        // On the main channel it belongs to the pass in progress: not to one that ended.
        XCTAssertEqual(reason(main { enc, out in enc.encodeChannelLost(channel: 1, pass: 0, into: &out) }),
                       .passOutOfOrder(previous: 0, found: 0))
        XCTAssertEqual(reason(main { enc, out in
            batch(&enc, &out, pass: 2, pages: [(0, nil)])
            enc.encodeChannelLost(channel: 1, pass: 1, into: &out)
        }), .passOutOfOrder(previous: 2, found: 1))
        // Reserved bytes are zero.
        XCTAssertEqual(reason(main { enc, out in
            enc.encodeRawRecord(type: RecordType.channelLost.rawValue, body: [1, 0, 1, 0, 1, 0, 0, 0], into: &out)
        }), .reservedNotZero)
    }
}
