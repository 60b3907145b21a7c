// Typed records of the native stream (stream.md §5-6): plain values, no behaviour beyond checks.

/// The 32-byte header that opens every stream (stream.md §3).
public struct StreamHeader: Hashable, Sendable {
    public var version: UInt16
    /// Guest page size in bytes: a power of two from 4096 to 65536.
    public var pageSize: UInt32
    public var features: StreamFeatures
    /// Index of this channel, 0 for the main channel.
    public var channel: UInt16
    /// Number of channels of this migration, at least 1.
    public var channelCount: UInt16
    /// The same on every channel of one migration and, picked at random, different from other migrations of the
    /// same sender: how a receiver tells apart the channels of concurrent migrations. 0 when not given.
    public var migrationID: UInt32

    public init(version: UInt16 = WireFormat.version, pageSize: UInt32 = 4096,
                features: StreamFeatures = [], channel: UInt16 = 0, channelCount: UInt16 = 1, migrationID: UInt32 = 0) {
        self.version = version
        self.pageSize = pageSize
        self.features = features
        self.channel = channel
        self.channelCount = channelCount
        self.migrationID = migrationID
    }
}

/// Set of page codecs, one bit per `PageEncoding` raw value. `unchanged` is not a codec and is never in such a set:
/// it is agreed by the flag `CapabilityFlags.unchangedPages` (stream.md §6.1).
public struct CodecSet: OptionSet, Hashable, Sendable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public init(_ encodings: [PageEncoding]) {
        self.rawValue = encodings.reduce(0) { $0 | (1 << UInt32($1.rawValue)) }
    }
    public static let zero = CodecSet(rawValue: 1 << 0)
    public static let raw = CodecSet(rawValue: 1 << 1)
    public static let lz4 = CodecSet(rawValue: 1 << 2)
    public static let zstd = CodecSet(rawValue: 1 << 3)
    public static let all: CodecSet = [.zero, .raw, .lz4, .zstd]

    public func contains(_ encoding: PageEncoding) -> Bool { rawValue & (1 << UInt32(encoding.rawValue)) != 0 }
}

/// Optional protocol abilities a side offers (stream.md §6.1).
public struct CapabilityFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// The side can resume an interrupted migration.
    public static let resume = CapabilityFlags(rawValue: 1 << 0)
    /// The side can finish a migration in post-copy mode.
    public static let postCopy = CapabilityFlags(rawValue: 1 << 1)
    /// Page batches may be compressed as a whole.
    public static let wholeBatchCompression = CapabilityFlags(rawValue: 1 << 2)
    /// The receiver says on its reply stream when each pre-copy pass is wholly in guest memory (PASS_APPLIED).
    public static let passAcknowledgement = CapabilityFlags(rawValue: 1 << 3)
    /// Page batch checksums cover the batch header and descriptors, not the payload, which the memory digest
    /// covers end to end; so a sender can send pages straight from the memory of a running guest.
    public static let descriptorChecksum = CapabilityFlags(rawValue: 1 << 4)
    /// In passes after the first, a page whose content the receiver already holds may go as an `unchanged`
    /// descriptor without payload (stream.md §6.4.1).
    public static let unchangedPages = CapabilityFlags(rawValue: 1 << 5)
    /// A pre-copy whose link broke may be resumed (stream.md §6.15): the receiver keeps the memory it received for a
    /// while, and a resumed migration sends only what it lacks.
    public static let preCopyResume = CapabilityFlags(rawValue: 1 << 6)
    /// A migration of several channels goes on without a secondary channel that fails during pre-copy: the others take
    /// over its pages (stream.md §6.16). In effect only with `passAcknowledgement`.
    public static let channelLoss = CapabilityFlags(rawValue: 1 << 7)
}

/// A side's offer, or the agreed set (stream.md §6.1).
public struct Capabilities: Hashable, Sendable {
    public var codecs: CodecSet
    public var maxChannels: UInt16
    public var flags: CapabilityFlags

    public init(codecs: CodecSet = .all, maxChannels: UInt16 = 1, flags: CapabilityFlags = []) {
        self.codecs = codecs
        self.maxChannels = maxChannels
        self.flags = flags
    }

    /// The agreed set of two offers: what both support.
    public func agreed(with other: Capabilities) -> Capabilities {
        Capabilities(codecs: codecs.intersection(other.codecs).union([.zero, .raw]),
                     maxChannels: max(1, min(maxChannels, other.maxChannels)),
                     flags: flags.intersection(other.flags))
    }
}

/// Flags of a memory region (stream.md §6.3).
public struct RegionFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// The guest cannot write the region (ROM, firmware).
    public static let readOnly = RegionFlags(rawValue: 1 << 0)
    /// The region is device memory rather than RAM; informational.
    public static let device = RegionFlags(rawValue: 1 << 1)
}

/// One region of guest-physical memory.
public struct MemoryRegion: Hashable, Sendable {
    public var guestPhysicalAddress: UInt64
    public var size: UInt64
    public var flags: RegionFlags

    public init(guestPhysicalAddress: UInt64, size: UInt64, flags: RegionFlags = []) {
        self.guestPhysicalAddress = guestPhysicalAddress
        self.size = size
        self.flags = flags
    }
}

/// The memory layout: sorted, non-overlapping, page-aligned regions (stream.md §6.3).
public struct GuestMemoryLayout: Hashable, Sendable {
    public var regions: [MemoryRegion]
    public init(regions: [MemoryRegion]) { self.regions = regions }

    /// Index of the first invalid region for the given page size, or nil when all are valid.
    public func firstInvalidRegion(pageSize: UInt32) -> Int? {
        let mask = UInt64(pageSize) - 1
        var previousEnd: UInt64 = 0
        for (i, r) in regions.enumerated() {
            if r.size == 0 || r.guestPhysicalAddress & mask != 0 || r.size & mask != 0 { return i }
            let (end, overflow) = r.guestPhysicalAddress.addingReportingOverflow(r.size)
            if overflow { return i }
            if i > 0 && r.guestPhysicalAddress < previousEnd { return i }
            previousEnd = end
        }
        return nil
    }

    /// Whether guest frame `gfn` (address / page size) lies inside a region.
    public func contains(frame gfn: UInt64, pageShift: Int) -> Bool {
        guard gfn <= (UInt64.max >> UInt64(pageShift)) else { return false }
        let address = gfn << UInt64(pageShift)
        var lo = 0, hi = regions.count
        while lo < hi {
            let mid = (lo + hi) / 2
            let r = regions[mid]
            if address < r.guestPhysicalAddress { hi = mid }
            else if address - r.guestPhysicalAddress >= r.size { lo = mid + 1 }
            else { return true }
        }
        return false
    }

    /// Whether the frames of `run` all lie inside one region.
    public func contains(_ run: FrameRun, pageShift: Int) -> Bool {
        guard run.count > 0, run.count <= (UInt64.max >> UInt64(pageShift)),
              run.first <= (UInt64.max >> UInt64(pageShift)) - run.count else { return false }
        let start = run.first << UInt64(pageShift), length = run.count << UInt64(pageShift)
        return regions.contains { start >= $0.guestPhysicalAddress && start - $0.guestPhysicalAddress <= $0.size &&
                                  length <= $0.size - (start - $0.guestPhysicalAddress) }
    }

    /// Total bytes of all regions.
    public var totalBytes: UInt64 { regions.reduce(0) { $0 &+ $1.size } }
}

/// One page inside a decoded batch: where it goes, how it is encoded, where its bytes are.
public struct PageDescriptor: Hashable, Sendable {
    /// Guest frame number: guest-physical address divided by the page size.
    public var frame: UInt64
    public var encoding: PageEncoding
    /// Offset of the page's bytes in the (uncompressed) payload area.
    public var offset: Int
    /// Number of payload bytes: 0 for zero and unchanged pages, the page size for raw pages.
    public var length: Int

    public init(frame: UInt64, encoding: PageEncoding, offset: Int, length: Int) {
        self.frame = frame
        self.encoding = encoding
        self.offset = offset
        self.length = length
    }
}

/// A decoded page batch. Its payload is a slice of the decoder's buffer, not a copy.
public struct PageBatch: Sendable {
    public var pass: UInt32
    public var channel: UInt16
    public var sequence: UInt64
    public var compression: BatchCompression
    /// Descriptors in stream order; offsets refer to the uncompressed payload area.
    public var pages: [PageDescriptor]
    /// The payload area as transmitted (compressed when `compression` is not `.none`).
    public var payload: ByteSlice
    /// Length of the payload area once decompressed (equal to `payload.count` when uncompressed).
    public var uncompressedPayloadLength: Int
    /// The CRC32C carried by the batch (already verified by the decoder).
    public var checksum: UInt32

    /// Calls `body` with the bytes of page `index`. Only for uncompressed batches; for a
    /// compressed batch, decompress `payload` first and slice it with the descriptors.
    public func withPageBytes<R>(_ index: Int, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        precondition(compression == .none, "decompress the batch payload first")
        let d = pages[index]
        return try payload.withUnsafeBytes { try body(UnsafeRawBufferPointer(rebasing: $0[d.offset ..< d.offset + d.length])) }
    }
}

/// Well-known device-state component ids (stream.md §6.5). The blob format of each belongs to
/// the component; the wire only carries it.
public enum DeviceComponent {
    public static let kvmVCPU: UInt32 = 0x0001
    public static let kvmVM: UInt32 = 0x0002
    public static let kvmClock: UInt32 = 0x0003
    public static let serial: UInt32 = 0x0100
    /// Ids from here up are free for a VMM's own devices.
    public static let vmmPrivateBase: UInt32 = 0x1000_0000
}

/// One device-state blob.
public struct DeviceState: Sendable {
    public var componentID: UInt32
    public var instance: UInt32
    public var componentVersion: UInt32
    public var blob: ByteSlice

    public init(componentID: UInt32, instance: UInt32, componentVersion: UInt32, blob: ByteSlice) {
        self.componentID = componentID
        self.instance = instance
        self.componentVersion = componentVersion
        self.blob = blob
    }
}

/// End of a pass, with what the sender saw and did during it (stream.md §6.6).
public struct PassBoundary: Hashable, Sendable {
    public var pass: UInt32
    /// Pages found dirty when the pass ended: what the next pass will send.
    public var dirtyPages: UInt64
    public var pagesSent: UInt64
    public var zeroPages: UInt64
    /// Bytes of records written during the pass.
    public var wireBytes: UInt64
    public var durationNanoseconds: UInt64

    public init(pass: UInt32, dirtyPages: UInt64, pagesSent: UInt64 = 0, zeroPages: UInt64 = 0,
                wireBytes: UInt64 = 0, durationNanoseconds: UInt64 = 0) {
        self.pass = pass
        self.dirtyPages = dirtyPages
        self.pagesSent = pagesSent
        self.zeroPages = zeroPages
        self.wireBytes = wireBytes
        self.durationNanoseconds = durationNanoseconds
    }
}

/// The source is paused; what follows is the final pass and the device state (stream.md §6.7).
public struct Switchover: Hashable, Sendable {
    public var finalPass: UInt32
    public init(finalPass: UInt32) { self.finalPass = finalPass }
}

/// Digest algorithms for the end record.
public enum DigestAlgorithm {
    /// No digest (secondary channels).
    public static let none: UInt32 = 0
    /// PageCodec's MemoryDigest, version 1: 128 bits, see stream.md §7.
    public static let pageSum128: UInt32 = 1
}

/// End of the stream, with the digest of all guest memory (stream.md §6.8).
public struct End: Hashable, Sendable {
    public var digestAlgorithm: UInt32
    public var digest: [UInt8]
    public init(digestAlgorithm: UInt32, digest: [UInt8]) {
        self.digestAlgorithm = digestAlgorithm
        self.digest = digest
    }
}

/// Why a peer stops (stream.md §6.9).
public struct AbortReason: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let unspecified = AbortReason(rawValue: 0)
    public static let cancelled = AbortReason(rawValue: 1)
    public static let sourceError = AbortReason(rawValue: 2)
    public static let destinationError = AbortReason(rawValue: 3)
    public static let protocolError = AbortReason(rawValue: 4)
    public static let digestMismatch = AbortReason(rawValue: 5)
    public static let noConvergence = AbortReason(rawValue: 6)
    public static let resourceExhausted = AbortReason(rawValue: 7)
}

public struct Abort: Hashable, Sendable {
    public var reason: AbortReason
    public var message: String
    public init(reason: AbortReason, message: String) {
        self.reason = reason
        self.message = message
    }
}

/// A digest of all guest memory, as the switchover handshake carries it.
public struct DigestRecord: Hashable, Sendable {
    public var algorithm: UInt32
    public var digest: [UInt8]
    public init(algorithm: UInt32, digest: [UInt8]) {
        self.algorithm = algorithm
        self.digest = digest
    }
}

/// Consecutive guest frames: `count` frames from `first`.
public struct FrameRun: Hashable, Sendable {
    public var first: UInt64
    public var count: UInt64
    public init(first: UInt64, count: UInt64) {
        self.first = first
        self.count = count
    }
}

/// The start of post-copy (stream.md §6.13): the pages still missing, listed before in MISSING_PAGES records, come in
/// pass `finalPass` while the destination runs.
public struct PostCopyStart: Hashable, Sendable {
    public var finalPass: UInt32
    public var missingPages: UInt64
    public init(finalPass: UInt32, missingPages: UInt64) {
        self.finalPass = finalPass
        self.missingPages = missingPages
    }
}

/// Names the memory a pre-copy leaves at its receiver when its link breaks, for a resumed migration to claim
/// (stream.md §6.15): 128 random bits the sender chose, which only the sender knows.
public struct ResumeTicket: Hashable, Sendable, Codable, CustomStringConvertible {
    public var low: UInt64
    public var high: UInt64
    public init(low: UInt64, high: UInt64) {
        self.low = low
        self.high = high
    }

    /// A fresh ticket, never zero.
    public static func random() -> ResumeTicket {
        var generator = SystemRandomNumberGenerator()
        return ResumeTicket(low: generator.next() | 1, high: generator.next())
    }

    /// As 32 hexadecimal digits, `high` first: how APIs and logs show it.
    public var description: String {
        String(high, radix: 16).leftPadded(to: 16) + String(low, radix: 16).leftPadded(to: 16)
    }

    /// The ticket `description` wrote, or nil.
    public init?(_ text: String) {
        guard text.count == 32, let high = UInt64(text.prefix(16), radix: 16), let low = UInt64(text.suffix(16), radix: 16) else { return nil }
        self.init(low: low, high: high)
    }

    /// In JSON, as its `description`.
    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let ticket = ResumeTicket(text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "not a resume ticket: \(text)"))
        }
        self = ticket
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

private extension String {
    func leftPadded(to width: Int) -> String { String(repeating: "0", count: max(0, width - count)) + self }
}

/// PRECOPY_TICKET (stream.md §6.15): the ticket of this migration's memory at the receiver, and whether the
/// migration resumes the memory an earlier one with the same ticket left there; or, with `discard`, that the sender
/// will not resume it, and the stream ends there.
public struct PreCopyTicket: Hashable, Sendable {
    public var ticket: ResumeTicket
    public var resume: Bool
    public var discard: Bool
    public init(ticket: ResumeTicket, resume: Bool, discard: Bool = false) {
        precondition(!(resume && discard), "a ticket either resumes or discards")
        self.ticket = ticket
        self.resume = resume
        self.discard = discard
    }
}

/// A page hash as the memory digest defines it (stream.md §7), carried by HELD_PAGES.
public struct HeldHash: Hashable, Sendable {
    public var low: UInt64
    public var high: UInt64
    public init(low: UInt64, high: UInt64) {
        self.low = low
        self.high = high
    }
}

/// Consecutive frames the receiver holds, from `first`, with the hash of each (stream.md §6.15).
public struct HeldPageRun: Hashable, Sendable {
    public var first: UInt64
    public var hashes: [HeldHash]
    public init(first: UInt64, hashes: [HeldHash]) {
        self.first = first
        self.hashes = hashes
    }
}

/// The receiver's answer to a resumed pre-copy (PRECOPY_RESUMED, stream.md §6.15).
public struct PreCopyResumed: Hashable, Sendable {
    /// Whether the receiver kept memory for the ticket, and if not, why the migration starts from nothing.
    public enum Outcome: UInt32, Sendable {
        /// The receiver holds the pages listed before, in the versions their hashes name.
        case resumed = 0
        /// The receiver holds nothing for this ticket: it never did, its grace period ran out, another migration
        /// started, the sender said so, or the receiver restarted.
        case nothingKept = 1
        /// The receiver kept memory of another layout under this ticket, and dropped it.
        case layoutDiffers = 2
        /// The receiver kept memory from another peer under this ticket, and dropped it.
        case peerDiffers = 3
    }
    public var outcome: Outcome
    public var heldPages: UInt64
    public init(outcome: Outcome, heldPages: UInt64) {
        self.outcome = outcome
        self.heldPages = heldPages
    }
}

/// What the decoder yields, in stream order: the events the engine speaks.
public enum StreamEvent: Sendable {
    case header(StreamHeader)
    case capabilitiesOffer(Capabilities)
    case capabilitiesAgreed(Capabilities)
    case layout(GuestMemoryLayout)
    case pageBatch(PageBatch)
    /// An uncompressed page batch, checked, whose payload is still to come: the caller receives it into place
    /// with `StreamDecoder.receivePayload` before anything else (`StreamDecoder.Options.payloadsInPlace`).
    /// Its `payload` is empty.
    case pageBatchAwaitingPayload(PageBatch)
    case deviceState(DeviceState)
    case passBoundary(PassBoundary)
    case switchover(Switchover)
    case end(End)
    case abort(Abort)
    /// Sender, main channel, after the switchover: everything is sent; compare memory with this digest.
    case verify(DigestRecord)
    /// Receiver, reply stream: memory matches with this digest, device state is restored, ready to start.
    case verified(DigestRecord)
    /// Sender, main channel, after `verified`: start the destination.
    case commit
    /// Receiver, reply stream: the destination runs.
    case started
    /// Sender, main channel, before `postCopy`: frames whose latest version the receiver does not hold.
    case missingPages([FrameRun])
    /// Sender, main channel: the source is paused; its device state and the missing frames are all sent.
    case postCopy(PostCopyStart)
    /// Receiver, reply stream: the guest is rebuilt with those frames missing and may start.
    case postCopyReady
    /// Receiver, reply stream, during post-copy: the guest waits for these frames.
    case pageRequest([UInt64])
    /// Sender, first record of a new main channel: carry on the post-copy of pass `finalPass` whose link broke.
    case postCopyResume(finalPass: UInt32)
    /// Sender, main channel, right after the layout (`preCopyResume` agreed): this migration's ticket, and whether it
    /// resumes the memory kept under it.
    case preCopyTicket(PreCopyTicket)
    /// Receiver, reply stream, answering a resume: pages it kept, with their hashes.
    case heldPages(HeldPageRun)
    /// Receiver, reply stream, after the held pages: whether it resumes, and how many pages it holds.
    case preCopyResumed(PreCopyResumed)
    /// Main channel or reply stream, during pre-copy: the writer dropped secondary channel `channel`, in pass `pass`
    /// (stream.md §6.16).
    case channelLost(channel: UInt16, pass: UInt32)
    case note(String)
    /// Reply stream: every page of this pre-copy pass, on every channel, is in guest memory.
    case passApplied(pass: UInt32)
    /// An optional record this reader does not know; its body was skipped.
    case skippedOptional(type: UInt32, length: Int)
}
