import CLZ4
import CZstd

/// A compression choice: which library, at which setting.
public enum CompressionCodec: Hashable, Sendable, CustomStringConvertible {
    case none
    /// LZ4 block format; acceleration 1 is the default, larger is faster and compresses less.
    case lz4(acceleration: Int32)
    /// Zstandard frame at `level`; negative levels are the fast ones (down to -131072).
    case zstd(level: Int32)

    public var description: String {
        switch self {
        case .none: return "none"
        case .lz4(let a): return "lz4-a\(a)"
        case .zstd(let l): return "zstd\(l)"
        }
    }

    /// The kind of codec, without its setting.
    public var kind: Kind {
        switch self { case .none: .none; case .lz4: .lz4; case .zstd: .zstd }
    }

    public enum Kind: Hashable, Sendable { case none, lz4, zstd }
}

public enum CompressionError: Error, Equatable, Sendable {
    /// The input is not valid compressed data, or does not decompress to the expected length.
    case corrupt(CompressionCodec.Kind)
    /// The library refused a parameter (level out of range).
    case badParameter(String)
}

/// One reusable compression context. Not thread-safe: give each compressing thread its own.
/// Contexts (and for LZ4 the hash table) are created once and reused for every block.
public final class BlockCompressor {
    public let codec: CompressionCodec
    private var lz4Stream: UnsafeMutablePointer<LZ4_stream_t>?
    private var zstdC: OpaquePointer?
    private var zstdD: OpaquePointer?

    public init(_ codec: CompressionCodec) throws {
        self.codec = codec
        switch codec {
        case .none: break
        case .lz4(let a):
            if a < 1 { throw CompressionError.badParameter("lz4 acceleration \(a) < 1") }
            lz4Stream = LZ4_createStream()
        case .zstd(let level):
            if level < ZSTD_minCLevel() || level > ZSTD_maxCLevel() {
                throw CompressionError.badParameter("zstd level \(level)")
            }
            zstdC = ZSTD_createCCtx()
            ZSTD_CCtx_setParameter(zstdC, ZSTD_c_compressionLevel, level)
            ZSTD_CCtx_setParameter(zstdC, ZSTD_c_checksumFlag, 0)   // the batch CRC covers it
            ZSTD_CCtx_setParameter(zstdC, ZSTD_c_contentSizeFlag, 1)
            ZSTD_CCtx_setParameter(zstdC, ZSTD_c_dictIDFlag, 0)
        }
    }

    /// Zstandard only: every later block is compressed and decompressed against `dictionary`, raw content that
    /// blocks may refer back to (sample pages of the same guest, say), and which both sides must load alike.
    /// Blocks stay independent of each other; they depend on the dictionary only.
    public func use(dictionary: UnsafeRawBufferPointer) throws {
        guard codec.kind == .zstd, dictionary.count > 0 else { throw CompressionError.badParameter("a dictionary for \(codec)") }
        // Loaded as raw content unless it starts with zstd's dictionary magic, which callers avoid.
        guard dictionary.count < 4 || dictionary.loadUnaligned(as: UInt32.self) != UInt32(ZSTD_MAGIC_DICTIONARY) else {
            throw CompressionError.badParameter("raw dictionary content that starts with zstd's dictionary magic")
        }
        if zstdD == nil { zstdD = ZSTD_createDCtx() }
        let c = ZSTD_CCtx_loadDictionary(zstdC, dictionary.baseAddress, dictionary.count)
        let d = ZSTD_DCtx_loadDictionary(zstdD, dictionary.baseAddress, dictionary.count)
        guard ZSTD_isError(c) == 0, ZSTD_isError(d) == 0 else { throw CompressionError.badParameter("zstd refused the dictionary") }
    }

    deinit {
        if let lz4Stream { LZ4_freeStream(lz4Stream) }
        if let zstdC { ZSTD_freeCCtx(zstdC) }
        if let zstdD { ZSTD_freeDCtx(zstdD) }
    }

    /// Largest output `compress` may need for `inputLength` bytes.
    public func bound(_ inputLength: Int) -> Int {
        switch codec {
        case .none: return inputLength
        case .lz4: return Int(LZ4_compressBound(Int32(inputLength)))
        case .zstd: return ZSTD_compressBound(inputLength)
        }
    }

    /// Compresses `source` into `destination`. Returns the compressed length, or nil when the
    /// result would not fit (callers pass `source.count - 1` capacity to get "only if smaller").
    public func compress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) -> Int? {
        guard source.count > 0 else { return 0 }
        switch codec {
        case .none:
            guard destination.count >= source.count else { return nil }
            destination.copyMemory(from: source)
            return source.count
        case .lz4(let acceleration):
            // Reset without clearing the table: blocks stay independent, and cheap to start.
            LZ4_resetStream_fast(lz4Stream)
            let n = LZ4_compress_fast_continue(lz4Stream, source.baseAddress!.assumingMemoryBound(to: CChar.self),
                                               destination.baseAddress!.assumingMemoryBound(to: CChar.self),
                                               Int32(source.count), Int32(destination.count), acceleration)
            return n > 0 ? Int(n) : nil
        case .zstd:
            let n = ZSTD_compress2(zstdC, destination.baseAddress, destination.count, source.baseAddress, source.count)
            return ZSTD_isError(n) != 0 ? nil : n
        }
    }

    /// Decompresses `source`, which must expand to exactly `destination.count` bytes.
    public func decompress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) throws {
        switch codec.kind {
        case .none:
            guard source.count == destination.count else { throw CompressionError.corrupt(.none) }
            if source.count > 0 { destination.copyMemory(from: source) }
        case .lz4:
            guard let src = source.baseAddress, let dst = destination.baseAddress else {
                if destination.count == 0 && source.count == 0 { return }
                throw CompressionError.corrupt(.lz4)
            }
            let n = LZ4_decompress_safe(src.assumingMemoryBound(to: CChar.self), dst.assumingMemoryBound(to: CChar.self),
                                        Int32(source.count), Int32(destination.count))
            guard n == destination.count else { throw CompressionError.corrupt(.lz4) }
        case .zstd:
            if zstdD == nil { zstdD = ZSTD_createDCtx() }
            guard let src = source.baseAddress, let dst = destination.baseAddress else { throw CompressionError.corrupt(.zstd) }
            let n = ZSTD_decompressDCtx(zstdD, dst, destination.count, src, source.count)
            guard ZSTD_isError(n) == 0, n == destination.count else { throw CompressionError.corrupt(.zstd) }
        }
    }
}

/// How a single page ended up encoded by `PageEncoder`.
public enum EncodedPageKind: Hashable, Sendable {
    case zero
    case raw
    case compressed(CompressionCodec.Kind)
}

/// Encodes pages one at a time: zero pages are detected first, then the page is compressed
/// with the current codec, and sent raw whenever compression does not make it smaller.
public final class PageEncoder {
    public private(set) var compressor: BlockCompressor
    public init(codec: CompressionCodec) throws { compressor = try BlockCompressor(codec) }

    /// Switches codec (contexts of the old one are freed).
    public func use(_ codec: CompressionCodec) throws {
        if codec != compressor.codec { compressor = try BlockCompressor(codec) }
    }

    /// Encodes `page`. For `.compressed`, the encoded bytes are `scratch[0..<length]`;
    /// `scratch` must hold at least `page.count` bytes. For `.raw`, send `page` itself.
    public func encode(_ page: UnsafeRawBufferPointer, scratch: UnsafeMutableRawBufferPointer) -> (kind: EncodedPageKind, length: Int) {
        if ZeroPage.isZero(page) { return (.zero, 0) }
        if compressor.codec.kind == .none { return (.raw, page.count) }
        let limit = UnsafeMutableRawBufferPointer(rebasing: scratch[0 ..< min(scratch.count, page.count - 1)])
        if let n = compressor.compress(page, into: limit), n > 0, n < page.count {
            return (.compressed(compressor.codec.kind), n)
        }
        return (.raw, page.count)
    }
}
