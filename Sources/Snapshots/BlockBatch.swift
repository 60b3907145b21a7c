import Dispatch
import PageCodec

/// Data pages on their way into a compressed snapshot: gathered into blocks of `SnapshotFormat.blockPages`
/// pages, and compressed a batch of blocks at a time on all cores. Each block has its own compressor and
/// output buffer, so the blocks of a batch share nothing while they are compressed.
///
/// Sendable only for `flush`'s parallel loop, whose iterations each use one block's compressor, output buffer
/// and result slot and only read `input`; everything else runs on the one thread that owns the batch.
final class BlockBatch: @unchecked Sendable {
    /// Blocks compressed together: enough for every core to have work, little enough memory (2 MiB of pages).
    static let blocks = 8
    static let blockBytes = SnapshotFormat.blockPages * SnapshotFormat.pageSize

    /// One compressed (or raw, when compression did not help) block, ready to be written.
    struct Output {
        var bytes: UnsafeRawBufferPointer
        var encoding: BlockEntry.Encoding
    }

    private let input = UnsafeMutableRawBufferPointer.allocate(byteCount: blocks * blockBytes, alignment: 4096)
    private let outputs: [UnsafeMutableRawBufferPointer]
    private let compressors: [BlockCompressor]
    private(set) var pages = 0
    /// Whether blocks are compressed against a dictionary (zstd only).
    let hasDictionary: Bool

    init(_ codec: CompressionCodec, dictionary: [UInt8]? = nil) throws {
        compressors = try (0 ..< Self.blocks).map { _ in
            let compressor = try BlockCompressor(codec)
            if let dictionary { try dictionary.withUnsafeBytes { try compressor.use(dictionary: $0) } }
            return compressor
        }
        outputs = compressors.map { .allocate(byteCount: $0.bound(Self.blockBytes), alignment: 64) }
        hasDictionary = dictionary != nil
    }

    deinit {
        input.deallocate()
        for output in outputs { output.deallocate() }
    }

    var isFull: Bool { pages == Self.blocks * SnapshotFormat.blockPages }

    func append(_ page: UnsafeRawBufferPointer) {
        precondition(!isFull)
        (input.baseAddress! + pages * SnapshotFormat.pageSize).copyMemory(from: page.baseAddress!, byteCount: SnapshotFormat.pageSize)
        pages += 1
    }

    /// Compresses the gathered pages, block by block in parallel, hands each block to `write` in order, and
    /// empties the batch.
    func flush(_ write: (Output) throws(SnapshotError) -> Void) throws(SnapshotError) {
        let count = (pages + SnapshotFormat.blockPages - 1) / SnapshotFormat.blockPages
        guard count > 0 else { return }
        // Each iteration writes only its own slot, and the loop returns after the last write.
        nonisolated(unsafe) let results = UnsafeMutableBufferPointer<Output>.allocate(capacity: count)
        defer { results.deallocate() }
        let pages = self.pages
        DispatchQueue.concurrentPerform(iterations: count) { block in
            let start = block * Self.blockBytes
            let length = min(Self.blockBytes, pages * SnapshotFormat.pageSize - start)
            let source = UnsafeRawBufferPointer(rebasing: input[start ..< start + length])
            let output = outputs[block]
            let compressor = compressors[block]
            // Capacity one byte short of the input: compression must win, else the block is stored raw.
            if let compressed = compressor.compress(source, into: UnsafeMutableRawBufferPointer(rebasing: output[0 ..< length - 1])) {
                results[block] = Output(bytes: UnsafeRawBufferPointer(rebasing: output[0 ..< compressed]),
                                        encoding: compressor.codec.kind == .lz4 ? .lz4 : hasDictionary ? .zstdDictionary : .zstd)
            } else {
                results[block] = Output(bytes: source, encoding: .raw)
            }
        }
        for block in 0 ..< count { try write(results[block]) }
        self.pages = 0
    }
}

extension BlockEntry {
    /// Checks the CRC32C of the block's stored bytes and decompresses them into `output`, which must be exactly
    /// as long as the block's pages; `decompressors` keeps one per encoding for the next block, and `dictionary`
    /// is the file's (for `zstdDictionary`). Used by readers, and by a writer reading back a block it rewrites.
    func decode(_ stored: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer,
                decompressors: inout [Encoding: BlockCompressor], dictionary: [UInt8]?, name: String) throws(SnapshotError) {
        guard FastCRC32C.update(0, stored) == checksum else {
            throw .checksumMismatch(part: name, detail: "CRC32C of \(length) bytes at memory offset \(offset)")
        }
        do {
            switch encoding {
            case .raw:
                guard stored.count == output.count else { throw CompressionError.corrupt(.none) }
                output.copyMemory(from: stored)
            case .lz4, .zstd, .zstdDictionary:
                let decompressor = try decompressors[encoding] ?? {
                    let made = try BlockCompressor(encoding == .lz4 ? .lz4(acceleration: 1) : .zstd(level: 1))
                    if encoding == .zstdDictionary {
                        guard let dictionary else { throw CompressionError.badParameter("no dictionary") }
                        try dictionary.withUnsafeBytes { try made.use(dictionary: $0) }
                    }
                    return made
                }()
                decompressors[encoding] = decompressor
                try decompressor.decompress(stored, into: output)
            }
        } catch {
            throw .corrupt(part: name, "does not decompress to \(output.count / SnapshotFormat.pageSize) pages: \(error)")
        }
    }
}

/// The zstd dictionary of a compressed snapshot: data pages spread evenly over those to be saved, as raw
/// content. Blocks refer back to it as to earlier data, so pages that repeat each other across blocks (code,
/// text, page tables) compress almost as well as in one stream, while each block still decompresses on its
/// own, as a lazy restore needs.
enum BlockDictionary {
    /// 256 KiB: as much as one block again to load per compressor and decompressor.
    static let pages = 64

    /// Samples up to `pages` of the `count` pages `page(0 ..< count)`, skipping zero pages; nil when all are zero.
    static func sample(count: Int, page: (Int) throws(SnapshotError) -> UnsafeRawBufferPointer) throws(SnapshotError) -> [UInt8]? {
        var bytes: [UInt8] = []
        for k in 0 ..< min(pages, count) {
            let content = try page(k * count / min(pages, count))
            // zstd would take content that starts with its dictionary magic for a dictionary of its own format.
            if ZeroPage.isZero(content) || (bytes.isEmpty && content.loadUnaligned(as: UInt32.self) == 0xEC30_A437) { continue }
            bytes.append(contentsOf: content)
        }
        return bytes.isEmpty ? nil : bytes
    }
}
