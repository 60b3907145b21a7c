import Foundation
import MigrationWire
import PageCodec
import Synchronization

/// Sends guest pages on one channel: encodes them in batches (zero, raw or compressed, page by page), keeps
/// this channel's share of the memory digest, and honours a bandwidth cap.
///
/// Each page is first copied once out of guest memory: the guest keeps running during pre-copy, and the
/// batch checksum, the digest and the bytes on the wire must all describe the same version of the page.
/// (A page that changes after its copy is dirty again, and the next pass sends it.) The batch then leaves in
/// one vectored send from these copies and the compressed blocks, with no further copy.
final class PageStreamer {
    struct Counts {
        var pages = 0, zero = 0, raw = 0, compressed = 0, payloadBytes = 0, wireBytes = 0

        mutating func add(_ other: Counts) {
            pages += other.pages; zero += other.zero; raw += other.raw
            compressed += other.compressed; payloadBytes += other.payloadBytes; wireBytes += other.wireBytes
        }
    }

    let writer: RecordWriter
    let digest: DigestTracker
    private let source: GuestSource
    private let batchPages: Int
    private let encoder: PageEncoder
    private let adaptive: AdaptiveSelector?
    private var probeCompressors: [CompressionCodec: BlockCompressor] = [:]
    private let bytesPerSecondLimit: Double?
    private let prefix: UnsafeMutableRawBufferPointer
    private let snapshot: UnsafeMutableRawBufferPointer
    private let scratch: UnsafeMutableRawBufferPointer
    private let padding = UnsafeMutableRawBufferPointer.allocate(byteCount: WireFormat.alignment, alignment: 8)
    private var sentSince = (bytes: 0, start: monotonicSeconds())

    init(writer: RecordWriter, source: GuestSource, layout: GuestMemoryLayout, options: MigrationOptions) throws {
        self.writer = writer
        self.source = source
        digest = DigestTracker(regions: layout.digestRegions)
        batchPages = options.batchPages
        switch options.compression {
        case .none: encoder = try PageEncoder(codec: .none); adaptive = nil
        case .lz4: encoder = try PageEncoder(codec: .lz4(acceleration: 1)); adaptive = nil
        case .zstd: encoder = try PageEncoder(codec: .zstd(level: options.zstdLevel)); adaptive = nil
        case .adaptive:
            encoder = try PageEncoder(codec: .none)
            // Start by assuming the link is fast: compression has to prove itself before it is used.
            adaptive = AdaptiveSelector(linkBytesPerSecond: 4e9)
        }
        bytesPerSecondLimit = options.bandwidthLimit.map { $0 / Double(options.channels) }
        prefix = .allocate(byteCount: StreamEncoder.batchPrefixLength(pageCount: options.batchPages), alignment: 64)
        snapshot = .allocate(byteCount: options.batchPages * 4096, alignment: 64)
        scratch = .allocate(byteCount: options.batchPages * 4096, alignment: 64)
        padding.initializeMemory(as: UInt8.self, repeating: 0)
    }

    deinit {
        prefix.deallocate()
        snapshot.deallocate()
        scratch.deallocate()
        padding.deallocate()
    }

    /// Sends `frames` as pages of pass `pass`. In pass 0 zero pages are skipped: the receiver's memory starts
    /// zeroed. Later passes send them (as zero pages), because they held data before.
    func send(frames: [UInt64], pass: UInt32, skipZero: Bool, progress: ProgressCounter, wireProgress: ProgressCounter,
              isCancelled: () -> Bool) throws -> Counts {
        var counts = Counts()
        var pages: [PageSource] = []
        pages.reserveCapacity(batchPages)
        var index = 0
        while index < frames.count {
            if isCancelled() { throw MigrationError.cancelled }
            let batch = frames[index ..< min(index + batchPages, frames.count)]
            index += batch.count
            pages.removeAll(keepingCapacity: true)
            let codec = chooseCodec()
            let compressStart = monotonicSeconds()
            var compressedInput = 0, compressedOutput = 0
            for (slot, frame) in batch.enumerated() {
                let copy = UnsafeMutableRawBufferPointer(rebasing: snapshot[slot * 4096 ..< (slot + 1) * 4096])
                copy.copyMemory(from: UnsafeRawBufferPointer(start: source.page(frame: frame), count: 4096))
                let page = UnsafeRawBufferPointer(copy)
                let scratchPage = UnsafeMutableRawBufferPointer(rebasing: scratch[slot * 4096 ..< (slot + 1) * 4096])
                let (kind, length) = encoder.encode(page, scratch: scratchPage)
                switch kind {
                case .zero:
                    counts.zero += 1
                    digest.updateZero(frame: frame)
                    if skipZero { continue }
                    pages.append(.zero(frame: frame))
                case .raw:
                    counts.raw += 1
                    digest.update(frame: frame, page: page)
                    pages.append(PageSource(frame: frame, encoding: .raw, bytes: page))
                case .compressed(let compression):
                    counts.compressed += 1
                    compressedInput += 4096
                    compressedOutput += length
                    digest.update(frame: frame, page: page)
                    pages.append(PageSource(frame: frame, encoding: compression == .lz4 ? .lz4 : .zstd,
                                            bytes: UnsafeRawBufferPointer(rebasing: scratchPage[0 ..< length])))
                }
                counts.payloadBytes += 4096
            }
            if let adaptive, codec != .none, compressedInput > 0 {
                adaptive.record(codec, input: compressedInput, output: compressedOutput, seconds: monotonicSeconds() - compressStart)
            }
            counts.pages += batch.count
            if !pages.isEmpty {
                let sent = try sendBatch(pages, pass: pass)
                counts.wireBytes += sent
                wireProgress.add(sent)
            }
            progress.add(batch.count)
        }
        return counts
    }

    /// The batch's record prefix, then each page's bytes, then padding, in one vectored send.
    private func sendBatch(_ pages: [PageSource], pass: UInt32) throws -> Int {
        let prefixLength = writer.encoder.encodePageBatchPrefix(pass: pass, pages: pages, into: prefix)
        let payload = pages.reduce(0) { $0 + $1.bytes.count }
        let paddingLength = WireFormat.padding(forBodyLength: prefixLength - WireFormat.recordHeaderLength + payload)
        var buffers = [UnsafeRawBufferPointer(rebasing: prefix[0 ..< prefixLength])]
        buffers.reserveCapacity(pages.count + 2)
        for page in pages where page.bytes.count > 0 { buffers.append(page.bytes) }
        if paddingLength > 0 { buffers.append(UnsafeRawBufferPointer(rebasing: padding[0 ..< paddingLength])) }
        let start = monotonicSeconds()
        try writer.sendRaw(buffers)
        let total = prefixLength + payload + paddingLength
        measureLink(bytes: total, seconds: monotonicSeconds() - start)
        return total
    }

    private func chooseCodec() -> CompressionCodec {
        guard let adaptive else { return encoder.compressor.codec }
        let plan = adaptive.plan()
        try? encoder.use(plan.codec)
        if let probe = plan.probe { measure(probe) }
        return encoder.compressor.codec
    }

    /// Compresses a sample with a codec not in use, only to learn its speed and ratio on this guest's pages.
    private func measure(_ codec: CompressionCodec) {
        guard let adaptive, let compressor = probeCompressors[codec] ?? (try? BlockCompressor(codec)) else { return }
        probeCompressors[codec] = compressor
        let sample = UnsafeRawBufferPointer(rebasing: scratch[0 ..< min(adaptive.probeBytes, scratch.count / 2)])
        let output = UnsafeMutableRawBufferPointer(rebasing: scratch[scratch.count / 2 ..< scratch.count])
        let start = monotonicSeconds()
        if let length = compressor.compress(sample, into: output) {
            adaptive.record(codec, input: sample.count, output: length, seconds: monotonicSeconds() - start)
        }
    }

    /// Tracks the link's speed for the adaptive choice, and sleeps when the bandwidth cap is exceeded.
    private func measureLink(bytes: Int, seconds: Double) {
        if let adaptive, seconds > 0 {
            let rate = Double(bytes) / seconds
            adaptive.linkBytesPerSecond = 0.9 * adaptive.linkBytesPerSecond + 0.1 * rate
        }
        guard let limit = bytesPerSecondLimit else { return }
        sentSince.bytes += bytes
        let ahead = Double(sentSince.bytes) / limit - (monotonicSeconds() - sentSince.start)
        // At most a second at a time: the batch loop checks for cancellation between sleeps.
        if ahead > 0.001 { Thread.sleep(forTimeInterval: min(ahead, 1)) }
    }
}

/// Pages (or wire bytes) done in the current pass, counted by the channel threads and read by progress reports.
final class ProgressCounter: Sendable {
    private let value = Atomic<Int>(0)
    func add(_ count: Int) { value.add(count, ordering: .relaxed) }
    func reset() { value.store(0, ordering: .relaxed) }
    var count: Int { value.load(ordering: .relaxed) }
}
