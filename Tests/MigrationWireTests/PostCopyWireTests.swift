import MigrationWire
import XCTest

/// The post-copy records (stream.md §6.13): where each may stand, and what a reader refuses.
final class PostCopyWireTests: XCTestCase {
    let agreement = Capabilities(codecs: [.zero, .raw], maxChannels: 1, flags: [.postCopy, .passAcknowledgement])

    /// A main channel with the agreement, the layout and pass 0, then `records`.
    func main(agreement: Capabilities? = nil, _ records: (inout StreamEncoder, inout [UInt8]) -> Void) -> [UInt8] {
        stream(features: .liveMigration, layout: nil) { enc, out in
            enc.encodeCapabilities(agreement ?? self.agreement, agreed: false, into: &out)
            enc.encodeCapabilities(agreement ?? self.agreement, agreed: true, into: &out)
            enc.encodeLayout(vectorLayout, into: &out)
            enc.encodePassBoundary(PassBoundary(pass: 0, dirtyPages: 1), into: &out)
            records(&enc, &out)
        }
    }

    func reply(_ records: (inout StreamEncoder, inout [UInt8]) -> Void) -> [UInt8] {
        stream(features: .liveMigration, layout: nil) { enc, out in
            enc.encodeCapabilities(agreement, agreed: true, into: &out)
            records(&enc, &out)
        }
    }

    func reason(_ bytes: [UInt8]) -> WireError.Reason? { decodeAll(bytes).error?.reason }

    func testRecordsRoundTrip() throws {
        let runs = [FrameRun(first: 1, count: 3), FrameRun(first: 0x100, count: 0x100)]
        let decoded = decodeAll(main { enc, out in
            enc.encodeMissingPages(runs[...], into: &out)
            enc.encodePostCopy(PostCopyStart(finalPass: 1, missingPages: 0x103), into: &out)
            enc.encodeCommit(into: &out)
            enc.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        })
        XCTAssertNil(decoded.error)
        guard case .missingPages(let decodedRuns) = decoded.events[5], case .postCopy(let start) = decoded.events[6],
              case .commit = decoded.events[7] else { return XCTFail("\(decoded.events)") }
        XCTAssertEqual(decodedRuns, runs)
        XCTAssertEqual(start, PostCopyStart(finalPass: 1, missingPages: 0x103))

        let replies = decodeAll(reply { enc, out in
            enc.encodePostCopyReady(into: &out)
            enc.encodeStarted(into: &out)
            enc.encodePageRequest([7, 0x100], into: &out)
            enc.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        })
        XCTAssertNil(replies.error)
        guard case .postCopyReady = replies.events[2], case .started = replies.events[3],
              case .pageRequest(let frames) = replies.events[4] else { return XCTFail("\(replies.events)") }
        XCTAssertEqual(frames, [7, 0x100])
        XCTAssertEqual(StreamEncoder.maxMissingRuns(), ((16 << 20) - 8) / 16)
    }

    func testWhereTheRecordsMayNotStand() {
        let run = [FrameRun(first: 1, count: 1)]
        // Without post_copy agreed (a snapshot file has no agreement at all).
        XCTAssertEqual(reason(main(agreement: Capabilities(codecs: .all, maxChannels: 1, flags: [.passAcknowledgement])) { enc, out in
            enc.encodeMissingPages(run[...], into: &out)
        }), .unexpectedRecord(0x0E))
        XCTAssertEqual(reason(stream { enc, out in enc.encodePostCopy(PostCopyStart(finalPass: 1, missingPages: 0), into: &out) }),
                       .unexpectedRecord(0x0F))
        // After a switchover, or a second time.
        XCTAssertEqual(reason(main { enc, out in
            enc.encodeSwitchover(Switchover(finalPass: 1), into: &out)
            enc.encodePostCopy(PostCopyStart(finalPass: 1, missingPages: 0), into: &out)
        }), .unexpectedRecord(0x0F))
        XCTAssertEqual(reason(main { enc, out in
            enc.encodePostCopy(PostCopyStart(finalPass: 1, missingPages: 0), into: &out)
            enc.encodeMissingPages(run[...], into: &out)
        }), .unexpectedRecord(0x0E))
        // COMMIT needs VERIFY or POSTCOPY; the final pass must be new.
        XCTAssertEqual(reason(main { enc, out in enc.encodeCommit(into: &out) }), .unexpectedRecord(0x0C))
        XCTAssertEqual(reason(main { enc, out in enc.encodePostCopy(PostCopyStart(finalPass: 0, missingPages: 0), into: &out) }),
                       .passOutOfOrder(previous: 0, found: 0))
        // Runs ascend and stay inside one region.
        XCTAssertEqual(reason(main { enc, out in
            enc.encodeMissingPages([FrameRun(first: 5, count: 1), FrameRun(first: 5, count: 1)][...], into: &out)
        }), .badMissingRun(index: 1))
        XCTAssertEqual(reason(main { enc, out in enc.encodeMissingPages([FrameRun(first: 0x9F, count: 2)][...], into: &out) }),
                       .badMissingRun(index: 0))
        XCTAssertEqual(reason(main { enc, out in enc.encodeMissingPages([FrameRun(first: UInt64.max - 1, count: 4)][...], into: &out) }),
                       .badMissingRun(index: 0))
        XCTAssertEqual(reason(main { enc, out in enc.encodeMissingPages([FrameRun(first: 3, count: 0)][...], into: &out) }),
                       .badMissingRun(index: 0))
        XCTAssertEqual(reason(main { enc, out in
            enc.encodeMissingPages(run[...], into: &out)
            enc.encodePostCopy(PostCopyStart(finalPass: 1, missingPages: 2), into: &out)
        }), .missingPagesMismatch(declared: 2, listed: 1))
        // Reply stream: a request before POSTCOPY_READY, STARTED before it, READY twice; none on a main channel.
        XCTAssertEqual(reason(reply { enc, out in enc.encodePageRequest([1], into: &out) }), .unexpectedRecord(0x11))
        XCTAssertEqual(reason(reply { enc, out in enc.encodeStarted(into: &out) }), .unexpectedRecord(0x0D))
        XCTAssertEqual(reason(reply { enc, out in
            enc.encodePostCopyReady(into: &out)
            enc.encodePostCopyReady(into: &out)
        }), .unexpectedRecord(0x10))
        XCTAssertEqual(reason(main { enc, out in enc.encodePostCopyReady(into: &out) }), .unexpectedRecord(0x10))
    }

    /// A resumed post-copy (§6.14): the new main channel opens with POSTCOPY_RESUME, held to the agreement of the
    /// first; the new reply stream lists what is still missing (no layout to check it against) and asks again.
    func testResumedStreams() {
        let resumable = Capabilities(codecs: [.zero, .raw], maxChannels: 1, flags: [.postCopy, .passAcknowledgement, .resume])
        func decode(_ bytes: [UInt8], held: Capabilities) -> (events: [StreamEvent], error: WireError?) {
            let decoder = StreamDecoder()
            decoder.hold(to: held)
            return decodeAll(bytes, decoder: decoder)
        }
        let main = stream(features: .liveMigration, layout: nil) { enc, out in
            enc.encodePostCopyResume(finalPass: 3, into: &out)
            enc.encodeLayout(vectorLayout, into: &out)
            batch(&enc, &out, pass: 3, pages: [(1, patternPage(1))])
            enc.encodePassBoundary(PassBoundary(pass: 3, dirtyPages: 0), into: &out)
            enc.encodeVerify(DigestRecord(algorithm: DigestAlgorithm.pageSum128, digest: Array(0 ..< 16)), into: &out)
            enc.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        }
        let decoded = decode(main, held: resumable)
        XCTAssertNil(decoded.error)
        guard case .postCopyResume(let pass) = decoded.events[1] else { return XCTFail("\(decoded.events)") }
        XCTAssertEqual(pass, 3)
        XCTAssertEqual(decode(main, held: agreement).error?.reason, .unexpectedRecord(0x12), "without resume agreed")
        XCTAssertEqual(decodeAll(main).error?.reason, .unexpectedRecord(0x12), "without any agreement")
        XCTAssertEqual(decode(stream(features: .liveMigration) { enc, out in enc.encodePostCopyResume(finalPass: 3, into: &out) },
                              held: resumable).error?.reason, .unexpectedRecord(0x12), "after the layout")

        let resumedReply = stream(features: .liveMigration, layout: nil) { enc, out in
            enc.encodeCapabilities(resumable, agreed: true, into: &out)
            enc.encodeMissingPages([FrameRun(first: 1, count: 2), FrameRun(first: 0x5000, count: 1)][...], into: &out)
            enc.encodePostCopy(PostCopyStart(finalPass: 3, missingPages: 3), into: &out)
            enc.encodePageRequest([2], into: &out)
            enc.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        }
        let replies = decodeAll(resumedReply)
        XCTAssertNil(replies.error)
        guard case .missingPages(let runs) = replies.events[2], case .pageRequest(let frames) = replies.events[4] else {
            return XCTFail("\(replies.events)")
        }
        XCTAssertEqual(runs.count, 2)
        XCTAssertEqual(frames, [2])
        // A reply stream lists missing pages only when resume is agreed.
        XCTAssertEqual(reason(reply { enc, out in enc.encodeMissingPages([FrameRun(first: 1, count: 1)][...], into: &out) }),
                       .unexpectedRecord(0x0E))
    }

    func testPageRequestsAreBounded() {
        XCTAssertNil(decodeAll(reply { enc, out in
            enc.encodePostCopyReady(into: &out)
            enc.encodePageRequest(Array(0 ..< UInt64(WireLimits.maxRequestedPages))[...], into: &out)
            enc.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        }).error)
        // A request of 513 frames, and one of none, built by hand (the encoder refuses both).
        for count in [0, WireLimits.maxRequestedPages + 1] {
            let bytes = reply { enc, out in
                enc.encodePostCopyReady(into: &out)
                var body = [UInt8](repeating: 0, count: 8 + 8 * count)
                body[0] = UInt8(count & 0xFF)
                body[1] = UInt8(count >> 8)
                enc.encodeRawRecord(type: 0x11, body: body, into: &out)
            }
            XCTAssertEqual(reason(bytes), .badPageRequest(UInt32(count)))
        }
    }
}
