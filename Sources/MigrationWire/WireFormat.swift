// The native stream format, version 1. The byte-level specification is protocol/stream.md;
// this file holds its constants, and the comments name the section that defines each one.
//
//   stream  := header record*            (one stream per channel, or one snapshot file)
//   header  := 32 bytes                  (stream.md §3)
//   record  := type:u32 length:u32 body[length] pad[0..7]   (stream.md §4)
//
// Everything is little-endian. Every record starts on an 8-byte boundary of the stream.

/// Constants of the native stream format.
public enum WireFormat {
    /// First 8 bytes of every stream: 0x89 "MIGR" CR LF 0x1A.
    public static let magic: [UInt8] = [0x89, 0x4D, 0x49, 0x47, 0x52, 0x0D, 0x0A, 0x1A]
    /// The format version this implementation writes, and the newest it reads.
    public static let version: UInt16 = 1
    /// Size of the stream header in version 1.
    public static let headerLength = 32
    /// Size of a record header (type, body length).
    public static let recordHeaderLength = 8
    /// Records start on multiples of this many bytes; padding bytes are zero.
    public static let alignment = 8
    /// Bit 31 of a record type marks a record a reader may skip when it does not know it.
    public static let optionalRecordBit: UInt32 = 0x8000_0000

    /// Bytes of padding after a body of `length` bytes.
    @inlinable public static func padding(forBodyLength length: Int) -> Int {
        (alignment - (length & (alignment - 1))) & (alignment - 1)
    }
}

/// Hard limits of format version 1 (stream.md §8). A writer never exceeds them; a reader
/// refuses anything larger before it allocates. A reader may configure smaller ones.
public struct WireLimits: Sendable, Equatable {
    /// Largest record body, in bytes.
    public var maxRecordBody: Int
    /// Most pages in one page batch.
    public var maxPagesPerBatch: Int
    /// Most regions in a memory layout.
    public var maxRegions: Int
    /// Largest device-state blob, in bytes.
    public var maxDeviceStateBlob: Int
    /// Largest text of an abort or note record, in bytes.
    public var maxText: Int
    /// Largest memory digest, in bytes.
    public var maxDigest: Int
    /// Most frames in one PAGE_REQUEST.
    public static let maxRequestedPages = 512
    /// Most page hashes in one HELD_PAGES record (1 MiB of hashes).
    public static let maxHeldPagesPerRecord = 65536
    /// Most guest memory (sum of region sizes) a reader accepts in a layout. Not a format limit
    /// but a reader's budget: a receiver allocates memory (and digest state) for the layout, so
    /// it sets this to what it is prepared to allocate.
    public var maxGuestMemory: UInt64

    public init(maxRecordBody: Int = 16 << 20, maxPagesPerBatch: Int = 1024, maxRegions: Int = 1024,
                maxDeviceStateBlob: Int = (16 << 20) - 64, maxText: Int = 4096, maxDigest: Int = 64,
                maxGuestMemory: UInt64 = 1 << 40) {
        self.maxRecordBody = maxRecordBody
        self.maxPagesPerBatch = maxPagesPerBatch
        self.maxRegions = maxRegions
        self.maxDeviceStateBlob = maxDeviceStateBlob
        self.maxText = maxText
        self.maxDigest = maxDigest
        self.maxGuestMemory = maxGuestMemory
    }

    /// The limits of format version 1.
    public static let v1 = WireLimits()
}

/// A record type (stream.md §5). Bit 31 set: optional.
public struct RecordType: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public var isOptional: Bool { rawValue & WireFormat.optionalRecordBit != 0 }

    public static let capabilitiesOffer = RecordType(rawValue: 0x01)
    public static let capabilitiesAgreed = RecordType(rawValue: 0x02)
    public static let memoryLayout = RecordType(rawValue: 0x03)
    public static let pageBatch = RecordType(rawValue: 0x04)
    public static let deviceState = RecordType(rawValue: 0x05)
    public static let passBoundary = RecordType(rawValue: 0x06)
    public static let switchover = RecordType(rawValue: 0x07)
    public static let end = RecordType(rawValue: 0x08)
    public static let abort = RecordType(rawValue: 0x09)
    /// Switchover handshake (stream.md, "Switchover handshake"): the sender's digest of all guest memory,
    /// sent once everything else is; the receiver's answer once its memory matches and its state is restored;
    /// the sender's go-ahead to start the destination; the receiver's word that it runs.
    public static let verify = RecordType(rawValue: 0x0A)
    public static let verified = RecordType(rawValue: 0x0B)
    public static let commit = RecordType(rawValue: 0x0C)
    public static let started = RecordType(rawValue: 0x0D)
    /// Post-copy (stream.md §6.13): the frames whose latest version the receiver lacks, as runs; the start of
    /// post-copy once they are all listed; the receiver's word that it can start the guest with them missing; and
    /// its requests for pages the guest touched before they came.
    public static let missingPages = RecordType(rawValue: 0x0E)
    public static let postCopy = RecordType(rawValue: 0x0F)
    public static let postCopyReady = RecordType(rawValue: 0x10)
    public static let pageRequest = RecordType(rawValue: 0x11)
    /// Post-copy recovery (stream.md §6.14): the first record of a new main channel that carries on a post-copy
    /// whose link broke.
    public static let postCopyResume = RecordType(rawValue: 0x12)
    public static let preCopyTicket = RecordType(rawValue: 0x13)
    public static let heldPages = RecordType(rawValue: 0x14)
    public static let preCopyResumed = RecordType(rawValue: 0x15)
    /// Losing a secondary channel (stream.md §6.16): the sender stopped writing on it, or the receiver stopped reading
    /// it and has applied what it read.
    public static let channelLost = RecordType(rawValue: 0x16)
    /// Optional: human-readable text (progress, provenance). Readers may ignore it.
    public static let note = RecordType(rawValue: 0x8000_0001)
    /// Optional, reply stream: every page of a pre-copy pass is in guest memory (capability `passAcknowledgement`).
    public static let passApplied = RecordType(rawValue: 0x8000_0002)

    public var description: String {
        switch self {
        case .capabilitiesOffer: return "capabilitiesOffer"
        case .capabilitiesAgreed: return "capabilitiesAgreed"
        case .memoryLayout: return "memoryLayout"
        case .pageBatch: return "pageBatch"
        case .deviceState: return "deviceState"
        case .passBoundary: return "passBoundary"
        case .switchover: return "switchover"
        case .end: return "end"
        case .abort: return "abort"
        case .verify: return "verify"
        case .verified: return "verified"
        case .commit: return "commit"
        case .started: return "started"
        case .missingPages: return "missingPages"
        case .postCopy: return "postCopy"
        case .postCopyReady: return "postCopyReady"
        case .pageRequest: return "pageRequest"
        case .postCopyResume: return "postCopyResume"
        case .preCopyTicket: return "preCopyTicket"
        case .heldPages: return "heldPages"
        case .preCopyResumed: return "preCopyResumed"
        case .channelLost: return "channelLost"
        case .note: return "note"
        case .passApplied: return "passApplied"
        default: return "0x" + String(rawValue, radix: 16)
        }
    }
}

/// How one page is encoded inside a page batch (stream.md §6.4).
public enum PageEncoding: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    /// All bytes zero; no payload.
    case zero = 0
    /// The page as is; payload is exactly one page.
    case raw = 1
    /// One LZ4 block (raw block format, no frame); decompresses to exactly one page.
    case lz4 = 2
    /// One Zstandard frame; decompresses to exactly one page.
    case zstd = 3
    /// No payload: the page holds what the receiver already has, the version of it sent last on this stream
    /// (stream.md §6.4.1). Only with `unchangedPages` agreed, and never in pass 0.
    case unchanged = 4

    public var description: String {
        switch self { case .zero: "zero"; case .raw: "raw"; case .lz4: "lz4"; case .zstd: "zstd"; case .unchanged: "unchanged" }
    }

    /// Whether the page's descriptor carries no payload bytes (zero and unchanged pages).
    public var hasNoPayload: Bool { self == .zero || self == .unchanged }
}

/// Compression of a batch's whole payload area (stream.md §6.4).
public enum BatchCompression: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    case none = 0
    case lz4 = 1
    case zstd = 2

    public var description: String {
        switch self { case .none: "none"; case .lz4: "lz4"; case .zstd: "zstd" }
    }
}

/// Stream feature flags (stream.md §3). Bits 0-31 are mandatory: a reader that does not know a
/// set bit refuses the stream. Bits 32-63 are informational: a reader ignores unknown ones.
public struct StreamFeatures: OptionSet, Hashable, Sendable {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// The stream is a snapshot file: no peer, no negotiation records.
    public static let snapshotFile = StreamFeatures(rawValue: 1 << 32)
    /// The stream is one channel of a live migration.
    public static let liveMigration = StreamFeatures(rawValue: 1 << 33)

    /// Mandatory bits this implementation understands (none in version 1).
    public static let knownMandatory: UInt64 = 0
    public static let mandatoryMask: UInt64 = 0xFFFF_FFFF
}
