// Turns events into bytes (stream.md §3-6). The encoder writes into buffers the caller owns;
// page bytes are read from caller pointers (e.g. straight from the guest mapping) and copied
// once, into the output, or not at all when the caller sends them itself (writev).

/// One page to put into a batch: where it goes, how it is encoded, and its encoded bytes
/// (empty for a zero or unchanged page, one page for raw, the compressed block for lz4/zstd).
public struct PageSource {
    public var frame: UInt64
    public var encoding: PageEncoding
    public var bytes: UnsafeRawBufferPointer

    public init(frame: UInt64, encoding: PageEncoding, bytes: UnsafeRawBufferPointer) {
        self.frame = frame
        self.encoding = encoding
        self.bytes = bytes
    }

    public static func zero(frame: UInt64) -> PageSource {
        PageSource(frame: frame, encoding: .zero, bytes: UnsafeRawBufferPointer(start: nil, count: 0))
    }

    /// A page the receiver already holds as it is (stream.md §6.4.1): a descriptor, no bytes.
    public static func unchanged(frame: UInt64) -> PageSource {
        PageSource(frame: frame, encoding: .unchanged, bytes: UnsafeRawBufferPointer(start: nil, count: 0))
    }
}

/// Writes one stream (one channel, or one snapshot file). It numbers page batches itself.
public struct StreamEncoder {
    public let header: StreamHeader
    public let checksum: ChecksumFunction
    /// Sequence number the next page batch will carry.
    public private(set) var nextSequence: UInt64 = 0
    /// Whether page batch checksums cover the payload (stream.md §6.4); false once both ends agreed on
    /// `descriptorChecksum`.
    public var checksumsPayload = true

    public init(header: StreamHeader, checksum: @escaping ChecksumFunction = CRC32C.software) {
        self.header = header
        self.checksum = checksum
    }

    // MARK: fixed-size and small records, appended to an array

    /// Appends the 32-byte stream header.
    public func encodeHeader(into out: inout [UInt8]) {
        append(to: &out, count: WireFormat.headerLength) { w in
            WireFormat.magic.withUnsafeBytes { w.bytes($0) }
            w.u16(header.version)
            w.u16(UInt16(WireFormat.headerLength))
            w.u32(header.pageSize)
            w.u64(header.features.rawValue)
            w.u16(header.channel)
            w.u16(header.channelCount)
            w.u32(header.migrationID)
        }
    }

    public func encodeCapabilities(_ caps: Capabilities, agreed: Bool, into out: inout [UInt8]) {
        record(agreed ? .capabilitiesAgreed : .capabilitiesOffer, length: 16, into: &out) { w in
            w.u32(caps.codecs.rawValue)
            w.u16(caps.maxChannels)
            w.u16(0)
            w.u64(caps.flags.rawValue)
        }
    }

    public func encodeLayout(_ layout: GuestMemoryLayout, into out: inout [UInt8]) {
        record(.memoryLayout, length: layout.encodedLength, into: &out) { w in layout.encode(into: &w) }
    }

    public func encodeDeviceState(componentID: UInt32, instance: UInt32, componentVersion: UInt32,
                                  blob: UnsafeRawBufferPointer, into out: inout [UInt8]) {
        record(.deviceState, length: 24 + blob.count, into: &out) { w in
            let start = w.position
            w.u32(0) // checksum, patched below
            w.u32(componentID)
            w.u32(instance)
            w.u32(componentVersion)
            w.u32(UInt32(blob.count))
            w.u32(0)
            w.bytes(blob)
            let body = UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(w.buffer)[(start + 4) ..< w.position])
            w.buffer.storeBytes(of: checksum(0, body).littleEndian, toByteOffset: start, as: UInt32.self)
        }
    }

    public func encodeDeviceState(_ state: DeviceState, into out: inout [UInt8]) {
        state.blob.withUnsafeBytes {
            encodeDeviceState(componentID: state.componentID, instance: state.instance,
                              componentVersion: state.componentVersion, blob: $0, into: &out)
        }
    }

    public func encodePassBoundary(_ p: PassBoundary, into out: inout [UInt8]) {
        record(.passBoundary, length: 48, into: &out) { w in
            w.u32(p.pass); w.u32(0)
            w.u64(p.dirtyPages); w.u64(p.pagesSent); w.u64(p.zeroPages)
            w.u64(p.wireBytes); w.u64(p.durationNanoseconds)
        }
    }

    public func encodeSwitchover(_ s: Switchover, into out: inout [UInt8]) {
        record(.switchover, length: 8, into: &out) { w in w.u32(s.finalPass); w.u32(0) }
    }

    public func encodeEnd(_ e: End, into out: inout [UInt8]) {
        record(.end, length: 8 + e.digest.count, into: &out) { w in
            w.u32(e.digestAlgorithm)
            w.u32(UInt32(e.digest.count))
            e.digest.withUnsafeBytes { w.bytes($0) }
        }
    }

    public func encodeVerify(_ d: DigestRecord, into out: inout [UInt8]) { encodeDigest(.verify, d, into: &out) }
    public func encodeVerified(_ d: DigestRecord, into out: inout [UInt8]) { encodeDigest(.verified, d, into: &out) }
    public func encodeCommit(into out: inout [UInt8]) { record(.commit, length: 8, into: &out) { w in w.u64(0) } }
    public func encodeStarted(into out: inout [UInt8]) { record(.started, length: 8, into: &out) { w in w.u64(0) } }

    /// One MISSING_PAGES record of `runs` (at most `maxMissingRuns(limits:)` of them).
    public func encodeMissingPages(_ runs: ArraySlice<FrameRun>, into out: inout [UInt8]) {
        record(.missingPages, length: 8 + 16 * runs.count, into: &out) { w in
            w.u32(UInt32(runs.count))
            w.u32(0)
            for run in runs {
                w.u64(run.first)
                w.u64(run.count)
            }
        }
    }

    /// Most runs one MISSING_PAGES record carries within the record limit.
    public static func maxMissingRuns(limits: WireLimits = .v1) -> Int { (limits.maxRecordBody - 8) / 16 }

    /// All of `runs`, in as many MISSING_PAGES records as the record limit needs (none for no runs).
    public func encodeMissingPageRecords(_ runs: [FrameRun], into out: inout [UInt8]) {
        let perRecord = Self.maxMissingRuns()
        for start in stride(from: 0, to: runs.count, by: perRecord) {
            encodeMissingPages(runs[start ..< min(start + perRecord, runs.count)], into: &out)
        }
    }

    public func encodePostCopy(_ start: PostCopyStart, into out: inout [UInt8]) {
        record(.postCopy, length: 16, into: &out) { w in
            w.u32(start.finalPass)
            w.u32(0)
            w.u64(start.missingPages)
        }
    }

    public func encodePostCopyResume(finalPass: UInt32, into out: inout [UInt8]) {
        record(.postCopyResume, length: 8, into: &out) { w in
            w.u32(finalPass)
            w.u32(0)
        }
    }

    public func encodePreCopyTicket(_ ticket: PreCopyTicket, into out: inout [UInt8]) {
        record(.preCopyTicket, length: 24, into: &out) { w in
            w.u64(ticket.ticket.low)
            w.u64(ticket.ticket.high)
            w.u32((ticket.resume ? 1 : 0) | (ticket.discard ? 2 : 0))
            w.u32(0)
        }
    }

    /// HELD_PAGES records for the `hashes` of consecutive frames from `first` (16 bytes a page: `low` then `high`, as
    /// host-order UInt64 pairs; none zero), in as many records as `WireLimits.maxHeldPagesPerRecord` needs.
    public func encodeHeldPageRecords(first: UInt64, hashes: UnsafeRawBufferPointer, into out: inout [UInt8]) {
        precondition(hashes.count % 16 == 0)
        let pages = hashes.count / 16
        for start in stride(from: 0, to: pages, by: WireLimits.maxHeldPagesPerRecord) {
            let count = min(WireLimits.maxHeldPagesPerRecord, pages - start)
            let slice = UnsafeRawBufferPointer(rebasing: hashes[16 * start ..< 16 * (start + count)])
            record(.heldPages, length: 16 + 16 * count, into: &out) { w in
                w.u64(first + UInt64(start))
                w.u32(UInt32(count))
                w.u32(0)
                #if _endian(little)
                w.bytes(slice)
                #else
                for i in 0 ..< 2 * count { w.u64(slice.load(fromByteOffset: 8 * i, as: UInt64.self)) }
                #endif
            }
        }
    }

    public func encodePreCopyResumed(_ resumed: PreCopyResumed, into out: inout [UInt8]) {
        record(.preCopyResumed, length: 16, into: &out) { w in
            w.u64(resumed.heldPages)
            w.u32(resumed.outcome.rawValue)
            w.u32(0)
        }
    }

    /// CHANNEL_LOST (stream.md §6.16): secondary channel `channel` was dropped in pass `pass`.
    public func encodeChannelLost(channel: UInt16, pass: UInt32, into out: inout [UInt8]) {
        record(.channelLost, length: 8, into: &out) { w in
            w.u16(channel)
            w.u16(0)
            w.u32(pass)
        }
    }

    public func encodePostCopyReady(into out: inout [UInt8]) { record(.postCopyReady, length: 8, into: &out) { w in w.u64(0) } }

    /// All of `frames`, in as many PAGE_REQUEST records as their limit needs (none for no frames).
    public func encodePageRequests(_ frames: [UInt64], into out: inout [UInt8]) {
        for start in stride(from: 0, to: frames.count, by: WireLimits.maxRequestedPages) {
            encodePageRequest(frames[start ..< min(start + WireLimits.maxRequestedPages, frames.count)], into: &out)
        }
    }

    /// One PAGE_REQUEST of 1 ... `WireLimits.maxRequestedPages` frames.
    public func encodePageRequest(_ frames: ArraySlice<UInt64>, into out: inout [UInt8]) {
        precondition(!frames.isEmpty && frames.count <= WireLimits.maxRequestedPages)
        record(.pageRequest, length: 8 + 8 * frames.count, into: &out) { w in
            w.u32(UInt32(frames.count))
            w.u32(0)
            for frame in frames { w.u64(frame) }
        }
    }

    private func encodeDigest(_ type: RecordType, _ d: DigestRecord, into out: inout [UInt8]) {
        record(type, length: 8 + d.digest.count, into: &out) { w in
            w.u32(d.algorithm)
            w.u32(UInt32(d.digest.count))
            d.digest.withUnsafeBytes { w.bytes($0) }
        }
    }

    public func encodeAbort(_ a: Abort, into out: inout [UInt8]) {
        let text = Array(a.message.utf8.prefix(WireLimits.v1.maxText))
        record(.abort, length: 8 + text.count, into: &out) { w in
            w.u32(a.reason.rawValue)
            w.u32(UInt32(text.count))
            text.withUnsafeBytes { w.bytes($0) }
        }
    }

    public func encodePassApplied(pass: UInt32, into out: inout [UInt8]) {
        record(.passApplied, length: 8, into: &out) { w in
            w.u32(pass)
            w.u32(0)
        }
    }

    public func encodeNote(_ note: String, into out: inout [UInt8]) {
        let text = Array(note.utf8.prefix(WireLimits.v1.maxText))
        record(.note, length: 8 + text.count, into: &out) { w in
            w.u32(UInt32(text.count))
            w.u32(0)
            text.withUnsafeBytes { w.bytes($0) }
        }
    }

    /// Appends any record with a raw body (for unknown/optional records and tests).
    public func encodeRawRecord(type: UInt32, body: [UInt8], into out: inout [UInt8]) {
        record(RecordType(rawValue: type), length: body.count, into: &out) { w in body.withUnsafeBytes { w.bytes($0) } }
    }

    // MARK: page batches

    /// Length of the record prefix (record header, batch header, descriptors) for `pageCount` pages.
    public static func batchPrefixLength(pageCount: Int) -> Int {
        WireFormat.recordHeaderLength + 32 + 16 * pageCount
    }

    /// Total encoded length of a batch whose payload area has `payloadLength` bytes.
    public static func batchLength(pageCount: Int, payloadLength: Int) -> Int {
        let body = 32 + 16 * pageCount + payloadLength
        return WireFormat.recordHeaderLength + body + WireFormat.padding(forBodyLength: body)
    }

    /// Writes a complete, uncompressed page batch into `out` (which must hold
    /// `batchLength(pageCount:payloadLength:)` bytes) and returns the bytes written.
    /// Page bytes are copied once, from the sources into `out`.
    @discardableResult
    public mutating func encodePageBatch<C: Collection>(pass: UInt32, pages: C,
                                                        into out: UnsafeMutableRawBufferPointer) -> Int
    where C.Element == PageSource {
        let payload = pages.reduce(0) { $0 + $1.bytes.count }
        let prefix = encodePageBatchPrefix(pass: pass, pages: pages, into: out)
        var w = ByteWriter(UnsafeMutableRawBufferPointer(rebasing: out[prefix...]))
        for p in pages { w.bytes(p.bytes) }
        w.zeros(WireFormat.padding(forBodyLength: 32 + 16 * pages.count + payload))
        return prefix + w.position
    }

    /// Writes only the prefix of an uncompressed batch (record header, batch header, descriptors,
    /// checksum over all of it and, unless `checksumsPayload` is off, the page bytes). The caller then sends
    /// the page bytes in order,
    /// followed by `WireFormat.padding(forBodyLength:)` zero bytes, e.g. with writev straight
    /// from guest memory. Returns the prefix length.
    @discardableResult
    public mutating func encodePageBatchPrefix<C: Collection>(pass: UInt32, pages: C,
                                                              into out: UnsafeMutableRawBufferPointer) -> Int
    where C.Element == PageSource {
        let payload = pages.reduce(0) { $0 + $1.bytes.count }
        let checksum = self.checksum
        return writePrefix(pass: pass, count: pages.count, compression: .none, payloadLength: payload,
                            uncompressedLength: payload, into: out,
                            descriptors: { w in
                                Self.writeDescriptors(pages.lazy.map { (frame: $0.frame, length: $0.bytes.count, encoding: $0.encoding) },
                                                      into: &w)
                            },
                            continueChecksum: { crc in
                                var c = crc
                                for p in pages where p.bytes.count > 0 { c = checksum(c, p.bytes) }
                                return c
                            })
    }

    /// Writes a batch whose payload area was compressed as a whole. `pages` describe the
    /// uncompressed payload: each is zero, unchanged or raw, with its uncompressed length.
    @discardableResult
    public mutating func encodeCompressedPageBatch(pass: UInt32, pages: [(frame: UInt64, encoding: PageEncoding)],
                                                   pageSize: Int, compression: BatchCompression,
                                                   compressedPayload: UnsafeRawBufferPointer,
                                                   into out: UnsafeMutableRawBufferPointer) -> Int {
        let prefix = encodeCompressedPageBatchPrefix(pass: pass, pages: pages, pageSize: pageSize, compression: compression,
                                                     compressedPayload: compressedPayload, into: out)
        var w = ByteWriter(UnsafeMutableRawBufferPointer(rebasing: out[prefix...]))
        w.bytes(compressedPayload)
        w.zeros(WireFormat.padding(forBodyLength: 32 + 16 * pages.count + compressedPayload.count))
        return prefix + w.position
    }

    /// Writes only the prefix of a batch whose payload area was compressed as a whole (record header, batch
    /// header, descriptors, checksum over all of it and, unless `checksumsPayload` is off, `compressedPayload`). `pages` describe the uncompressed
    /// payload: each is zero, unchanged or raw. The caller then sends `compressedPayload` and
    /// `WireFormat.padding(forBodyLength:)` zero bytes. Returns the prefix length.
    @discardableResult
    public mutating func encodeCompressedPageBatchPrefix(pass: UInt32, pages: [(frame: UInt64, encoding: PageEncoding)],
                                                         pageSize: Int, compression: BatchCompression,
                                                         compressedPayload: UnsafeRawBufferPointer,
                                                         into out: UnsafeMutableRawBufferPointer) -> Int {
        precondition(compression != .none && pages.allSatisfy { $0.encoding.hasNoPayload || $0.encoding == .raw },
                     "a batch compressed as a whole holds zero, unchanged and raw pages")
        let descriptors = pages.lazy.map { (frame: $0.frame, length: $0.encoding.hasNoPayload ? 0 : pageSize, encoding: $0.encoding) }
        let uncompressed = descriptors.reduce(0) { $0 + $1.length }
        let checksum = self.checksum
        return writePrefix(pass: pass, count: pages.count, compression: compression,
                           payloadLength: compressedPayload.count, uncompressedLength: uncompressed, into: out,
                           descriptors: { w in Self.writeDescriptors(descriptors, into: &w) },
                           continueChecksum: { crc in checksum(crc, compressedPayload) })
    }

    /// Array convenience: appends an uncompressed batch to `out`.
    public mutating func encodePageBatch<C: Collection>(pass: UInt32, pages: C, into out: inout [UInt8])
    where C.Element == PageSource {
        let payload = pages.reduce(0) { $0 + $1.bytes.count }
        let length = Self.batchLength(pageCount: pages.count, payloadLength: payload)
        let start = out.count
        out.append(contentsOf: repeatElement(0, count: length))
        out.withUnsafeMutableBytes { buf in
            _ = encodePageBatch(pass: pass, pages: pages, into: UnsafeMutableRawBufferPointer(rebasing: buf[start...]))
        }
    }

    private mutating func writePrefix(pass: UInt32, count: Int, compression: BatchCompression,
                                      payloadLength: Int, uncompressedLength: Int,
                                      into out: UnsafeMutableRawBufferPointer,
                                      descriptors: (inout ByteWriter) -> Void,
                                      continueChecksum: (UInt32) -> UInt32) -> Int {
        precondition(count <= WireLimits.v1.maxPagesPerBatch, "too many pages for one batch")
        let body = 32 + 16 * count + payloadLength
        precondition(body <= WireLimits.v1.maxRecordBody, "batch larger than the format allows")
        var w = ByteWriter(out)
        w.u32(RecordType.pageBatch.rawValue)
        w.u32(UInt32(body))
        let bodyStart = w.position
        w.u32(0) // checksum, patched below
        w.u32(UInt32(count))
        w.u64(nextSequence)
        w.u32(pass)
        w.u16(header.channel)
        w.u8(compression.rawValue)
        w.u8(0)
        w.u32(UInt32(payloadLength))
        w.u32(UInt32(uncompressedLength))
        descriptors(&w)
        let covered = UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(out)[(bodyStart + 4) ..< w.position])
        let crc = checksumsPayload ? continueChecksum(checksum(0, covered)) : checksum(0, covered)
        out.storeBytes(of: crc.littleEndian, toByteOffset: bodyStart, as: UInt32.self)
        nextSequence += 1
        return w.position
    }

    // MARK: helpers

    /// One descriptor per page: frame, length in the uncompressed payload area, encoding.
    private static func writeDescriptors(_ pages: some Sequence<(frame: UInt64, length: Int, encoding: PageEncoding)>,
                                         into w: inout ByteWriter) {
        for p in pages {
            w.u64(p.frame); w.u32(UInt32(p.length)); w.u8(p.encoding.rawValue)
            w.u8(0); w.u8(0); w.u8(0)
        }
    }

    private func append(to out: inout [UInt8], count: Int, _ body: (inout ByteWriter) -> Void) {
        let start = out.count
        // An array, not `repeatElement`: unoptimized builds append a repeated element byte by byte (0.3 s for 2 MB of
        // held-page hashes), and an array of zeros is one memset in any build.
        out.append(contentsOf: [UInt8](repeating: 0, count: count))
        out.withUnsafeMutableBytes { buf in
            var w = ByteWriter(UnsafeMutableRawBufferPointer(rebasing: buf[start...]))
            body(&w)
            precondition(w.position == count, "record length mismatch")
        }
    }

    private func record(_ type: RecordType, length: Int, into out: inout [UInt8], _ body: (inout ByteWriter) -> Void) {
        let pad = WireFormat.padding(forBodyLength: length)
        append(to: &out, count: WireFormat.recordHeaderLength + length + pad) { w in
            w.u32(type.rawValue)
            w.u32(UInt32(length))
            body(&w)
            w.zeros(pad)
        }
    }
}

extension GuestMemoryLayout {
    /// The MEMORY_LAYOUT body (stream.md §6.3), which the snapshot format's LAYOUT part reuses.
    public var encodedLength: Int { 8 + 24 * regions.count }

    public func encode(into w: inout ByteWriter) {
        w.u32(UInt32(regions.count))
        w.u32(0)
        for r in regions {
            w.u64(r.guestPhysicalAddress)
            w.u64(r.size)
            w.u32(r.flags.rawValue)
            w.u32(0)
        }
    }
}
