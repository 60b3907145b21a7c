import XCTest
import MigrationWire

final class WireTests: XCTestCase {
    func events(_ bytes: [UInt8], options: StreamDecoder.Options = .init()) -> [StreamEvent] {
        let (e, err) = decodeAll(bytes, options: options)
        XCTAssertNil(err)
        return e
    }

    func error(_ bytes: [UInt8], options: StreamDecoder.Options = .init()) -> WireError? {
        decodeAll(bytes, options: options).error
    }

    func testRoundTripOfEveryRecord() throws {
        let caps = Capabilities(codecs: [.zero, .raw, .zstd], maxChannels: 3, flags: [.postCopy])
        let bytes = stream(features: .liveMigration, layout: nil) { enc, out in
            enc.encodeCapabilities(caps, agreed: false, into: &out)
            enc.encodeCapabilities(caps, agreed: true, into: &out)
            enc.encodeLayout(vectorLayout, into: &out)
            batch(&enc, &out, pass: 0, pages: [(3, patternPage(4)), (4, nil)])
            enc.encodeDeviceState(DeviceState(componentID: 7, instance: 2, componentVersion: 9, blob: ByteSlice([1, 2, 3])), into: &out)
            enc.encodePassBoundary(PassBoundary(pass: 0, dirtyPages: 11, pagesSent: 2, zeroPages: 1, wireBytes: 5000,
                                                durationNanoseconds: 77), into: &out)
            enc.encodeNote("héllo", into: &out)
            enc.encodeSwitchover(Switchover(finalPass: 1), into: &out)
            enc.encodeEnd(endRecord, into: &out)
        }
        XCTAssertEqual(bytes.count % 8, 0)
        let e = events(bytes)
        XCTAssertEqual(e.count, 10)
        guard case .capabilitiesOffer(let offer) = e[1], case .capabilitiesAgreed(let agreed) = e[2],
              case .layout(let layout) = e[3], case .pageBatch(let b) = e[4], case .deviceState(let d) = e[5],
              case .passBoundary(let p) = e[6], case .note(let note) = e[7], case .switchover(let s) = e[8],
              case .end(let end) = e[9] else { return XCTFail("wrong events \(e)") }
        XCTAssertEqual(offer, caps)
        XCTAssertEqual(agreed, caps)
        XCTAssertEqual(layout, vectorLayout)
        XCTAssertEqual(b.pages.map(\.frame), [3, 4])
        XCTAssertEqual(b.pages.map(\.encoding), [.raw, .zero])
        b.withPageBytes(0) { XCTAssertEqual(Array($0), patternPage(4)) }
        XCTAssertEqual(d.componentID, 7); XCTAssertEqual(d.instance, 2); XCTAssertEqual(d.componentVersion, 9)
        XCTAssertEqual(d.blob.bytes, [1, 2, 3])
        XCTAssertEqual(p, PassBoundary(pass: 0, dirtyPages: 11, pagesSent: 2, zeroPages: 1, wireBytes: 5000, durationNanoseconds: 77))
        XCTAssertEqual(note, "héllo")
        XCTAssertEqual(s.finalPass, 1)
        XCTAssertEqual(end, endRecord)
    }

    func testPrefixPathEqualsContiguousEncoding() {
        let a = patternPage(1), b = patternPage(2)
        a.withUnsafeBytes { pa in b.withUnsafeBytes { pb in
            let pages = [PageSource(frame: 1, encoding: .raw, bytes: pa), .zero(frame: 2),
                         PageSource(frame: 3, encoding: .lz4, bytes: UnsafeRawBufferPointer(rebasing: pb[0..<100]))]
            var e1 = StreamEncoder(header: StreamHeader()), e2 = e1
            var whole: [UInt8] = []
            e1.encodePageBatch(pass: 0, pages: pages, into: &whole)
            // writev style: prefix into a small buffer, page bytes from their sources, then padding.
            var prefix = [UInt8](repeating: 0, count: StreamEncoder.batchPrefixLength(pageCount: 3))
            prefix.withUnsafeMutableBytes { _ = e2.encodePageBatchPrefix(pass: 0, pages: pages, into: $0) }
            var gathered = prefix + Array(pa) + Array(pb[0..<100])
            gathered += [UInt8](repeating: 0, count: WireFormat.padding(forBodyLength: 32 + 48 + 4196))
            XCTAssertEqual(whole, gathered)
            XCTAssertEqual(whole.count, StreamEncoder.batchLength(pageCount: 3, payloadLength: 4196))
        } }
    }

    func testCompressedBatchRoundTripAndNegotiation() {
        let fakeCompressed: [UInt8] = Array(repeating: 0x5A, count: 123)
        func make(agreedFlags: CapabilityFlags) -> [UInt8] {
            stream(features: .liveMigration, layout: nil) { enc, out in
                enc.encodeCapabilities(Capabilities(codecs: .all, maxChannels: 1, flags: agreedFlags), agreed: true, into: &out)
                enc.encodeLayout(vectorLayout, into: &out)
                var record = [UInt8](repeating: 0, count: StreamEncoder.batchLength(pageCount: 2, payloadLength: 123))
                record.withUnsafeMutableBytes { buf in
                    fakeCompressed.withUnsafeBytes {
                        _ = enc.encodeCompressedPageBatch(pass: 0, pages: [(1, .raw), (2, .zero)], pageSize: 4096,
                                                          compression: .zstd, compressedPayload: $0, into: buf)
                    }
                }
                out += record
                enc.encodeEnd(endRecord, into: &out)
            }
        }
        let ok = events(make(agreedFlags: .wholeBatchCompression))
        guard case .pageBatch(let b) = ok[3] else { return XCTFail() }
        XCTAssertEqual(b.compression, .zstd)
        XCTAssertEqual(b.payload.bytes, fakeCompressed)
        XCTAssertEqual(b.uncompressedPayloadLength, 4096)
        XCTAssertEqual(b.pages, [PageDescriptor(frame: 1, encoding: .raw, offset: 0, length: 4096),
                                 PageDescriptor(frame: 2, encoding: .zero, offset: 4096, length: 0)])
        XCTAssertEqual(error(make(agreedFlags: []))?.reason, .codecNotAgreed(2))
    }

    /// With `descriptorChecksum` agreed, a batch's checksum covers its header and descriptors: a flipped payload
    /// byte passes (the memory digest is what catches it), a flipped descriptor byte does not. A reader that did
    /// not agree checks whole batches, and refuses such a batch.
    func testDescriptorChecksumLeavesThePayloadOut() {
        func make(agreedFlags: CapabilityFlags, patch: Int? = nil) -> (bytes: [UInt8], batchAt: Int) {
            var batchAt = 0
            var bytes = stream(features: .liveMigration, layout: nil) { enc, out in
                enc.encodeCapabilities(Capabilities(codecs: .all, maxChannels: 1, flags: agreedFlags), agreed: true, into: &out)
                enc.encodeLayout(vectorLayout, into: &out)
                enc.checksumsPayload = false
                batchAt = out.count
                batch(&enc, &out, pass: 0, pages: [(1, patternPage(1)), (2, nil)])
                enc.encodeEnd(endRecord, into: &out)
            }
            if let patch { bytes[batchAt + 8 + patch] ^= 0x01 }
            return (bytes, batchAt)
        }
        let payloadByte = 32 + 2 * 16 + 100
        let (patched, batchAt) = make(agreedFlags: .descriptorChecksum, patch: payloadByte)
        guard case .pageBatch(let decoded) = events(patched)[3] else { return XCTFail("no batch") }
        var expected = patternPage(1)
        expected[100] ^= 0x01
        XCTAssertEqual(decoded.payload.bytes, expected, "the flipped payload byte is delivered as sent")

        XCTAssertEqual(error(make(agreedFlags: .descriptorChecksum, patch: 32 + 16 + 1).bytes)?.reason.name, "checksumMismatch",
                       "a descriptor's frame is covered")
        XCTAssertEqual(error(make(agreedFlags: .descriptorChecksum, patch: 8).bytes)?.reason.name, "sequenceGap",
                       "and the batch header is checked as before")
        let unagreed = error(make(agreedFlags: []).bytes)
        XCTAssertEqual(unagreed?.reason.name, "checksumMismatch", "without the agreement the checksum must cover the payload")
        XCTAssertEqual(unagreed?.offset, UInt64(batchAt + 8))
    }

    /// Unchanged pages (stream.md §6.4.1): a descriptor without payload, in place of a page's bytes, beside raw and
    /// zero pages and in a batch compressed as a whole, held to the agreement whether the stream carries it or the
    /// reader holds to it; and refused in pass 0, with a length, or without the agreement.
    func testUnchangedPages() {
        let agreed = Capabilities(codecs: .all, maxChannels: 1, flags: [.wholeBatchCompression, .unchangedPages])
        let fakeCompressed: [UInt8] = Array(repeating: 0x5A, count: 50)
        func make(carried: Capabilities?, pass: UInt32 = 1) -> [UInt8] {
            stream(features: .liveMigration, layout: nil) { enc, out in
                if let carried { enc.encodeCapabilities(carried, agreed: true, into: &out) }
                enc.encodeLayout(vectorLayout, into: &out)
                batch(&enc, &out, pass: pass, pages: [(1, patternPage(1)), (2, nil)], unchanged: [3, 0x100])
                var record = [UInt8](repeating: 0, count: StreamEncoder.batchLength(pageCount: 3, payloadLength: fakeCompressed.count))
                record.withUnsafeMutableBytes { buf in
                    fakeCompressed.withUnsafeBytes {
                        _ = enc.encodeCompressedPageBatch(pass: pass, pages: [(4, .unchanged), (5, .raw), (6, .unchanged)], pageSize: 4096,
                                                          compression: .lz4, compressedPayload: $0, into: buf)
                    }
                }
                out += record
                enc.encodeEnd(endRecord, into: &out)
            }
        }
        let decoded = events(make(carried: agreed))
        guard case .pageBatch(let plain) = decoded[3], case .pageBatch(let whole) = decoded[4] else { return XCTFail("\(decoded)") }
        XCTAssertEqual(plain.pages, [PageDescriptor(frame: 1, encoding: .raw, offset: 0, length: 4096),
                                     PageDescriptor(frame: 2, encoding: .zero, offset: 4096, length: 0),
                                     PageDescriptor(frame: 3, encoding: .unchanged, offset: 4096, length: 0),
                                     PageDescriptor(frame: 0x100, encoding: .unchanged, offset: 4096, length: 0)])
        XCTAssertEqual(plain.payload.bytes, patternPage(1), "unchanged pages add nothing to the payload")
        XCTAssertEqual(whole.pages.map(\.encoding), [.unchanged, .raw, .unchanged])
        XCTAssertEqual(whole.uncompressedPayloadLength, 4096, "one raw page in the compressed area")
        XCTAssertEqual(StreamEncoder.batchLength(pageCount: 4, payloadLength: 4096) - StreamEncoder.batchLength(pageCount: 2, payloadLength: 4096),
                       32, "an unchanged page costs its 16-byte descriptor")

        // A receiver holds the channels that do not carry the agreement to the one it wrote on its reply stream.
        let held = StreamDecoder()
        held.hold(to: agreed)
        XCTAssertNil(decodeAll(make(carried: nil), decoder: held).error)
        let heldWithout = StreamDecoder()
        heldWithout.hold(to: Capabilities(codecs: .all, maxChannels: 1, flags: [.wholeBatchCompression]))
        XCTAssertEqual(decodeAll(make(carried: nil), decoder: heldWithout).error?.reason, .codecNotAgreed(4))
        XCTAssertEqual(error(make(carried: nil))?.reason, .codecNotAgreed(4), "a stream without any agreement (a snapshot file)")
        XCTAssertEqual(error(make(carried: agreed, pass: 0))?.reason, .unchangedInPassZero(index: 2))
    }

    /// Patches one byte of the first page batch and returns the decoder's verdict. The checksum
    /// is checked after the structure, so structural errors surface with a stale checksum.
    func patchedBatch(at fieldOffset: Int, _ value: UInt8, channel: UInt16 = 0, channels: UInt16 = 1) -> WireError? {
        var enc = StreamEncoder(header: StreamHeader(pageSize: 4096, channel: channel, channelCount: channels))
        var out: [UInt8] = []
        enc.encodeHeader(into: &out)
        enc.encodeLayout(vectorLayout, into: &out)
        let batchStart = out.count
        batch(&enc, &out, pass: 0, pages: [(1, patternPage(1)), (2, nil)])
        enc.encodeEnd(End(digestAlgorithm: 0, digest: []), into: &out)
        out[batchStart + 8 + fieldOffset] = value
        return error(out)
    }

    func testBatchRejections() {
        let bodyAt: UInt64 = 120 + 8
        XCTAssertEqual(patchedBatch(at: 32 + 12, 9), WireError(offset: bodyAt + 44, reason: .badPageEncoding(index: 0, value: 9)))
        XCTAssertEqual(patchedBatch(at: 32 + 9, 0x20), WireError(offset: bodyAt + 40, reason: .badPageLength(index: 0, length: 0x2000)))
        XCTAssertEqual(patchedBatch(at: 32 + 16 + 12, 1), WireError(offset: bodyAt + 48 + 8, reason: .badPageLength(index: 1, length: 0)))
        XCTAssertEqual(patchedBatch(at: 32 + 13, 1), WireError(offset: bodyAt + 45, reason: .reservedNotZero))
        XCTAssertEqual(patchedBatch(at: 20, 1), WireError(offset: bodyAt + 20, reason: .wrongChannel(1)))
        XCTAssertEqual(patchedBatch(at: 22, 7), WireError(offset: bodyAt + 22, reason: .badBatchCompression(7)))
        XCTAssertEqual(patchedBatch(at: 4, 255), WireError(offset: bodyAt + 24, reason: .payloadLengthMismatch(declared: 4096, actual: 48)))
        XCTAssertEqual(patchedBatch(at: 25, 0), WireError(offset: bodyAt + 24, reason: .payloadLengthMismatch(declared: 0, actual: 4096)))
        XCTAssertEqual(patchedBatch(at: 32 + 7, 0xFF)?.reason, .pageOutsideLayout(index: 0, frame: 0xFF00_0000_0000_0001))
        XCTAssertEqual(patchedBatch(at: 100, 1)?.reason.name, "checksumMismatch")
        XCTAssertNil(patchedBatch(at: 23, 0))
        XCTAssertNil(patchedBatch(at: 20, 1, channel: 1, channels: 2))
    }

    func testTooManyPagesAgainstConfiguredLimit() {
        let bytes = stream { enc, out in batch(&enc, &out, pass: 0, pages: [(1, nil), (2, nil), (3, nil)]) }
        var options = StreamDecoder.Options()
        options.limits.maxPagesPerBatch = 2
        XCTAssertEqual(error(bytes, options: options), WireError(offset: 128 + 4, reason: .tooManyPages(3)))
    }

    func testLayoutLargerThanTheReadersBudget() {
        let bytes = stream(layout: GuestMemoryLayout(regions: [
            MemoryRegion(guestPhysicalAddress: 0, size: 1 << 30),
            MemoryRegion(guestPhysicalAddress: 1 << 32, size: 1 << 62)])) { enc, out in enc.encodeEnd(endRecord, into: &out) }
        XCTAssertEqual(error(bytes), WireError(offset: 40, reason: .layoutTooLarge(bytes: (1 << 62) + (1 << 30))))
        var options = StreamDecoder.Options()
        options.limits.maxGuestMemory = 1 << 20
        XCTAssertEqual(error(stream { enc, out in enc.encodeEnd(endRecord, into: &out) }, options: options)?.reason,
                       .layoutTooLarge(bytes: vectorLayout.totalBytes))
    }

    func testRecordOrderRules() {
        // Pass numbers never go back, and a pass boundary closes its pass.
        XCTAssertEqual(error(stream { enc, out in
            batch(&enc, &out, pass: 2, pages: [(1, nil)])
            batch(&enc, &out, pass: 1, pages: [(1, nil)])
        })?.reason, .passOutOfOrder(previous: 2, found: 1))
        XCTAssertEqual(error(stream { enc, out in
            enc.encodePassBoundary(PassBoundary(pass: 0, dirtyPages: 0), into: &out)
            batch(&enc, &out, pass: 0, pages: [(1, nil)])
        })?.reason, .passOutOfOrder(previous: 0, found: 0))
        // Two layouts; negotiation after the layout; switchover twice.
        XCTAssertEqual(error(stream { enc, out in enc.encodeLayout(vectorLayout, into: &out) })?.reason,
                       .unexpectedRecord(3))
        XCTAssertEqual(error(stream { enc, out in enc.encodeCapabilities(Capabilities(), agreed: false, into: &out) })?.reason,
                       .unexpectedRecord(1))
        XCTAssertEqual(error(stream { enc, out in
            enc.encodeSwitchover(Switchover(finalPass: 1), into: &out)
            enc.encodeSwitchover(Switchover(finalPass: 1), into: &out)
        })?.reason, .unexpectedRecord(7))
        // A secondary channel carries no device state.
        let enc = StreamEncoder(header: StreamHeader(channel: 1, channelCount: 2))
        var out: [UInt8] = []
        enc.encodeHeader(into: &out)
        enc.encodeLayout(vectorLayout, into: &out)
        enc.encodeDeviceState(DeviceState(componentID: 1, instance: 0, componentVersion: 1, blob: ByteSlice([])), into: &out)
        XCTAssertEqual(error(out), WireError(offset: 120, reason: .unexpectedRecord(5)))
    }

    func testHeaderRejections() {
        let good = stream { enc, out in enc.encodeEnd(endRecord, into: &out) }
        var channel = good; channel[24] = 1
        XCTAssertEqual(error(channel), WireError(offset: 24, reason: .badChannel(channel: 1, count: 1)))
        var length = good; length[10] = 40
        XCTAssertEqual(error(length), WireError(offset: 10, reason: .badHeaderLength(40)))
        var identified = good; identified[28] = 0x2A; identified[31] = 0x01  // any migration_id is accepted
        XCTAssertNil(error(identified))
        let decoder = StreamDecoder()
        decoder.feed(identified)
        guard case .header(let header)? = try? decoder.next() else { return XCTFail("no header") }
        XCTAssertEqual(header.migrationID, 0x0100_002A)
        var informational = good; informational[22] = 0x80  // unknown informational feature bit 54
        XCTAssertNil(error(informational))
        XCTAssertEqual(error(Array(good[..<20])), WireError(offset: 0, reason: .truncated))
        XCTAssertEqual(error([]), WireError(offset: 0, reason: .truncated))
        // A wrong magic is refused after 8 bytes, without waiting for the rest of the header.
        let d = StreamDecoder()
        d.feed([0x7F, 0x45, 0x4C, 0x46, 2, 1, 1, 0])
        XCTAssertThrowsError(try d.next()) { XCTAssertEqual($0 as? WireError, WireError(offset: 0, reason: .badMagic)) }
        // ...and stays failed.
        XCTAssertThrowsError(try d.next())
    }

    func testRecordRejections() {
        XCTAssertEqual(error(stream { enc, out in
            enc.encodeRawRecord(type: RecordType.abort.rawValue, body: le32(0) + le32(5000), into: &out)
        }), WireError(offset: 124 + 8, reason: .textTooLong(5000)))
        XCTAssertEqual(error(stream { enc, out in
            enc.encodeRawRecord(type: RecordType.abort.rawValue, body: le32(0) + le32(2) + [0xFF, 0xFE], into: &out)
        }), WireError(offset: 120 + 16, reason: .badText))
        XCTAssertEqual(error(stream { enc, out in
            enc.encodeRawRecord(type: RecordType.end.rawValue, body: le32(1) + le32(65), into: &out)
        }), WireError(offset: 120 + 12, reason: .digestTooLong(65)))
        XCTAssertEqual(error(stream { enc, out in
            enc.encodeRawRecord(type: RecordType.passBoundary.rawValue, body: [0, 0, 0, 0], into: &out)
        }), WireError(offset: 124, reason: .badRecordLength(type: 6, length: 4)))
        var deviceState = stream { enc, out in
            enc.encodeDeviceState(DeviceState(componentID: 1, instance: 0, componentVersion: 1, blob: ByteSlice([9, 9])), into: &out)
            enc.encodeEnd(endRecord, into: &out)
        }
        deviceState[120 + 8 + 24] = 8
        XCTAssertEqual(error(deviceState)?.reason.name, "checksumMismatch")
        // Checksums off (fuzzing): the same stream decodes.
        XCTAssertNil(error(deviceState, options: .init(verifyChecksums: false)))
    }

    func testPayloadSlicesSurviveLaterInput() throws {
        // Hold a batch while the decoder takes in much more input: its bytes must not change.
        let bytes = stream { enc, out in
            for i in 0..<40 { batch(&enc, &out, pass: 0, pages: [(UInt64(i), patternPage(i))]) }
            enc.encodeEnd(endRecord, into: &out)
        }
        let d = StreamDecoder()
        var held: [PageBatch] = []
        var position = 0
        while position < bytes.count {
            let n = min(5000, bytes.count - position)
            bytes[position ..< position + n].withUnsafeBytes { d.feed($0) }
            position += n
            while let e = try d.next() { if case .pageBatch(let b) = e { held.append(b) } }
        }
        try d.finish()
        XCTAssertEqual(held.count, 40)
        for (i, b) in held.enumerated() { b.withPageBytes(0) { XCTAssertEqual(Array($0), patternPage(i), "batch \(i)") } }
    }

    func testReceiveWritesStraightIntoTheBuffer() throws {
        let bytes = stream { enc, out in
            for i in 0..<10 { batch(&enc, &out, pass: 0, pages: [(UInt64(i), patternPage(i))]) }
            enc.encodeEnd(endRecord, into: &out)
        }
        let d = StreamDecoder()
        var position = 0
        var batches: [PageBatch] = []
        while true {
            // A "socket" that returns at most 3000 bytes per read.
            let n = d.receive(maximum: 3000) { buffer in
                let n = min(buffer.count, bytes.count - position)
                bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[position ..< position + n])) }
                position += n
                return n
            }
            while let e = try d.next() { if case .pageBatch(let b) = e { batches.append(b) } }
            if n == 0 { break }
        }
        try d.finish()
        XCTAssertEqual(batches.count, 10)
        for (i, b) in batches.enumerated() { b.withPageBytes(0) { XCTAssertEqual(Array($0), patternPage(i)) } }
    }

    func testRandomDamageNeverCrashes() {
        let seeds = allVectors().filter { $0.expectedError == nil }.map(\.bytes)
        var rng = SystemRandomNumberGenerator()
        var rejected = 0
        for round in 0..<3000 {
            var bytes = seeds[round % seeds.count]
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                switch Int.random(in: 0..<3, using: &rng) {
                case 0: bytes[Int.random(in: 0..<bytes.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                case 1: bytes.removeLast(Int.random(in: 0..<min(64, bytes.count), using: &rng))
                default: bytes.insert(UInt8.random(in: 0...255, using: &rng), at: Int.random(in: 0...bytes.count, using: &rng))
                }
                if bytes.isEmpty { bytes = [0] }
            }
            let options = StreamDecoder.Options(verifyChecksums: round % 2 == 0)
            if let e = decodeAll(bytes, chunks: [Int.random(in: 1...300, using: &rng)], options: options).error {
                XCTAssertLessThanOrEqual(e.offset, UInt64(bytes.count))
                rejected += 1
            }
        }
        XCTAssertGreaterThan(rejected, 1000)
    }

    func testSoftwareCRC32CKnownAnswer() {
        XCTAssertEqual(CRC32C.checksum(Array("123456789".utf8)), 0xE306_9283)
        let data = (0..<1000).map { UInt8($0 & 0xFF) }
        let whole = CRC32C.checksum(data)
        let split = data.withUnsafeBytes { CRC32C.update(CRC32C.update(0, UnsafeRawBufferPointer(rebasing: $0[..<333])),
                                                         UnsafeRawBufferPointer(rebasing: $0[333...])) }
        XCTAssertEqual(whole, split)
    }
}
