// Turns bytes into events (stream.md §3-9). Feed bytes in chunks of any size; take events out.
// The decoder
//  - never traps on input: every length, count and index is checked before use;
//  - never allocates on the say-so of the stream: its buffer grows only with the bytes fed,
//    and a record longer than the limits is refused as soon as its header is seen; besides the
//    buffer it reads into, it keeps at most four it moved away from, for reuse;
//  - refuses pages outside the declared layout, and records out of order;
//  - reports each rejection as a WireError with the stream offset and a typed reason, after
//    which it stays failed.
// Page payloads and device-state blobs are yielded as slices of its buffer, not copied. With
// `payloadsInPlace`, the payload of an uncompressed batch whose checksum covers its descriptors only is not
// buffered at all: the caller receives it straight into guest memory (`receivePayload`).

public final class StreamDecoder {
    public struct Options: Sendable {
        public var limits: WireLimits
        /// Verify batch and device-state checksums. Only fuzzing turns this off, to reach
        /// the checks that lie behind a valid checksum.
        public var verifyChecksums: Bool
        /// Yield an uncompressed page batch as `.pageBatchAwaitingPayload` once its descriptors are in and
        /// checked, when its checksum covers them alone (`descriptorChecksum` agreed), and leave its payload
        /// to `receivePayload`; reads through `receive(maximum:)` then stop at each batch's descriptors.
        public var payloadsInPlace: Bool
        public init(limits: WireLimits = .v1, verifyChecksums: Bool = true, payloadsInPlace: Bool = false) {
            self.limits = limits
            self.verifyChecksums = verifyChecksums
            self.payloadsInPlace = payloadsInPlace
        }
    }

    public let options: Options
    public let checksum: ChecksumFunction

    /// The stream header, once read.
    public private(set) var header: StreamHeader?
    /// The memory layout, once read.
    public private(set) var layout: GuestMemoryLayout?
    /// The agreed capabilities, if the stream carried them.
    public private(set) var agreed: Capabilities?
    /// The agreement page batches are held to: the stream's own, or the one given to `hold(to:)`.
    private var rules: Capabilities? { agreed ?? heldTo }
    private var heldTo: Capabilities?
    /// Stream offset of the next byte the decoder will parse.
    public private(set) var offset: UInt64 = 0
    /// True after an end or abort record: the stream is complete.
    public private(set) var isComplete = false
    /// Number of unknown optional records skipped.
    public private(set) var skippedRecords = 0

    private var storage: ByteStorage
    /// Storages the decoder moved away from while yielded slices still pointed into them (see `reserve`).
    private var retired: [ByteStorage] = []
    private static let retiredLimit = 4
    /// Storages allocated, and bytes carried from one storage into the next (part of a record): for tests.
    private(set) var storagesAllocated = 1
    private(set) var carriedByteCount = 0
    private var readIndex = 0
    private var writeIndex = 0
    private var failure: WireError?
    /// The batch yielded as `.pageBatchAwaitingPayload`, whose payload and padding are still to come.
    private var awaitingPayload: (pages: [PageDescriptor], padding: Int)?
    /// Payload bytes `receivePayload` found already buffered and copied: for tests.
    private(set) var payloadBytesCopied = 0

    private var pageShift = 12
    private var sawOffer = false
    private var sawSwitchover = false
    private var sawVerify = false
    private var sawVerified = false
    private var sawPostCopy = false
    private var sawPostCopyReady = false
    /// Post-copy: frames listed missing so far, and the frame after the last run (runs ascend).
    private var missingListed: UInt64 = 0
    private var missingEnd: UInt64 = 0
    /// Resumable pre-copy: whether the ticket and the receiver's answer came, the pages listed held so far, and the
    /// frame after the last held run (runs ascend).
    private var sawTicket = false
    private var sawResumed = false
    private var heldListed: UInt64 = 0
    private var heldEnd: UInt64 = 0
    private var nextSequence: UInt64 = 0
    private var lastBatchPass: UInt32?
    private var lastBoundaryPass: UInt32?
    /// Channels this stream said were lost (§6.16): each may be named once.
    private var lostChannels: Set<UInt16> = []

    public init(options: Options = Options(), checksum: @escaping ChecksumFunction = CRC32C.software) {
        self.options = options
        self.checksum = checksum
        self.storage = ByteStorage(capacity: 64 << 10)
    }

    /// Holds the stream's page batches to `agreed` as if the stream had carried it (§6.2): for a receiver, which
    /// decides the agreement and writes it on its reply stream, while the sender's channels need not repeat it.
    public func hold(to agreed: Capabilities) { heldTo = agreed }

    /// Bytes fed but not yet turned into events.
    public var bufferedByteCount: Int { writeIndex - readIndex }

    // MARK: input

    /// Appends bytes to the decoder's buffer. The buffer grows by what is fed, so callers
    /// should feed in bounded chunks (the size of their socket reads).
    public func feed(_ bytes: UnsafeRawBufferPointer) {
        let n = bytes.count
        guard n > 0, let src = bytes.baseAddress else { return }
        reserve(n)
        (storage.base + writeIndex).copyMemory(from: src, byteCount: n)
        writeIndex += n
    }

    /// Lets the caller put up to `maximum` bytes straight into the decoder's buffer, e.g. with
    /// read(2) or a TLS decrypt, saving the copy that `feed` makes. `body` returns how many bytes
    /// it wrote (0 at end of input); that is what `receive` returns.
    ///
    /// Near the end of its buffer the decoder asks for a record's header on its own, then for the rest of the
    /// record when that fits, so that it moves to its next buffer at a record boundary and need not carry a
    /// partial record over.
    @discardableResult
    public func receive(maximum: Int, _ body: (UnsafeMutableRawBufferPointer) throws -> Int) rethrows -> Int {
        precondition(maximum >= 0)
        precondition(awaitingPayload == nil, "a batch's payload is awaited: receivePayload")
        var wanted = maximum
        let room = storage.capacity - writeIndex
        if options.payloadsInPlace, let rest = bytesToInPlaceStop(), rest > 0 {
            wanted = min(maximum, rest)
        } else if room < maximum, let rest = bytesToRecordBoundary(), rest > 0, rest <= room {
            wanted = rest
        }
        reserve(wanted)
        let n = try body(UnsafeMutableRawBufferPointer(start: storage.base + writeIndex, count: wanted))
        precondition(n >= 0 && n <= wanted, "receive: body reported \(n) bytes of \(wanted)")
        writeIndex += n
        return n
    }

    /// Bytes still to come of the header of the record that starts at the read position, or once that is in,
    /// of the whole record; nil before the stream header, after the end, or for a length the limits refuse
    /// (`next()` reports those).
    private func bytesToRecordBoundary() -> Int? {
        let available = writeIndex - readIndex
        guard header != nil, !isComplete else { return nil }
        if available < WireFormat.recordHeaderLength { return WireFormat.recordHeaderLength - available }
        let length = Int(UnsafeRawBufferPointer(start: storage.base + readIndex, count: available).le32(4))
        guard length <= options.limits.maxRecordBody else { return nil }
        return WireFormat.recordHeaderLength + length + WireFormat.padding(forBodyLength: length) - available
    }

    /// In-place mode: bytes still to come before the decoder can take the stream header, or the record at the
    /// read position: its header; for a page batch its batch header, then its descriptors if its payload goes in
    /// place; otherwise the whole record. Reads stop there, so that a payload meant for guest memory is not read
    /// into the buffer.
    private func bytesToInPlaceStop() -> Int? {
        let available = writeIndex - readIndex
        guard header != nil else { return WireFormat.headerLength - available }
        guard let rest = bytesToRecordBoundary() else { return nil }
        guard available >= WireFormat.recordHeaderLength else { return rest } // the record's header comes first
        let view = UnsafeRawBufferPointer(start: storage.base + readIndex, count: available)
        let length = Int(view.le32(4))
        guard RecordType(rawValue: view.le32(0)) == .pageBatch, length >= 32 else { return rest }
        if available < Self.batchHeaderEnd { return Self.batchHeaderEnd - available }
        return inPlacePrefixLength(view, bodyLength: length).map { $0 - available } ?? rest
    }

    /// Where a page batch's fixed header ends, counted from the start of its record.
    private static let batchHeaderEnd = WireFormat.recordHeaderLength + 32

    /// The length of record header, batch header and descriptors of the page batch at the start of `view`, if
    /// its payload is to be received in place: in-place mode, descriptor checksums agreed, uncompressed, a page
    /// count within the limits and a body that holds the descriptors and some payload. Anything else (including
    /// every malformed batch) takes the buffered path, which reports what is wrong.
    private func inPlacePrefixLength(_ view: UnsafeRawBufferPointer, bodyLength: Int) -> Int? {
        guard options.payloadsInPlace, layout != nil, rules?.flags.contains(.descriptorChecksum) == true,
              view.count >= Self.batchHeaderEnd, view[WireFormat.recordHeaderLength + 22] == BatchCompression.none.rawValue else { return nil }
        let count = Int(view.le32(WireFormat.recordHeaderLength + 4))
        guard count <= options.limits.maxPagesPerBatch, 32 + 16 * count < bodyLength else { return nil }
        return Self.batchHeaderEnd + 16 * count
    }

    /// Makes room for `n` more bytes after `writeIndex`.
    private func reserve(_ n: Int) {
        let unread = writeIndex - readIndex
        guard storage.capacity - writeIndex < n else { return }
        if isKnownUniquelyReferenced(&storage) && storage.capacity >= unread + n {
            // Nothing else sees this storage: slide the unread bytes to the front.
            if unread > 0 { storage.base.copyMemory(from: storage.base + readIndex, byteCount: unread) }
        } else {
            // Yielded slices may still point into the old storage: leave it to them, and copy
            // only the unread bytes (less than one record) into another one, four reads long, so that
            // moving between storages (and the copy it may take) is rare.
            let fresh = reusableStorage(capacity: unread + n) ?? newStorage(capacity: Self.storageCapacity(unread: unread, read: n))
            if unread > 0 { fresh.base.copyMemory(from: storage.base + readIndex, byteCount: unread) }
            carriedByteCount += unread
            retire(storage)
            storage = fresh
        }
        readIndex = 0
        writeIndex = unread
    }

    private func newStorage(capacity: Int) -> ByteStorage {
        storagesAllocated += 1
        return ByteStorage(capacity: capacity)
    }

    private static func storageCapacity(unread: Int, read: Int) -> Int {
        var capacity = 64 << 10
        while capacity < max(4 * read, unread + read) { capacity *= 2 }
        return capacity
    }

    /// A storage given up earlier whose slices have all been released, with room for `capacity` bytes. Reusing
    /// one saves the page faults and zero-filling that the kernel charges for fresh memory, on every buffer.
    private func reusableStorage(capacity: Int) -> ByteStorage? {
        for i in retired.indices where retired[i].capacity >= capacity && isKnownUniquelyReferenced(&retired[i]) {
            return retired.remove(at: i)
        }
        return nil
    }

    /// Keeps a storage the decoder moves away from, for reuse; at most `retiredLimit`, the oldest given up first.
    private func retire(_ old: ByteStorage) {
        retired.append(old)
        if retired.count > Self.retiredLimit { retired.removeFirst() }
    }

    public func feed(_ bytes: [UInt8]) { bytes.withUnsafeBytes { feed($0) } }

    /// Signals the end of input: throws `truncated` unless the stream ended with an end or
    /// abort record and nothing follows it.
    public func finish() throws {
        if let failure { throw failure }
        while try next() != nil {}
        if !isComplete || writeIndex > readIndex {
            throw fail(offset, isComplete ? .dataAfterEnd : .truncated)
        }
    }

    // MARK: output

    /// The next event, or nil when more bytes are needed.
    public func next() throws -> StreamEvent? {
        if let failure { throw failure }
        precondition(awaitingPayload == nil, "a batch's payload is awaited: receivePayload")
        let available = writeIndex - readIndex
        guard header != nil else {
            return available >= WireFormat.magic.count ? try parseHeader(available) : nil
        }
        if isComplete {
            if available > 0 { throw fail(offset, .dataAfterEnd) }
            return nil
        }
        guard available >= WireFormat.recordHeaderLength else { return nil }
        let view = UnsafeRawBufferPointer(start: storage.base + readIndex, count: available)
        let type = RecordType(rawValue: view.le32(0))
        let length = view.le32(4)
        if Int(length) > options.limits.maxRecordBody { throw fail(offset + 4, .recordTooLarge(type: type.rawValue, length: length)) }
        if !type.isOptional && !Self.knownTypes.contains(type) { throw fail(offset, .unknownMandatoryRecord(type.rawValue)) }
        let bodyLength = Int(length)
        let total = WireFormat.recordHeaderLength + bodyLength + WireFormat.padding(forBodyLength: bodyLength)
        if type == .pageBatch, let prefix = inPlacePrefixLength(view, bodyLength: bodyLength) {
            guard available >= prefix else { return nil }
            let body = UnsafeRawBufferPointer(rebasing: view[WireFormat.recordHeaderLength ..< prefix])
            let at = offset + UInt64(WireFormat.recordHeaderLength)
            guard case .pageBatch(let batch) = try parseBatch(body, bodyLength: bodyLength, bodyIndex: readIndex + WireFormat.recordHeaderLength,
                                                              at: at) else { preconditionFailure("parseBatch yields batches") }
            readIndex += prefix
            offset += UInt64(prefix)
            awaitingPayload = (batch.pages, WireFormat.padding(forBodyLength: bodyLength))
            return .pageBatchAwaitingPayload(batch)
        }
        guard available >= total else { return nil }
        for i in (WireFormat.recordHeaderLength + bodyLength) ..< total where view[i] != 0 {
            throw fail(offset + UInt64(i), .nonZeroPadding)
        }
        let body = UnsafeRawBufferPointer(rebasing: view[WireFormat.recordHeaderLength ..< WireFormat.recordHeaderLength + bodyLength])
        let event = try parseRecord(type, body: body, bodyIndex: readIndex + WireFormat.recordHeaderLength)
        readIndex += total
        offset += UInt64(total)
        return event
    }

    /// Receives the payload of the batch just yielded as `.pageBatchAwaitingPayload` into place: each page's
    /// bytes to `destination(page)` (which must hold a page; zero and unchanged pages have no bytes and are not asked for),
    /// pages whose destinations lie back to back in one piece. Bytes the decoder already holds are copied, the
    /// rest come from `receive` (as in `receive(maximum:)`: it returns how many bytes it wrote, 0 at the end of
    /// input). Then the padding is checked. A short stream fails as `truncated`.
    public func receivePayload(into destination: (PageDescriptor) -> UnsafeMutableRawPointer,
                               _ receive: (UnsafeMutableRawBufferPointer) throws -> Int) throws {
        if let failure { throw failure }
        guard let (pages, padding) = awaitingPayload else { preconditionFailure("no batch awaits its payload") }
        awaitingPayload = nil
        var run: (start: UnsafeMutableRawPointer, length: Int)?
        for page in pages where page.length > 0 {
            let target = destination(page)
            if let current = run, current.start + current.length == target {
                run!.length += page.length
                continue
            }
            if let current = run { try fill(current.start, current.length, receive) }
            run = (target, page.length)
        }
        if let current = run { try fill(current.start, current.length, receive) }
        var zeros: UInt64 = 0
        try withUnsafeMutableBytes(of: &zeros) { padBytes in
            let expected = UnsafeMutableRawBufferPointer(rebasing: padBytes[0 ..< padding])
            let start = offset
            try fill(expected.baseAddress!, padding, receive)
            if let i = expected.firstIndex(where: { $0 != 0 }) { throw fail(start + UInt64(i), .nonZeroPadding) }
        }
    }

    /// Puts the next `count` bytes of the stream at `target`: first those already buffered, then from `receive`.
    private func fill(_ target: UnsafeMutableRawPointer, _ count: Int, _ receive: (UnsafeMutableRawBufferPointer) throws -> Int) throws {
        let buffered = min(writeIndex - readIndex, count)
        if buffered > 0 {
            target.copyMemory(from: storage.base + readIndex, byteCount: buffered)
            readIndex += buffered
            payloadBytesCopied += buffered
        }
        offset += UInt64(buffered)
        var done = buffered
        while done < count {
            let n = try receive(UnsafeMutableRawBufferPointer(start: target + done, count: count - done))
            precondition(n >= 0 && n <= count - done, "receive: body reported \(n) bytes of \(count - done)")
            if n == 0 { throw fail(offset, .truncated) }
            done += n
            offset += UInt64(n)
        }
    }

    private static let knownTypes: Set<RecordType> = [
        .capabilitiesOffer, .capabilitiesAgreed, .memoryLayout, .pageBatch, .deviceState,
        .passBoundary, .switchover, .end, .abort, .note, .verify, .verified, .commit, .started, .passApplied,
        .missingPages, .postCopy, .postCopyReady, .pageRequest, .postCopyResume, .preCopyTicket, .heldPages, .preCopyResumed, .channelLost,
    ]

    private func fail(_ at: UInt64, _ reason: WireError.Reason) -> WireError {
        let e = WireError(offset: at, reason: reason)
        failure = e
        return e
    }

    // MARK: header

    private func parseHeader(_ available: Int) throws -> StreamEvent? {
        let h = UnsafeRawBufferPointer(start: storage.base + readIndex, count: available)
        // Reject a wrong magic as soon as 8 bytes are in, before waiting for more.
        if !WireFormat.magic.withUnsafeBytes({ $0.elementsEqual(h[0..<8]) }) { throw fail(0, .badMagic) }
        guard available >= WireFormat.headerLength else { return nil }
        let version = h.le16(8)
        if version == 0 || version > WireFormat.version { throw fail(8, .unsupportedVersion(version)) }
        let headerLength = h.le16(10)
        if Int(headerLength) != WireFormat.headerLength { throw fail(10, .badHeaderLength(headerLength)) }
        let pageSize = h.le32(12)
        if pageSize < 4096 || pageSize > 65536 || pageSize & (pageSize - 1) != 0 { throw fail(12, .badPageSize(pageSize)) }
        let features = h.le64(16)
        let unknown = features & StreamFeatures.mandatoryMask & ~StreamFeatures.knownMandatory
        if unknown != 0 { throw fail(16, .unsupportedMandatoryFeatures(unknown)) }
        let channel = h.le16(24), count = h.le16(26)
        if count == 0 || channel >= count { throw fail(24, .badChannel(channel: channel, count: count)) }
        let header = StreamHeader(version: version, pageSize: pageSize, features: StreamFeatures(rawValue: features),
                                  channel: channel, channelCount: count, migrationID: h.le32(28))
        self.header = header
        pageShift = pageSize.trailingZeroBitCount
        readIndex += WireFormat.headerLength
        offset += UInt64(WireFormat.headerLength)
        return .header(header)
    }

    // MARK: records

    private func parseRecord(_ type: RecordType, body: UnsafeRawBufferPointer, bodyIndex: Int) throws -> StreamEvent {
        let at = offset + UInt64(WireFormat.recordHeaderLength) // stream offset of body[0]
        let isMain = header!.channel == 0
        func need(_ ok: Bool) throws {
            if !ok { throw fail(offset + 4, .badRecordLength(type: type.rawValue, length: UInt32(body.count))) }
        }
        func unexpected() -> WireError { fail(offset, .unexpectedRecord(type.rawValue)) }
        // A reply stream runs from receiver to sender: it opens with the agreed capabilities, carries no layout,
        // and holds only the receiver's side of the switchover handshake.
        let isReply = agreed != nil && !sawOffer
        func digestRecord() throws -> DigestRecord {
            try need(body.count >= 8)
            let length = body.le32(4)
            if Int(length) > options.limits.maxDigest { throw fail(at + 4, .digestTooLong(length)) }
            try need(body.count == 8 + Int(length))
            return DigestRecord(algorithm: body.le32(0), digest: Array(body[8...]))
        }
        func reservedZero(_ fieldOffset: Int, _ value: UInt64) throws {
            if value != 0 { throw fail(at + UInt64(fieldOffset), .reservedNotZero) }
        }

        switch type {
        case .capabilitiesOffer, .capabilitiesAgreed:
            try need(body.count == 16)
            let agreedRecord = type == .capabilitiesAgreed
            if !isMain || layout != nil || agreed != nil || (!agreedRecord && sawOffer) { throw unexpected() }
            try reservedZero(6, UInt64(body.le16(6)))
            let caps = Capabilities(codecs: CodecSet(rawValue: body.le32(0)), maxChannels: body.le16(4),
                                    flags: CapabilityFlags(rawValue: body.le64(8)))
            if agreedRecord { agreed = caps; return .capabilitiesAgreed(caps) }
            sawOffer = true
            return .capabilitiesOffer(caps)

        case .memoryLayout:
            try need(body.count >= 8)
            if layout != nil { throw unexpected() }
            let count = body.le32(0)
            if Int(count) > options.limits.maxRegions { throw fail(at, .tooManyRegions(count)) }
            try reservedZero(4, UInt64(body.le32(4)))
            try need(body.count == 8 + 24 * Int(count))
            var regions: [MemoryRegion] = []
            regions.reserveCapacity(Int(count))
            for i in 0..<Int(count) {
                let o = 8 + 24 * i
                try reservedZero(o + 20, UInt64(body.le32(o + 20)))
                regions.append(MemoryRegion(guestPhysicalAddress: body.le64(o), size: body.le64(o + 8),
                                            flags: RegionFlags(rawValue: body.le32(o + 16))))
            }
            let l = GuestMemoryLayout(regions: regions)
            if let bad = l.firstInvalidRegion(pageSize: header!.pageSize) {
                throw fail(at + 8 + 24 * UInt64(bad), .badRegion(index: bad))
            }
            // Sorted and non-overlapping, so the sum cannot overflow.
            if l.totalBytes > options.limits.maxGuestMemory { throw fail(at, .layoutTooLarge(bytes: l.totalBytes)) }
            layout = l
            return .layout(l)

        case .pageBatch:
            return try parseBatch(body, bodyLength: body.count, bodyIndex: bodyIndex, at: at)

        case .deviceState:
            try need(body.count >= 24)
            if !isMain { throw unexpected() }
            let blobLength = body.le32(16)
            if Int(blobLength) > options.limits.maxDeviceStateBlob { throw fail(at + 16, .blobTooLarge(blobLength)) }
            try need(body.count == 24 + Int(blobLength))
            try reservedZero(20, UInt64(body.le32(20)))
            try verify(stored: body.le32(0), body, at: at)
            return .deviceState(DeviceState(componentID: body.le32(4), instance: body.le32(8),
                                            componentVersion: body.le32(12),
                                            blob: ByteSlice(storage: storage, start: bodyIndex + 24, count: Int(blobLength))))

        case .passBoundary:
            try need(body.count == 48)
            try reservedZero(4, UInt64(body.le32(4)))
            let pass = body.le32(0)
            if let last = lastBoundaryPass, pass <= last { throw fail(at, .passOutOfOrder(previous: last, found: pass)) }
            if let last = lastBatchPass, pass < last { throw fail(at, .passOutOfOrder(previous: last, found: pass)) }
            lastBoundaryPass = pass
            return .passBoundary(PassBoundary(pass: pass, dirtyPages: body.le64(8), pagesSent: body.le64(16),
                                              zeroPages: body.le64(24), wireBytes: body.le64(32),
                                              durationNanoseconds: body.le64(40)))

        case .switchover:
            try need(body.count == 8)
            if !isMain || sawSwitchover || layout == nil { throw unexpected() }
            try reservedZero(4, UInt64(body.le32(4)))
            sawSwitchover = true
            return .switchover(Switchover(finalPass: body.le32(0)))

        case .end:
            try need(body.count >= 8)
            if layout == nil && !isReply { throw unexpected() }
            let length = body.le32(4)
            if Int(length) > options.limits.maxDigest { throw fail(at + 4, .digestTooLong(length)) }
            try need(body.count == 8 + Int(length))
            isComplete = true
            return .end(End(digestAlgorithm: body.le32(0), digest: Array(body[8...])))

        case .verify:
            if !isMain || !(sawSwitchover || sawPostCopy) || sawVerify { throw unexpected() }
            sawVerify = true
            return .verify(try digestRecord())

        case .verified:
            if !isReply || sawVerified { throw unexpected() }
            sawVerified = true
            return .verified(try digestRecord())

        case .commit, .started:
            try need(body.count == 8)
            try reservedZero(0, body.le64(0))
            if type == .commit {
                // After the digest is verified, or in post-copy once the missing pages are listed (§6.13).
                if !isMain || !(sawVerify || sawPostCopy) { throw unexpected() }
                return .commit
            }
            if !isReply || !(sawVerified || sawPostCopyReady) { throw unexpected() }
            return .started

        case .missingPages:
            try need(body.count >= 8)
            // From the sender before POSTCOPY; or, when a post-copy resumes, from the receiver on its new reply stream,
            // which has no layout: the sender checks those runs against its own list (§6.14).
            let fromResumedReply = isReply && rules?.flags.isSuperset(of: [.postCopy, .resume]) == true && !sawPostCopyReady
            if !(isMain && layout != nil && rules?.flags.contains(.postCopy) == true || fromResumedReply) || sawSwitchover || sawPostCopy {
                throw unexpected()
            }
            let count = Int(body.le32(0))
            try reservedZero(4, UInt64(body.le32(4)))
            try need(count >= 1 && body.count == 8 + 16 * count)
            var runs: [FrameRun] = []
            runs.reserveCapacity(count)
            for i in 0 ..< count {
                let run = FrameRun(first: body.le64(8 + 16 * i), count: body.le64(16 + 16 * i))
                guard run.count > 0, run.first >= missingEnd, run.first <= UInt64.max - run.count,
                      layout?.contains(run, pageShift: pageShift) ?? true else {
                    throw fail(at + 8 + 16 * UInt64(i), .badMissingRun(index: i))
                }
                missingEnd = run.first + run.count
                missingListed += run.count
                runs.append(run)
            }
            return .missingPages(runs)

        case .postCopy:
            try need(body.count == 16)
            let fromResumedReply = isReply && rules?.flags.isSuperset(of: [.postCopy, .resume]) == true && !sawPostCopyReady
            if !(isMain && layout != nil && rules?.flags.contains(.postCopy) == true || fromResumedReply) || sawSwitchover || sawPostCopy {
                throw unexpected()
            }
            try reservedZero(4, UInt64(body.le32(4)))
            let start = PostCopyStart(finalPass: body.le32(0), missingPages: body.le64(8))
            if start.missingPages != missingListed {
                throw fail(at + 8, .missingPagesMismatch(declared: start.missingPages, listed: missingListed))
            }
            if let last = lastBoundaryPass, start.finalPass <= last { throw fail(at, .passOutOfOrder(previous: last, found: start.finalPass)) }
            if let last = lastBatchPass, start.finalPass < last { throw fail(at, .passOutOfOrder(previous: last, found: start.finalPass)) }
            sawPostCopy = true
            return .postCopy(start)

        case .postCopyResume:
            try need(body.count == 8)
            if !isMain || layout != nil || sawOffer || agreed != nil || rules?.flags.isSuperset(of: [.postCopy, .resume]) != true {
                throw unexpected()
            }
            try reservedZero(4, UInt64(body.le32(4)))
            sawPostCopy = true
            return .postCopyResume(finalPass: body.le32(0))

        case .preCopyTicket:
            try need(body.count == 24)
            // On the main channel, after the layout and before any page or pass (§6.15).
            if !isMain || layout == nil || rules?.flags.contains(.preCopyResume) != true || sawTicket || lastBatchPass != nil
                || lastBoundaryPass != nil || sawSwitchover || sawPostCopy { throw unexpected() }
            let flags = body.le32(16)
            if flags & ~3 != 0 { throw fail(at + 16, .reservedNotZero) }
            if flags == 3 { throw fail(at + 16, .badPreCopyTicket) }
            try reservedZero(20, UInt64(body.le32(20)))
            sawTicket = true
            return .preCopyTicket(PreCopyTicket(ticket: ResumeTicket(low: body.le64(0), high: body.le64(8)), resume: flags & 1 != 0,
                                                      discard: flags & 2 != 0))

        case .heldPages:
            try need(body.count >= 16)
            // On a reply stream, before the receiver's answer; it has no layout, so the sender checks the frames.
            if !isReply || rules?.flags.contains(.preCopyResume) != true || sawResumed { throw unexpected() }
            let first = body.le64(0), count = Int(body.le32(8))
            try reservedZero(12, UInt64(body.le32(12)))
            guard count >= 1, count <= WireLimits.maxHeldPagesPerRecord, first >= heldEnd, first <= UInt64.max - UInt64(count) else {
                throw fail(at, .badHeldRun)
            }
            try need(body.count == 16 + 16 * count)
            let hashes = [HeldHash](unsafeUninitializedCapacity: count) { buffer, initialized in
                for i in 0 ..< count { buffer[i] = HeldHash(low: body.le64(16 + 16 * i), high: body.le64(24 + 16 * i)) }
                initialized = count
            }
            // A zero hash is a page the receiver does not hold (§7): it is never listed.
            if let i = hashes.firstIndex(of: HeldHash(low: 0, high: 0)) { throw fail(at + 16 + 16 * UInt64(i), .badHeldRun) }
            heldEnd = first + UInt64(count)
            heldListed += UInt64(count)
            return .heldPages(HeldPageRun(first: first, hashes: hashes))

        case .preCopyResumed:
            try need(body.count == 16)
            if !isReply || rules?.flags.contains(.preCopyResume) != true || sawResumed { throw unexpected() }
            try reservedZero(12, UInt64(body.le32(12)))
            guard let outcome = PreCopyResumed.Outcome(rawValue: body.le32(8)), body.le64(0) == heldListed,
                  outcome == .resumed || heldListed == 0 else { throw fail(at, .badPreCopyResumed) }
            sawResumed = true
            return .preCopyResumed(PreCopyResumed(outcome: outcome, heldPages: heldListed))

        case .channelLost:
            try need(body.count == 8)
            // During pre-copy only: from the sender on the main channel, from the receiver on its reply stream (§6.16).
            let fromSender = isMain && layout != nil && !sawSwitchover && !sawPostCopy
            let fromReceiver = isReply && layout == nil && !sawVerified && !sawPostCopyReady
            if rules?.flags.contains(.channelLoss) != true || !(fromSender || fromReceiver) { throw unexpected() }
            try reservedZero(2, UInt64(body.le16(2)))
            let channel = body.le16(0), pass = body.le32(4)
            // Channel 0 carries the migration's control and cannot be lost; no channel is lost twice.
            if channel == 0 || channel >= header!.channelCount || lostChannels.contains(channel) { throw fail(at, .wrongChannel(channel)) }
            if fromSender {
                if let last = lastBoundaryPass, pass <= last { throw fail(at + 4, .passOutOfOrder(previous: last, found: pass)) }
                if let last = lastBatchPass, pass < last { throw fail(at + 4, .passOutOfOrder(previous: last, found: pass)) }
            }
            lostChannels.insert(channel)
            return .channelLost(channel: channel, pass: pass)

        case .postCopyReady:
            try need(body.count == 8)
            if !isReply || rules?.flags.contains(.postCopy) != true || sawPostCopyReady || sawVerified { throw unexpected() }
            try reservedZero(0, body.le64(0))
            sawPostCopyReady = true
            return .postCopyReady

        case .pageRequest:
            try need(body.count >= 8)
            // After POSTCOPY_READY, or on a resumed reply stream after its list of missing pages.
            if !isReply || !(sawPostCopyReady || sawPostCopy) || sawVerified { throw unexpected() }
            let count = body.le32(0)
            if count == 0 || Int(count) > WireLimits.maxRequestedPages { throw fail(at, .badPageRequest(count)) }
            try reservedZero(4, UInt64(body.le32(4)))
            try need(body.count == 8 + 8 * Int(count))
            return .pageRequest((0 ..< Int(count)).map { body.le64(8 + 8 * $0) })

        case .abort:
            try need(body.count >= 8)
            let length = body.le32(4)
            if Int(length) > options.limits.maxText { throw fail(at + 4, .textTooLong(length)) }
            try need(body.count == 8 + Int(length))
            guard let text = String(validating: body[8...], as: UTF8.self) else { throw fail(at + 8, .badText) }
            isComplete = true
            return .abort(Abort(reason: AbortReason(rawValue: body.le32(0)), message: text))

        case .passApplied:
            try need(body.count == 8)
            if !isReply { throw unexpected() }
            try reservedZero(4, UInt64(body.le32(4)))
            return .passApplied(pass: body.le32(0))

        case .note:
            try need(body.count >= 8)
            let length = body.le32(0)
            if Int(length) > options.limits.maxText { throw fail(at, .textTooLong(length)) }
            try need(body.count == 8 + Int(length))
            try reservedZero(4, UInt64(body.le32(4)))
            guard let text = String(validating: body[8...], as: UTF8.self) else { throw fail(at + 8, .badText) }
            return .note(text)

        default:
            // Unknown and optional (unknown mandatory types were refused at the record header).
            skippedRecords += 1
            return .skippedOptional(type: type.rawValue, length: body.count)
        }
    }

    /// Checks the checksum stored in a body's first four bytes against bytes 4 ..< `end` (the whole body unless
    /// a batch's checksum covers its descriptors only).
    private func verify(stored: UInt32, _ body: UnsafeRawBufferPointer, through end: Int? = nil, at: UInt64) throws {
        guard options.verifyChecksums else { return }
        let computed = checksum(0, UnsafeRawBufferPointer(rebasing: body[4 ..< (end ?? body.count)]))
        if computed != stored { throw fail(at, .checksumMismatch(stored: stored, computed: computed)) }
    }

    /// Parses a page batch of `bodyLength` bytes; `body` holds all of it, or, for a payload to be received in
    /// place, its batch header and descriptors only.
    private func parseBatch(_ body: UnsafeRawBufferPointer, bodyLength: Int, bodyIndex: Int, at: UInt64) throws -> StreamEvent {
        guard let layout else { throw fail(offset, .unexpectedRecord(RecordType.pageBatch.rawValue)) }
        let header = self.header!
        if bodyLength < 32 { throw fail(offset + 4, .badRecordLength(type: RecordType.pageBatch.rawValue, length: UInt32(bodyLength))) }
        let count = body.le32(4)
        if Int(count) > options.limits.maxPagesPerBatch { throw fail(at + 4, .tooManyPages(count)) }
        let sequence = body.le64(8)
        let pass = body.le32(16)
        let channel = body.le16(20)
        let compressionValue = body[22]
        if body[23] != 0 { throw fail(at + 23, .reservedNotZero) }
        let payloadLength = body.le32(24)
        let uncompressedLength = body.le32(28)
        let descriptorsEnd = 32 + 16 * Int(count)
        if descriptorsEnd > bodyLength {
            throw fail(offset + 4, .badRecordLength(type: RecordType.pageBatch.rawValue, length: UInt32(bodyLength)))
        }
        let actualPayload = bodyLength - descriptorsEnd
        if Int(payloadLength) != actualPayload {
            throw fail(at + 24, .payloadLengthMismatch(declared: payloadLength, actual: UInt32(actualPayload)))
        }
        if channel != header.channel { throw fail(at + 20, .wrongChannel(channel)) }
        guard let compression = BatchCompression(rawValue: compressionValue) else {
            throw fail(at + 22, .badBatchCompression(compressionValue))
        }
        if compression != .none, let agreed = rules {
            let needed: CodecSet = compression == .lz4 ? .lz4 : .zstd
            if !agreed.flags.contains(.wholeBatchCompression) || !agreed.codecs.contains(needed) {
                throw fail(at + 22, .codecNotAgreed(compressionValue))
            }
        }
        if sequence != nextSequence { throw fail(at + 8, .sequenceGap(expected: nextSequence, found: sequence)) }
        if let last = lastBoundaryPass, pass <= last { throw fail(at + 16, .passOutOfOrder(previous: last, found: pass)) }
        if let last = lastBatchPass, pass < last { throw fail(at + 16, .passOutOfOrder(previous: last, found: pass)) }

        let pageSize = Int(header.pageSize)
        var pages: [PageDescriptor] = []
        pages.reserveCapacity(Int(count))
        var payloadOffset = 0
        for i in 0..<Int(count) {
            let o = 32 + 16 * i
            let fieldAt = at + UInt64(o)
            let frame = body.le64(o)
            let length = body.le32(o + 8)
            let encodingValue = body[o + 12]
            if body[o + 13] != 0 || body[o + 14] != 0 || body[o + 15] != 0 { throw fail(fieldAt + 13, .reservedNotZero) }
            guard let encoding = PageEncoding(rawValue: encodingValue),
                  compression == .none || encoding.hasNoPayload || encoding == .raw else {
                throw fail(fieldAt + 12, .badPageEncoding(index: i, value: encodingValue))
            }
            if encoding == .unchanged {
                // Means "keep the version this stream sent before" (§6.4.1): only where both ends agreed to it (never
                // in a snapshot file, which carries no agreement), and never in pass 0, before which nothing was sent.
                if rules?.flags.contains(.unchangedPages) != true { throw fail(fieldAt + 12, .codecNotAgreed(encodingValue)) }
                if pass == 0 { throw fail(fieldAt + 12, .unchangedInPassZero(index: i)) }
            } else if let agreed = rules, !agreed.codecs.contains(encoding), encoding != .zero, encoding != .raw {
                throw fail(fieldAt + 12, .codecNotAgreed(encodingValue))
            }
            let lengthOK: Bool
            switch encoding {
            case .zero, .unchanged: lengthOK = length == 0
            case .raw: lengthOK = Int(length) == pageSize
            case .lz4, .zstd: lengthOK = length > 0 && Int(length) <= pageSize
            }
            if !lengthOK { throw fail(fieldAt + 8, .badPageLength(index: i, length: length)) }
            if !layout.contains(frame: frame, pageShift: pageShift) {
                throw fail(fieldAt, .pageOutsideLayout(index: i, frame: frame))
            }
            pages.append(PageDescriptor(frame: frame, encoding: encoding, offset: payloadOffset, length: Int(length)))
            payloadOffset += Int(length)
        }
        let expectedUncompressed = compression == .none ? Int(payloadLength) : Int(uncompressedLength)
        if payloadOffset != expectedUncompressed || Int(uncompressedLength) != payloadOffset {
            throw fail(at + 28, .payloadLengthMismatch(declared: uncompressedLength, actual: UInt32(payloadOffset)))
        }
        let descriptorsOnly = rules?.flags.contains(.descriptorChecksum) == true
        try verify(stored: body.le32(0), body, through: descriptorsOnly ? descriptorsEnd : nil, at: at)
        let buffered = body.count - descriptorsEnd // the payload, unless it is received in place

        nextSequence += 1
        lastBatchPass = pass
        return .pageBatch(PageBatch(pass: pass, channel: channel, sequence: sequence, compression: compression,
                                    pages: pages,
                                    payload: ByteSlice(storage: storage, start: bodyIndex + descriptorsEnd, count: buffered),
                                    uncompressedPayloadLength: Int(uncompressedLength), checksum: body.le32(0)))
    }
}
