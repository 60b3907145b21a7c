import Foundation
import MigrationWire
import PageCodec
import Synchronization
import Threads

/// Sends guest pages on one channel, as a two-stage pipeline: an encoder thread copies pages out of guest
/// memory and encodes them in batches (zero, raw or compressed, page by page) while the channel's thread sends
/// the batches before them. Batches travel between the two in a small pool, so memory stays bounded and
/// neither stage waits for the other unless it is the slower one. The streamer keeps this channel's share of
/// the memory digest and honours a bandwidth cap.
///
/// Uncompressed pages go to the wire straight from guest memory when the batch checksum leaves the payload
/// out (`descriptorChecksum`, stream.md §6.4): a page the guest changes between its digest hash and its send
/// may arrive torn, but it is dirty again, and a later pass sends it whole. Otherwise, and whenever pages are
/// compressed, each page is first copied once out of guest memory, so that the batch checksum, the digest and
/// the bytes on the wire describe the same version of it (and the codec reads a page that stands still). The
/// batch then leaves in one vectored send, with no further copy.
///
/// With `unchangedPages` agreed (stream.md §6.4.1), a page of a later pass whose hash equals the one `digest` holds
/// for it, the hash of the version this channel sent last, goes as an `unchanged` descriptor: 16 bytes instead of
/// the page, no compression, and no change to either side's digest. That is sound only if the receiver holds
/// exactly the bytes that were hashed, which a page sent from guest memory does not promise (the guest may change
/// it between the hash and the send, and change it back later: a lock word, say). So with the option every page is
/// hashed and sent from the same copy, pass 0 included: the price is one copy per page sent.
///
/// With a receiver that agreed to it, a compressed batch is compressed as a whole (stream.md §6.4): the
/// non-zero pages lie back to back in the batch's copies and make one block, so the codec finds what pages
/// share (text, code, repeated structures), which a 4 KiB page alone cannot show it, and is called once per
/// batch rather than per page. Otherwise each page is compressed on its own.
///
/// Sendable by thread discipline, not by a lock: one pass at a time runs `send`, on its channel's thread, and that
/// thread and the encoder thread it starts split the state. The encoder alone uses `encoder`, `adaptive`, the
/// probes and `digest` (read by others only after the pass); the sending thread alone uses the channel through
/// `writer`, `padding`, `sentSince` and `recentSends`; `linkRate` is atomic; batches pass between the two through
/// `HandOff` queues, whose lock orders each batch's writes before the other thread's reads.
final class PageStreamer: @unchecked Sendable {
    struct Counts {
        var pages = 0, zero = 0, raw = 0, compressed = 0, unchanged = 0, payloadBytes = 0, wireBytes = 0

        mutating func add(_ other: Counts) {
            pages += other.pages; zero += other.zero; raw += other.raw; compressed += other.compressed
            unchanged += other.unchanged; payloadBytes += other.payloadBytes; wireBytes += other.wireBytes
        }
    }

    let writer: RecordWriter
    /// Updated by the encoder thread only; read once a pass has ended.
    let digest: DigestTracker
    private let source: GuestSource
    private let batchPages: Int
    private let compressWholeBatches: Bool
    /// Whether uncompressed pages may be sent from guest memory rather than from copies.
    private let sendsFromGuestMemory: Bool
    /// Whether pages of passes after the first may go as `unchanged` (agreed, and wanted by the options).
    private let sendsUnchanged: Bool
    /// For tests: in each pass after the first, the first page whose content did change is declared unchanged all
    /// the same (its hash is recorded as it is), so that the receiver keeps a stale page and the digests differ.
    private let claimsWrongUnchanged: Bool
    private let encoder: PageEncoder
    private let adaptive: AdaptiveSelector?
    private var probeCompressors: [CompressionCodec: BlockCompressor] = [:]
    /// Where probes put their output, which is thrown away; adaptive compression only.
    private let probeOutput: UnsafeMutableRawBufferPointer?
    private let bytesPerSecondLimit: Double?
    private let padding = UnsafeMutableRawBufferPointer.allocate(byteCount: WireFormat.alignment, alignment: 8)
    private var sentSince = (bytes: 0, start: monotonicSeconds())
    /// Bytes and seconds of recent sends, each decayed by 0.9 per send; the sending thread's only.
    private var recentSends = (bytes: 0.0, seconds: 0.0)
    /// The link's speed as the sending thread measures it (bit pattern of a Double), for the encoder's choice.
    private let linkRate = Atomic<UInt64>(0)
    /// Batches in flight: one being encoded, one being sent, one ready in between.
    private let pool: [Batch]

    /// One batch between the stages: its page copies (the non-zero pages, back to back), compressed bytes and
    /// record prefix.
    private final class Batch {
        let prefix: UnsafeMutableRawBufferPointer
        let copies: UnsafeMutableRawBufferPointer
        let scratch: UnsafeMutableRawBufferPointer
        var pages: [PageSource] = []
        var prefixLength = 0
        var frames = 0
        /// How the payload area is compressed as a whole, and its compressed bytes (in `scratch`).
        var compression = BatchCompression.none
        var compressedPayload = UnsafeRawBufferPointer(start: nil, count: 0)

        init(batchPages: Int) {
            prefix = .allocate(byteCount: StreamEncoder.batchPrefixLength(pageCount: batchPages), alignment: 64)
            copies = .allocate(byteCount: batchPages * 4096, alignment: 64)
            scratch = .allocate(byteCount: batchPages * 4096, alignment: 64)
            pages.reserveCapacity(batchPages)
        }

        deinit {
            prefix.deallocate()
            copies.deallocate()
            scratch.deallocate()
        }
    }

    init(writer: RecordWriter, source: GuestSource, layout: GuestMemoryLayout, options: MigrationOptions,
         compressWholeBatches: Bool, sendsUnchanged: Bool = false, claimsWrongUnchanged: Bool = false) throws {
        self.writer = writer
        self.source = source
        digest = DigestTracker(regions: layout.digestRegions)
        batchPages = options.batchPages
        self.compressWholeBatches = compressWholeBatches
        self.sendsUnchanged = sendsUnchanged
        self.claimsWrongUnchanged = claimsWrongUnchanged && sendsUnchanged
        // An unchanged page is sound only if the receiver holds the very bytes that were hashed: see above.
        sendsFromGuestMemory = !writer.encoder.checksumsPayload && !sendsUnchanged
        switch options.compression {
        case .none: encoder = try PageEncoder(codec: .none); adaptive = nil
        case .lz4: encoder = try PageEncoder(codec: .lz4(acceleration: 1)); adaptive = nil
        case .zstd: encoder = try PageEncoder(codec: .zstd(level: options.zstdLevel)); adaptive = nil
        case .adaptive:
            encoder = try PageEncoder(codec: .none)
            // Start by assuming the link is fast: compression has to prove itself before it is used. Probes of whole
            // batches are a quarter batch: zstd finds matches far apart (text: 26x on 1 MiB, 7x on 64 KiB), and a
            // small probe would rate it by what a page-sized window sees.
            adaptive = AdaptiveSelector(linkBytesPerSecond: 4e9, probeBytes: compressWholeBatches ? 256 << 10 : 64 << 10)
        }
        if let adaptive { linkRate.store(adaptive.linkBytesPerSecond.bitPattern, ordering: .relaxed) }
        // Room for any codec's worst case on the largest probe.
        probeOutput = adaptive.map { .allocate(byteCount: 2 * $0.probeBytes + 4096, alignment: 64) }
        bytesPerSecondLimit = options.bandwidthLimit.map { $0 / Double(options.channels) }
        pool = (0 ..< 3).map { _ in Batch(batchPages: options.batchPages) }
        padding.initializeMemory(as: UInt8.self, repeating: 0)
    }

    deinit {
        padding.deallocate()
        probeOutput?.deallocate()
    }

    /// Whether the receiver held pages before pass 0 (a resumed pre-copy, stream.md §6.15), whose hashes `seed` put in
    /// `digest`: pass 0 then hashes every page, and skips those whose hash is the one the receiver holds.
    private var comparesHeld = false

    /// Starts this channel's digest with the pages the receiver kept of the frames it carries, channel `index` of
    /// `count`, before pass 0.
    func seed(with held: DigestTracker, index: Int, of count: Int) {
        held.forEachHeldRun { first, hashes in
            // The run in pieces that do not cross a channel's run of frames, each recorded at once if it is this channel's.
            var offset = 0
            while offset < hashes.count {
                let frame = first + UInt64(offset)
                let piece = min(hashes.count - offset, Int(framesPerChannelRun - frame % framesPerChannelRun))
                if channelIndex(of: frame, channels: count) == index {
                    digest.update(first: frame, hashes: UnsafeBufferPointer(rebasing: hashes[offset ..< offset + piece]))
                }
                offset += piece
            }
        }
        comparesHeld = true
    }

    /// Sends `frames` as pages of pass `pass`, encoding on a thread of its own while this thread sends. In pass
    /// 0 (`skipHeld`) pages the receiver holds as they are are skipped: zero pages, where its memory starts zeroed,
    /// and after `seed`, pages whose hash it holds. Later passes send zero pages, because they held data before.
    func send(frames: [UInt64], pass: UInt32, skipHeld: Bool, progress: ProgressCounter, wireProgress: ProgressCounter,
              isCancelled: @escaping @Sendable () -> Bool) throws -> Counts {
        let free = HandOff<Batch>(pool), ready = HandOff<Batch>([])
        let encoded = EncoderResult()
        startThread(named: "migrate-encode") { [self] in
            defer { encoded.done.signal() }
            do {
                encoded.counts = try encode(frames, pass: pass, skipHeld: skipHeld, free: free, ready: ready, isCancelled: isCancelled)
            } catch {
                encoded.error = error
            }
            ready.close()
        }
        var wireBytes = 0
        var sendError: Error?
        while let batch = ready.take() {
            // Batches encoded before a cancel are not sent: the other channels stop too, and close theirs.
            if isCancelled() {
                sendError = MigrationError.cancelled
                free.close()
                break
            }
            do {
                if !batch.pages.isEmpty {
                    let sent = try sendBatch(batch)
                    wireBytes += sent
                    wireProgress.add(sent)
                }
            } catch {
                sendError = error
                free.close() // the encoder stops at its next batch
                break
            }
            progress.add(batch.frames)
            free.put(batch)
        }
        encoded.done.wait()
        if let sendError { throw sendError }
        if let error = encoded.error { throw error }
        var counts = encoded.counts
        counts.wireBytes = wireBytes
        return counts
    }

    /// The encoder stage: fills free batches with encoded pages and hands them on, in order.
    private func encode(_ frames: [UInt64], pass: UInt32, skipHeld: Bool, free: HandOff<Batch>, ready: HandOff<Batch>,
                        isCancelled: () -> Bool) throws -> Counts {
        var counts = Counts()
        var index = 0
        // Nothing was sent before pass 0, so nothing can be unchanged in it (the decoder refuses it there too).
        var unchanged = sendsUnchanged && pass > 0 ? UnchangedCheck(wrongClaims: claimsWrongUnchanged ? 1 : 0) : nil
        while index < frames.count {
            if isCancelled() { throw MigrationError.cancelled }
            guard let batch = free.take() else { break } // the sender failed; it reports why
            let slice = frames[index ..< min(index + batchPages, frames.count)]
            index += slice.count
            encode(slice, into: batch, skipHeld: skipHeld, unchanged: &unchanged, counts: &counts)
            if batch.compression != .none {
                batch.prefixLength = writer.encoder.encodeCompressedPageBatchPrefix(
                    pass: pass, pages: batch.pages.map { (frame: $0.frame, encoding: $0.encoding) }, pageSize: 4096,
                    compression: batch.compression, compressedPayload: batch.compressedPayload, into: batch.prefix)
            } else if !batch.pages.isEmpty {
                batch.prefixLength = writer.encoder.encodePageBatchPrefix(pass: pass, pages: batch.pages, into: batch.prefix)
            }
            ready.put(batch)
        }
        return counts
    }

    /// How a pass decides that pages are unchanged; nil in pass 0 and when the option is off.
    private struct UnchangedCheck {
        /// Wrong claims still to make (tests only).
        var wrongClaims: Int
    }

    private func encode(_ frames: ArraySlice<UInt64>, into batch: Batch, skipHeld: Bool, unchanged: inout UnchangedCheck?,
                        counts: inout Counts) {
        batch.pages.removeAll(keepingCapacity: true)
        batch.frames = frames.count
        batch.compression = .none
        let (codec, probe) = chooseCodec()
        let compressPages = codec != .none && !compressWholeBatches
        // A probe samples the batch's copies.
        let inPlace = sendsFromGuestMemory && codec == .none && probe == nil
        let compressStart = monotonicSeconds()
        var compressedInput = 0, compressedOutput = 0
        var copied = 0 // bytes of `copies` holding raw pages
        var scratchUsed = 0
        for frame in frames {
            let page: UnsafeRawBufferPointer
            if inPlace {
                page = UnsafeRawBufferPointer(start: source.page(frame: frame), count: 4096)
            } else {
                let copy = UnsafeMutableRawBufferPointer(rebasing: batch.copies[copied ..< copied + 4096])
                copy.copyMemory(from: UnsafeRawBufferPointer(start: source.page(frame: frame), count: 4096))
                page = UnsafeRawBufferPointer(copy)
            }
            // With `unchanged` on, pages are copies (`sendsFromGuestMemory` is off): the hash is of the bytes that go.
            var hash: PageHash?
            if skipHeld && comparesHeld {
                // A page the guest changes while it is hashed here hashes wrong and goes, and is dirty: a later pass sends it.
                let current = PageHash.of(frame: frame, page: page)
                if current == digest.hash(of: frame) {
                    if current == .zero { counts.zero += 1 } else { counts.unchanged += 1 }
                    continue
                }
                hash = current
            } else if unchanged != nil {
                let current = PageHash.of(frame: frame, page: page)
                // A zero page goes as such: it costs the same descriptor and needs no earlier version.
                if current != .zero {
                    let same = current == digest.hash(of: frame)
                    if same || unchanged!.wrongClaims > 0 {
                        if !same { // a test's false claim: the digest records the page as it is, the receiver keeps it stale
                            unchanged!.wrongClaims -= 1
                            digest.update(frame: frame, hash: current)
                        }
                        counts.unchanged += 1
                        batch.pages.append(.unchanged(frame: frame))
                        continue
                    }
                    hash = current
                }
            }
            let output = UnsafeMutableRawBufferPointer(rebasing: batch.scratch[scratchUsed ..< scratchUsed + 4096])
            let (kind, length) = compressPages ? encoder.encode(page, scratch: output)
                                               : (ZeroPage.isZero(page) ? .zero : .raw, 4096)
            if kind == .zero {
                counts.zero += 1
                // The receiver's memory starts zeroed, unless it held the page before pass 0.
                if !skipHeld || digest.hash(of: frame) != .zero { batch.pages.append(.zero(frame: frame)) }
                digest.updateZero(frame: frame)
                continue
            }
            if let hash { digest.update(frame: frame, hash: hash) } else { digest.update(frame: frame, page: page) }
            counts.payloadBytes += 4096
            if compressPages {
                compressedInput += 4096
                compressedOutput += length
            }
            if case .compressed(let compression) = kind {
                counts.compressed += 1
                scratchUsed += length
                batch.pages.append(PageSource(frame: frame, encoding: compression == .lz4 ? .lz4 : .zstd,
                                              bytes: UnsafeRawBufferPointer(rebasing: output[0 ..< length])))
                continue // its copy is not sent: the next page may take its place
            }
            counts.raw += 1
            batch.pages.append(PageSource(frame: frame, encoding: .raw, bytes: page))
            if !inPlace { copied += 4096 }
        }
        if let probe, let adaptive {
            measure(probe, sample: UnsafeRawBufferPointer(rebasing: batch.copies[0 ..< min(copied, adaptive.probeBytes)]))
        }
        if codec != .none && compressWholeBatches && copied > 0 {
            // Worth sending compressed only if it saves at least a page's worth of bytes per 64 pages.
            let limit = copied - copied / 64
            let output = UnsafeMutableRawBufferPointer(rebasing: batch.scratch[0 ..< limit])
            compressedInput = copied
            compressedOutput = copied
            if let length = encoder.compressor.compress(UnsafeRawBufferPointer(rebasing: batch.copies[0 ..< copied]), into: output) {
                compressedOutput = length
                batch.compression = codec.kind == .lz4 ? .lz4 : .zstd
                batch.compressedPayload = UnsafeRawBufferPointer(rebasing: output[0 ..< length])
                counts.compressed += copied / 4096
                counts.raw -= copied / 4096
            }
        }
        if let adaptive, codec != .none, compressedInput > 0 {
            adaptive.record(codec, input: compressedInput, output: compressedOutput, seconds: monotonicSeconds() - compressStart)
        }
        counts.pages += frames.count
    }

    /// The batch's record prefix, then each page's bytes, then padding, in one vectored send. Pages that lie
    /// back to back (in the copies, or in guest memory) go as one buffer: fewer pieces for the kernel, and TLS
    /// encrypts whole records from them rather than gathering pages into a staging buffer first.
    private func sendBatch(_ batch: Batch) throws -> Int {
        var buffers = [UnsafeRawBufferPointer(rebasing: batch.prefix[0 ..< batch.prefixLength])]
        if batch.compression != .none {
            buffers.append(batch.compressedPayload)
        } else {
            buffers.reserveCapacity(batch.pages.count + 2)
            for page in batch.pages where page.bytes.count > 0 {
                if buffers.count > 1, let last = buffers.last, last.baseAddress! + last.count == page.bytes.baseAddress {
                    buffers[buffers.count - 1] = UnsafeRawBufferPointer(start: last.baseAddress, count: last.count + page.bytes.count)
                } else {
                    buffers.append(page.bytes)
                }
            }
        }
        let payload = buffers.dropFirst().reduce(0) { $0 + $1.count }
        let paddingLength = WireFormat.padding(forBodyLength: batch.prefixLength - WireFormat.recordHeaderLength + payload)
        if paddingLength > 0 { buffers.append(UnsafeRawBufferPointer(rebasing: padding[0 ..< paddingLength])) }
        let start = monotonicSeconds()
        try writer.sendRaw(buffers)
        let total = batch.prefixLength + payload + paddingLength
        measureLink(bytes: total, seconds: monotonicSeconds() - start)
        return total
    }

    /// The codec for the next batch (adaptive: the selector's plan, which may also name a codec to probe).
    private func chooseCodec() -> (codec: CompressionCodec, probe: CompressionCodec?) {
        guard let adaptive else { return (encoder.compressor.codec, nil) }
        adaptive.linkBytesPerSecond = Double(bitPattern: linkRate.load(ordering: .relaxed))
        let plan = adaptive.plan()
        try? encoder.use(plan.codec)
        return (encoder.compressor.codec, plan.probe)
    }

    /// Compresses a sample of this batch's pages with a codec not in use, only to learn its speed and ratio on
    /// this guest's pages: as one block, or page by page, as the batch itself would be compressed.
    private func measure(_ codec: CompressionCodec, sample: UnsafeRawBufferPointer) {
        guard let adaptive, let output = probeOutput, !sample.isEmpty,
              let compressor = probeCompressors[codec] ?? (try? BlockCompressor(codec)) else { return }
        probeCompressors[codec] = compressor
        let blockSize = compressWholeBatches ? sample.count : 4096
        var compressed = 0
        let start = monotonicSeconds()
        for offset in stride(from: 0, to: sample.count, by: blockSize) {
            let block = UnsafeRawBufferPointer(rebasing: sample[offset ..< min(offset + blockSize, sample.count)])
            compressed += compressor.compress(block, into: output) ?? block.count
        }
        adaptive.record(codec, input: sample.count, output: compressed, seconds: monotonicSeconds() - start)
    }

    /// Tracks the link's speed for the adaptive choice, and sleeps when the bandwidth cap is exceeded.
    ///
    /// The speed is bytes over seconds of the last ten or so sends together, not an average of each send's
    /// rate: most sends return at once into the socket buffer and a few wait for the peer to drain it, and only
    /// the time-weighted figure shows what the peer takes (an average of rates reads GB/s where 0.3 get through).
    private func measureLink(bytes: Int, seconds: Double) {
        if adaptive != nil {
            recentSends = (bytes: 0.9 * recentSends.bytes + Double(bytes), seconds: 0.9 * recentSends.seconds + seconds)
            var rate = recentSends.bytes / max(recentSends.seconds, 1e-9)
            if let limit = bytesPerSecondLimit { rate = min(rate, limit) }
            linkRate.store(rate.bitPattern, ordering: .relaxed)
        }
        guard let limit = bytesPerSecondLimit else { return }
        sentSince.bytes += bytes
        let ahead = Double(sentSince.bytes) / limit - (monotonicSeconds() - sentSince.start)
        // At most a second at a time: the batch loop checks for cancellation between sleeps.
        if ahead > 0.001 { Thread.sleep(forTimeInterval: min(ahead, 1)) }
    }
}

/// What the encoder thread of a pass ended with. Sendable because the encoder thread writes it only before it
/// signals `done`, and the sending thread reads it only after waiting for `done`.
private final class EncoderResult: @unchecked Sendable {
    var counts = PageStreamer.Counts()
    var error: Error?
    let done = DispatchSemaphore(value: 0)
}

/// Pages (or wire bytes) done in the current pass, counted by the channel threads and read by progress reports.
final class ProgressCounter: Sendable {
    private let value = Atomic<Int>(0)
    func add(_ count: Int) { value.add(count, ordering: .relaxed) }
    func reset() { value.store(0, ordering: .relaxed) }
    var count: Int { value.load(ordering: .relaxed) }
}
