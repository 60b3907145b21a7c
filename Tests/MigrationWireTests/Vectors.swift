import MigrationWire

/// The test vectors of protocol/vectors: each a stream built with the encoder, then perhaps
/// damaged, and the error the decoder must report (nil for valid streams).
struct Vector {
    var name: String
    var description: String
    var bytes: [UInt8]
    var expectedError: WireError?
}

let vectorPageSize = 4096

/// A recognisable page: byte i is (seed + i * 7) mod 251.
func patternPage(_ seed: Int) -> [UInt8] { (0..<vectorPageSize).map { UInt8((seed + $0 * 7) % 251) } }

let vectorLayout = GuestMemoryLayout(regions: [
    MemoryRegion(guestPhysicalAddress: 0, size: 0xA0000),
    MemoryRegion(guestPhysicalAddress: 0x100000, size: 0x100000),
    MemoryRegion(guestPhysicalAddress: 0xFFFC0000, size: 0x40000, flags: .readOnly),
])

func le32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }

/// Builds a stream (channel 0 of `channelCount`): header, layout, then `records` appended by the closure.
func stream(features: StreamFeatures = .snapshotFile, layout: GuestMemoryLayout? = vectorLayout, migrationID: UInt32 = 0,
            channelCount: UInt16 = 1, _ records: (inout StreamEncoder, inout [UInt8]) -> Void = { _, _ in }) -> [UInt8] {
    var enc = StreamEncoder(header: StreamHeader(pageSize: UInt32(vectorPageSize), features: features, channelCount: channelCount,
                                                 migrationID: migrationID))
    var out: [UInt8] = []
    enc.encodeHeader(into: &out)
    if let layout { enc.encodeLayout(layout, into: &out) }
    records(&enc, &out)
    return out
}

/// Appends a batch of raw pages (with bytes) and zero pages (nil), then `unchanged` pages (no bytes).
func batch(_ enc: inout StreamEncoder, _ out: inout [UInt8], pass: UInt32, pages: [(UInt64, [UInt8]?)], unchanged: [UInt64] = []) {
    // Keep the page arrays alive while the encoder reads them through pointers.
    let storage = pages.map { $0.1 ?? [] }
    var sources: [PageSource] = []
    func build(_ i: Int) {
        if i == storage.count {
            enc.encodePageBatch(pass: pass, pages: sources + unchanged.map { .unchanged(frame: $0) }, into: &out)
            return
        }
        storage[i].withUnsafeBytes { buf in
            sources.append(pages[i].1 == nil ? .zero(frame: pages[i].0)
                           : PageSource(frame: pages[i].0, encoding: .raw, bytes: buf))
            build(i + 1)
        }
    }
    build(0)
}

let endRecord = End(digestAlgorithm: DigestAlgorithm.pageSum128, digest: Array(0..<16))

func allVectors() -> [Vector] {
    var v: [Vector] = []

    v.append(Vector(name: "valid-minimal-snapshot", description: "header, layout, end with a 16-byte digest",
                    bytes: stream { enc, out in enc.encodeEnd(endRecord, into: &out) }))

    let migration = stream(features: .liveMigration, layout: nil, migrationID: 0x5EED_0001) { enc, out in
        enc.encodeCapabilities(Capabilities(codecs: .all, maxChannels: 4, flags: [.resume, .wholeBatchCompression]),
                               agreed: false, into: &out)
        enc.encodeCapabilities(Capabilities(codecs: [.zero, .raw, .lz4], maxChannels: 2, flags: [.wholeBatchCompression]),
                               agreed: true, into: &out)
        enc.encodeLayout(vectorLayout, into: &out)
        batch(&enc, &out, pass: 0, pages: [(0, patternPage(1)), (1, nil), (2, nil), (0x100, patternPage(2))])
        enc.encodePassBoundary(PassBoundary(pass: 0, dirtyPages: 1, pagesSent: 4, zeroPages: 2, wireBytes: 8400,
                                            durationNanoseconds: 1_000_000), into: &out)
        enc.encodeSwitchover(Switchover(finalPass: 1), into: &out)
        batch(&enc, &out, pass: 1, pages: [(0x100, patternPage(3))])
        let blob: [UInt8] = Array("vcpu0-state".utf8)
        blob.withUnsafeBytes {
            enc.encodeDeviceState(componentID: DeviceComponent.kvmVCPU, instance: 0, componentVersion: 1, blob: $0, into: &out)
        }
        enc.encodePassBoundary(PassBoundary(pass: 1, dirtyPages: 0, pagesSent: 1), into: &out)
        enc.encodeEnd(endRecord, into: &out)
    }
    v.append(Vector(name: "valid-migration", description:
        "negotiation, layout, two passes with zero and raw pages, switchover, device state, end", bytes: migration))

    v.append(Vector(name: "valid-reply", description:
        "the receiver's reply stream: agreed capabilities with pass acknowledgement, two passes applied, the handshake, end",
        bytes: stream(features: .liveMigration, layout: nil) { enc, out in
            enc.encodeCapabilities(Capabilities(codecs: [.zero, .raw, .lz4], maxChannels: 2,
                                                flags: [.wholeBatchCompression, .passAcknowledgement]),
                                   agreed: true, into: &out)
            enc.encodePassApplied(pass: 0, into: &out)
            enc.encodePassApplied(pass: 1, into: &out)
            enc.encodeVerified(DigestRecord(algorithm: DigestAlgorithm.pageSum128, digest: Array(0..<16)), into: &out)
            enc.encodeStarted(into: &out)
            enc.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        }))

    // Post-copy (§6.13): pass 0, then the source pauses, lists three missing frames in two runs, and starts post-copy.
    let postCopyAgreement = Capabilities(codecs: [.zero, .raw], maxChannels: 1, flags: [.postCopy, .passAcknowledgement])
    func postCopyStream(runs: [FrameRun], missing: UInt64) -> [UInt8] {
        stream(features: .liveMigration, layout: nil, migrationID: 0x5EED_0004) { enc, out in
            enc.encodeCapabilities(postCopyAgreement, agreed: true, into: &out)
            enc.encodeLayout(vectorLayout, into: &out)
            batch(&enc, &out, pass: 0, pages: [(0, patternPage(9)), (1, patternPage(10)), (0x100, patternPage(11))])
            enc.encodePassBoundary(PassBoundary(pass: 0, dirtyPages: 3, pagesSent: 3), into: &out)
            enc.encodeDeviceState(DeviceState(componentID: DeviceComponent.kvmVCPU, instance: 0, componentVersion: 1,
                                              blob: ByteSlice(Array("vcpu0".utf8))), into: &out)
            enc.encodeMissingPages(runs[...], into: &out)
            enc.encodePostCopy(PostCopyStart(finalPass: 1, missingPages: missing), into: &out)
            enc.encodeCommit(into: &out)
            batch(&enc, &out, pass: 1, pages: [(0x100, patternPage(12)), (0, nil), (1, patternPage(13))])
            enc.encodePassBoundary(PassBoundary(pass: 1, dirtyPages: 0, pagesSent: 3), into: &out)
            enc.encodeVerify(DigestRecord(algorithm: DigestAlgorithm.pageSum128, digest: Array(0..<16)), into: &out)
            enc.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        }
    }
    let postCopyRuns = [FrameRun(first: 0, count: 2), FrameRun(first: 0x100, count: 1)]
    v.append(Vector(name: "valid-postcopy", description:
        "post-copy: pass 0, device state, two runs of missing frames, POSTCOPY, COMMIT, the missing pages in pass 1, VERIFY, end",
        bytes: postCopyStream(runs: postCopyRuns, missing: 3)))
    v.append(Vector(name: "invalid-postcopy-count", description: "POSTCOPY declares 4 missing pages where the runs list 3",
                    bytes: postCopyStream(runs: postCopyRuns, missing: 4),
                    expectedError: WireError(offset: 12680, reason: .missingPagesMismatch(declared: 4, listed: 3))))
    v.append(Vector(name: "invalid-postcopy-run", description: "a missing run that goes past the end of its region",
                    bytes: postCopyStream(runs: [FrameRun(first: 0x100, count: 0x101)], missing: 0x101),
                    expectedError: WireError(offset: 12632, reason: .badMissingRun(index: 0))))
    v.append(Vector(name: "valid-postcopy-reply", description:
        "the reply stream of a post-copy: pass 0 applied, ready, started, two page requests, verified, end",
        bytes: stream(features: .liveMigration, layout: nil) { enc, out in
            enc.encodeCapabilities(postCopyAgreement, agreed: true, into: &out)
            enc.encodePassApplied(pass: 0, into: &out)
            enc.encodePostCopyReady(into: &out)
            enc.encodeStarted(into: &out)
            enc.encodePageRequest([0x100], into: &out)
            enc.encodePageRequest([0, 1], into: &out)
            enc.encodeVerified(DigestRecord(algorithm: DigestAlgorithm.pageSum128, digest: Array(0..<16)), into: &out)
            enc.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        }))

    // Resumable pre-copy (stream.md §6.15).
    let resumeAgreement = Capabilities(codecs: [.zero, .raw], maxChannels: 1, flags: [.preCopyResume, .passAcknowledgement])
    let vectorTicket = ResumeTicket(low: 0x0123_4567_89AB_CDEF, high: 0xFEDC_BA98_7654_3210)
    v.append(Vector(name: "valid-precopy-resume", description:
        "a resumed pre-copy: the agreement, the layout, the ticket asking to resume, pass 0 with only what the receiver lacks, end",
        bytes: stream(features: .liveMigration, layout: nil, migrationID: 0x5EED_0005) { enc, out in
            enc.encodeCapabilities(resumeAgreement, agreed: true, into: &out)
            enc.encodeLayout(vectorLayout, into: &out)
            enc.encodePreCopyTicket(PreCopyTicket(ticket: vectorTicket, resume: true), into: &out)
            batch(&enc, &out, pass: 0, pages: [(1, patternPage(14)), (2, nil)])
            enc.encodePassBoundary(PassBoundary(pass: 0, dirtyPages: 0, pagesSent: 2), into: &out)
            enc.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        }))
    v.append(Vector(name: "invalid-precopy-ticket-after-batch", description: "the ticket after a page batch: too late",
        bytes: stream(features: .liveMigration, layout: nil, migrationID: 0x5EED_0005) { enc, out in
            enc.encodeCapabilities(resumeAgreement, agreed: true, into: &out)
            enc.encodeLayout(vectorLayout, into: &out)
            batch(&enc, &out, pass: 0, pages: [(1, patternPage(14))])
            enc.encodePreCopyTicket(PreCopyTicket(ticket: vectorTicket, resume: false), into: &out)
        }, expectedError: WireError(offset: 4296, reason: .unexpectedRecord(RecordType.preCopyTicket.rawValue))))
    v.append(Vector(name: "valid-precopy-discard", description:
        "a source that will not resume tells the receiver to drop what it keeps: the agreement, the layout, the ticket with discard set, end",
        bytes: stream(features: .liveMigration, layout: nil, migrationID: 0x5EED_0006) { enc, out in
            enc.encodeCapabilities(resumeAgreement, agreed: true, into: &out)
            enc.encodeLayout(vectorLayout, into: &out)
            enc.encodePreCopyTicket(PreCopyTicket(ticket: vectorTicket, resume: false, discard: true), into: &out)
            enc.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        }))
    func resumeReply(hashes: [[HeldHash]], declared: UInt64) -> [UInt8] {
        stream(features: .liveMigration, layout: nil) { enc, out in
            enc.encodeCapabilities(resumeAgreement, agreed: true, into: &out)
            for (index, run) in hashes.enumerated() {
                run.withUnsafeBytes { enc.encodeHeldPageRecords(first: 0x100 * UInt64(index), hashes: $0, into: &out) }
            }
            enc.encodePreCopyResumed(PreCopyResumed(outcome: .resumed, heldPages: declared), into: &out)
            enc.encodePassApplied(pass: 0, into: &out)
            enc.encodeVerified(DigestRecord(algorithm: DigestAlgorithm.pageSum128, digest: Array(0..<16)), into: &out)
            enc.encodeStarted(into: &out)
            enc.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        }
    }
    let heldRuns = [[HeldHash(low: 1, high: 2), HeldHash(low: 3, high: 4)], [HeldHash(low: 5, high: 0)]]
    v.append(Vector(name: "valid-precopy-resume-reply", description:
        "the reply to a resumed pre-copy: the agreement, the pages the receiver kept (frames 0, 1 and 0x100) with their hashes, "
            + "PRECOPY_RESUMED, pass 0 applied, verified, started, end",
        bytes: resumeReply(hashes: heldRuns, declared: 3)))
    v.append(Vector(name: "invalid-precopy-resumed-count", description: "PRECOPY_RESUMED declares 4 held pages where HELD_PAGES list 3",
        bytes: resumeReply(hashes: heldRuns, declared: 4),
        expectedError: WireError(offset: 160, reason: .badPreCopyResumed)))
    v.append(Vector(name: "invalid-held-zero-hash", description: "HELD_PAGES lists a page with a zero hash, which no held page has",
        bytes: resumeReply(hashes: [[HeldHash(low: 1, high: 2), HeldHash(low: 0, high: 0)]], declared: 2),
        expectedError: WireError(offset: 96, reason: .badHeldRun)))

    // Losing a secondary channel (§6.16): the main channel of four says it dropped channel 2 during pass 0, before its
    // boundary; the reply stream says so before PASS_APPLIED of that pass.
    let channelLossAgreement = Capabilities(codecs: [.zero, .raw], maxChannels: 4, flags: [.passAcknowledgement, .channelLoss])
    func channelLossStream(lost channel: UInt16, at lostAt: inout Int) -> [UInt8] {
        stream(features: .liveMigration, layout: nil, migrationID: 0x5EED_0006, channelCount: 4) { enc, out in
            enc.encodeCapabilities(channelLossAgreement, agreed: true, into: &out)
            enc.encodeLayout(vectorLayout, into: &out)
            batch(&enc, &out, pass: 0, pages: [(0, patternPage(14)), (1, nil)])
            lostAt = out.count
            enc.encodeChannelLost(channel: channel, pass: 0, into: &out)
            enc.encodePassBoundary(PassBoundary(pass: 0, dirtyPages: 1, pagesSent: 2, zeroPages: 1), into: &out)
            batch(&enc, &out, pass: 1, pages: [(0x101, patternPage(15))])
            enc.encodePassBoundary(PassBoundary(pass: 1, dirtyPages: 0, pagesSent: 1), into: &out)
            enc.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        }
    }
    var channelLostAt = 0
    v.append(Vector(name: "valid-channel-lost", description:
        "channel 0 of 4 with channel_loss agreed: pass 0, channel 2 lost during it, the boundary, pass 1, end",
        bytes: channelLossStream(lost: 2, at: &channelLostAt)))
    v.append(Vector(name: "invalid-channel-lost-main", description: "CHANNEL_LOST names channel 0, which cannot be lost",
                    bytes: channelLossStream(lost: 0, at: &channelLostAt),
                    expectedError: WireError(offset: UInt64(channelLostAt + 8), reason: .wrongChannel(0))))
    v.append(Vector(name: "valid-channel-lost-reply", description:
        "the reply stream of a migration that lost channel 2 in pass 0: the loss, then pass 0 and 1 applied, the handshake, end",
        bytes: stream(features: .liveMigration, layout: nil, channelCount: 4) { enc, out in
            enc.encodeCapabilities(channelLossAgreement, agreed: true, into: &out)
            enc.encodeChannelLost(channel: 2, pass: 0, into: &out)
            enc.encodePassApplied(pass: 0, into: &out)
            enc.encodePassApplied(pass: 1, into: &out)
            enc.encodeVerified(DigestRecord(algorithm: DigestAlgorithm.pageSum128, digest: Array(0..<16)), into: &out)
            enc.encodeStarted(into: &out)
            enc.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        }))

    v.append(Vector(name: "valid-descriptor-checksum", description:
        "descriptor_checksum agreed: the batch checksum covers the batch header and descriptors, not the raw page",
        bytes: stream(features: .liveMigration, layout: nil, migrationID: 0x5EED_0002) { enc, out in
            enc.encodeCapabilities(Capabilities(codecs: [.zero, .raw], maxChannels: 1, flags: [.descriptorChecksum]),
                                   agreed: true, into: &out)
            enc.encodeLayout(vectorLayout, into: &out)
            enc.checksumsPayload = false
            batch(&enc, &out, pass: 0, pages: [(0, patternPage(4)), (1, nil)])
            enc.encodeEnd(endRecord, into: &out)
        }))

    v.append(Vector(name: "valid-optional-records", description:
        "a note and an unknown optional record (type 0x80000042), both skipped or reported, then end",
        bytes: stream { enc, out in
            enc.encodeNote("written by the vector generator", into: &out)
            enc.encodeRawRecord(type: 0x8000_0042, body: [1, 2, 3, 4, 5], into: &out)
            enc.encodeEnd(endRecord, into: &out)
        }))

    v.append(Vector(name: "valid-abort", description: "the sender aborts after the layout", bytes: stream { enc, out in
        enc.encodeAbort(Abort(reason: .noConvergence, message: "dirty rate above link rate"), into: &out)
    }))

    // Unchanged pages (§6.4.1): agreed, in pass 1, mixed with raw and zero pages, the agreement copied on the main channel.
    let unchangedAgreement = Capabilities(codecs: [.zero, .raw], maxChannels: 1, flags: [.descriptorChecksum, .unchangedPages])
    func unchangedStream(agreement: Capabilities?, features: StreamFeatures = .liveMigration, secondPass: UInt32 = 1,
                         at descriptorOffset: inout Int) -> [UInt8] {
        var position = 0
        let bytes = stream(features: features, layout: nil, migrationID: 0x5EED_0003) { enc, out in
            if let agreement { enc.encodeCapabilities(agreement, agreed: true, into: &out) }
            enc.encodeLayout(vectorLayout, into: &out)
            enc.checksumsPayload = agreement == nil
            batch(&enc, &out, pass: 0, pages: [(0, patternPage(5)), (1, patternPage(6)), (0x100, patternPage(7))])
            if secondPass > 0 { enc.encodePassBoundary(PassBoundary(pass: 0, dirtyPages: 3, pagesSent: 3), into: &out) }
            position = out.count
            batch(&enc, &out, pass: secondPass, pages: [(1, patternPage(8)), (0x100, nil)], unchanged: [0])
            enc.encodeEnd(endRecord, into: &out)
        }
        // The unchanged page is the third descriptor of the second batch; its encoding byte is 12 into it.
        descriptorOffset = position + 8 + 32 + 16 * 2
        return bytes
    }
    var unchangedAt = 0
    v.append(Vector(name: "valid-unchanged-pages", description:
        "unchanged_pages agreed: pass 1 sends frame 0 as unchanged (encoding 4, length 0, no payload) beside a raw and a zero page",
        bytes: unchangedStream(agreement: unchangedAgreement, at: &unchangedAt)))
    let withoutFlag = Capabilities(codecs: .all, maxChannels: 1, flags: [.descriptorChecksum])
    v.append(Vector(name: "invalid-unchanged-not-agreed", description: "an unchanged page where the agreement lacks unchanged_pages",
                    bytes: unchangedStream(agreement: withoutFlag, at: &unchangedAt),
                    expectedError: WireError(offset: UInt64(unchangedAt + 12), reason: .codecNotAgreed(4))))
    v.append(Vector(name: "invalid-unchanged-in-snapshot", description: "an unchanged page in a snapshot file, which carries no agreement",
                    bytes: unchangedStream(agreement: nil, features: .snapshotFile, at: &unchangedAt),
                    expectedError: WireError(offset: UInt64(unchangedAt + 12), reason: .codecNotAgreed(4))))
    v.append(Vector(name: "invalid-unchanged-in-pass-zero", description: "an unchanged page in a batch of pass 0",
                    bytes: unchangedStream(agreement: unchangedAgreement, secondPass: 0, at: &unchangedAt),
                    expectedError: WireError(offset: UInt64(unchangedAt + 12), reason: .unchangedInPassZero(index: 2))))
    var withLength = unchangedStream(agreement: unchangedAgreement, at: &unchangedAt)
    withLength[unchangedAt + 9] = 0x10 // length 4096
    v.append(Vector(name: "invalid-unchanged-with-length", description: "an unchanged page whose descriptor claims 4096 bytes",
                    bytes: withLength, expectedError: WireError(offset: UInt64(unchangedAt + 8), reason: .badPageLength(index: 2, length: 4096))))

    // Invalid streams. Offsets are stream offsets; the layout record occupies 32..<120.
    let minimal = v[0].bytes
    let afterLayout = 32 + 8 + 8 + 24 * 3
    var badMagic = minimal; badMagic[1] = UInt8(ascii: "X")
    v.append(Vector(name: "invalid-bad-magic", description: "second magic byte changed",
                    bytes: badMagic, expectedError: WireError(offset: 0, reason: .badMagic)))
    var future = minimal; future[8] = 2
    v.append(Vector(name: "invalid-future-version", description: "format version 2",
                    bytes: future, expectedError: WireError(offset: 8, reason: .unsupportedVersion(2))))
    var feature = minimal; feature[16] = 0x01
    v.append(Vector(name: "invalid-unknown-mandatory-feature", description: "mandatory feature bit 0 set",
                    bytes: feature, expectedError: WireError(offset: 16, reason: .unsupportedMandatoryFeatures(1))))
    var pageSize = minimal; pageSize[12] = 0; pageSize[13] = 0x30
    v.append(Vector(name: "invalid-page-size", description: "page size 12288 is not a power of two",
                    bytes: pageSize, expectedError: WireError(offset: 12, reason: .badPageSize(12288))))
    v.append(Vector(name: "invalid-truncated", description: "the end record is cut after 5 of its 32 bytes",
                    bytes: Array(minimal[..<(afterLayout + 5)]),
                    expectedError: WireError(offset: UInt64(afterLayout), reason: .truncated)))
    var oversize = Array(minimal[..<afterLayout]); oversize += le32(RecordType.deviceState.rawValue) + le32(0xFFFF_FFF0)
    v.append(Vector(name: "invalid-oversize-record", description: "a device-state record claiming 4 GiB",
                    bytes: oversize,
                    expectedError: WireError(offset: UInt64(afterLayout + 4),
                                             reason: .recordTooLarge(type: 5, length: 0xFFFF_FFF0))))
    v.append(Vector(name: "invalid-unknown-mandatory-record", description: "record type 0x77 (mandatory, unknown)",
                    bytes: stream { enc, out in
                        enc.encodeRawRecord(type: 0x77, body: [0, 0, 0, 0], into: &out)
                        enc.encodeEnd(endRecord, into: &out)
                    }, expectedError: WireError(offset: UInt64(afterLayout), reason: .unknownMandatoryRecord(0x77))))
    v.append(Vector(name: "invalid-page-outside-layout", description: "a zero page at frame 0xA0 (the hole at 640 KiB)",
                    bytes: stream { enc, out in
                        batch(&enc, &out, pass: 0, pages: [(0, nil), (0xA0, nil)])
                        enc.encodeEnd(endRecord, into: &out)
                    }, expectedError: WireError(offset: UInt64(afterLayout + 8 + 32 + 16),
                                                reason: .pageOutsideLayout(index: 1, frame: 0xA0))))
    var badCRC = stream { enc, out in
        batch(&enc, &out, pass: 0, pages: [(5, patternPage(9))])
        enc.encodeEnd(endRecord, into: &out)
    }
    badCRC[afterLayout + 8 + 32 + 16 + 100] ^= 0x40
    let storedCRC = badCRC[(afterLayout + 8)..<(afterLayout + 12)].reversed().reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
    var damaged = badCRC[(afterLayout + 12)..<(afterLayout + 8 + 32 + 16 + 4096)]
    let computed = damaged.withUnsafeBytes { CRC32C.update(0, $0) }
    damaged = []
    v.append(Vector(name: "invalid-bad-checksum", description: "one payload bit flipped in a raw page",
                    bytes: badCRC, expectedError: WireError(offset: UInt64(afterLayout + 8),
                                                            reason: .checksumMismatch(stored: storedCRC, computed: computed))))
    var gap = stream { enc, out in
        batch(&enc, &out, pass: 0, pages: [(1, nil)])
    }
    var skipping = StreamEncoder(header: StreamHeader(pageSize: UInt32(vectorPageSize), features: .snapshotFile))
    var throwaway: [UInt8] = []
    batch(&skipping, &throwaway, pass: 0, pages: [(1, nil)])
    batch(&skipping, &throwaway, pass: 0, pages: [(1, nil)])
    let gapAt = gap.count
    batch(&skipping, &gap, pass: 0, pages: [(2, nil)]) // sequence 2 where 1 is expected
    v.append(Vector(name: "invalid-sequence-gap", description: "batch sequence jumps from 0 to 2",
                    bytes: gap, expectedError: WireError(offset: UInt64(gapAt + 8 + 8), reason: .sequenceGap(expected: 1, found: 2))))
    var padding = stream { enc, out in enc.encodeEnd(End(digestAlgorithm: 0, digest: [1, 2, 3]), into: &out) }
    padding[padding.count - 1] = 0xAA
    v.append(Vector(name: "invalid-nonzero-padding", description: "the last padding byte of the end record is 0xAA",
                    bytes: padding, expectedError: WireError(offset: UInt64(padding.count - 1), reason: .nonZeroPadding)))
    v.append(Vector(name: "invalid-batch-before-layout", description: "a page batch before any memory layout",
                    bytes: stream(layout: nil) { enc, out in batch(&enc, &out, pass: 0, pages: [(0, nil)]) },
                    expectedError: WireError(offset: 32, reason: .unexpectedRecord(RecordType.pageBatch.rawValue))))
    v.append(Vector(name: "invalid-data-after-end", description: "a note after the end record",
                    bytes: stream { enc, out in
                        enc.encodeEnd(endRecord, into: &out)
                        enc.encodeNote("late", into: &out)
                    }, expectedError: WireError(offset: UInt64(afterLayout + 32), reason: .dataAfterEnd)))
    var regions = stream(layout: nil) { enc, out in enc.encodeEnd(endRecord, into: &out) }
    regions = Array(regions[..<32]) + le32(RecordType.memoryLayout.rawValue) + le32(8) + le32(1_000_000) + le32(0)
    v.append(Vector(name: "invalid-too-many-regions", description: "a layout claiming a million regions",
                    bytes: regions, expectedError: WireError(offset: 40, reason: .tooManyRegions(1_000_000))))
    v.append(Vector(name: "invalid-overlapping-regions", description: "second region starts inside the first",
                    bytes: stream(layout: GuestMemoryLayout(regions: [
                        MemoryRegion(guestPhysicalAddress: 0, size: 0x2000),
                        MemoryRegion(guestPhysicalAddress: 0x1000, size: 0x1000)])) { enc, out in enc.encodeEnd(endRecord, into: &out) },
                    expectedError: WireError(offset: 40 + 8 + 24, reason: .badRegion(index: 1))))
    return v
}
