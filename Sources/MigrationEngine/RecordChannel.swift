import Foundation
import MigrationWire
import PageCodec

/// Why a migration stopped; every failure names its cause and where it happened.
public enum MigrationError: Error, CustomStringConvertible, Equatable {
    /// The channel failed or the peer closed it (network, peer crash).
    case channel(String)
    /// The peer's bytes broke the stream format.
    case malformedStream(String)
    /// The peer stopped the migration and said why.
    case peerAborted(reason: UInt32, message: String)
    case cancelled
    case didNotConverge(String)
    case digestMismatch(sender: String, receiver: String)
    case guestFailed(String)
    /// The peer's stream is valid but not what this side expects here.
    case protocolViolation(String)

    public var description: String {
        switch self {
        case .channel(let what): "channel failed: \(what)"
        case .malformedStream(let what): "peer sent a malformed stream: \(what)"
        case .peerAborted(let reason, let message): "peer aborted (reason \(reason)): \(message)"
        case .cancelled: "migration cancelled"
        case .didNotConverge(let why): "did not converge: \(why)"
        case .digestMismatch(let sender, let receiver): "memory digest mismatch: sender \(sender), receiver \(receiver)"
        case .guestFailed(let why): "guest operation failed: \(why)"
        case .protocolViolation(let what): "protocol violation: \(what)"
        }
    }

    /// The abort reason to tell the peer.
    var abortReason: AbortReason {
        switch self {
        case .cancelled: .cancelled
        case .didNotConverge: .noConvergence
        case .digestMismatch: .digestMismatch
        case .malformedStream, .protocolViolation: .protocolError
        case .channel, .peerAborted, .guestFailed: .sourceError
        }
    }
}

/// Reads the records of one stream from a channel: bytes in bounded chunks straight into the streaming
/// decoder's buffer (no copy in between), which checks every length and index before anything is allocated
/// or written.
///
/// Sendable by thread discipline: one thread reads at a time. The sender reads its reply stream on its own thread
/// and, once it has failed, hands the reader to a thread that looks for the peer's reason and never reads it again.
final class RecordReader: @unchecked Sendable {
    let channel: MigrationChannel
    let decoder: StreamDecoder
    /// Bytes asked of the channel per receive.
    private static let chunk = 1 << 20

    init(channel: MigrationChannel, payloadsInPlace: Bool = false, checksum: @escaping ChecksumFunction = FastCRC32C.function) {
        self.channel = channel
        decoder = StreamDecoder(options: StreamDecoder.Options(payloadsInPlace: payloadsInPlace), checksum: checksum)
    }

    /// The next event; throws when the channel closes or fails first, or the bytes are malformed.
    func next() throws -> StreamEvent {
        while true {
            do {
                if let event = try decoder.next() { return event }
            } catch let error as WireError {
                throw MigrationError.malformedStream("\(error)")
            }
            if decoder.isComplete { throw MigrationError.protocolViolation("read past the end of the stream") }
            let count = try decoder.receive(maximum: Self.chunk) { try receive(into: $0) }
            guard count > 0 else {
                throw MigrationError.channel("peer closed the connection at stream offset \(decoder.offset + UInt64(decoder.bufferedByteCount))")
            }
        }
    }

    /// Receives the payload of the batch `next()` returned as `.pageBatchAwaitingPayload`, each page's bytes to
    /// `destination(page)`.
    func receivePayload(into destination: (PageDescriptor) -> UnsafeMutableRawPointer) throws {
        do {
            try decoder.receivePayload(into: destination) { buffer in
                let count = try receive(into: buffer)
                guard count > 0 else { throw MigrationError.channel("peer closed the connection at stream offset \(decoder.offset) inside a page batch") }
                return count
            }
        } catch let error as WireError {
            throw MigrationError.malformedStream("\(error)")
        }
    }

    private func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        do {
            return try channel.receive(into: buffer)
        } catch {
            throw MigrationError.channel("\(error)")
        }
    }
}

extension RecordReader {
    /// The next event that is not a pass acknowledgement (those of the final pass arrive during the switchover). A
    /// channel the receiver lost (stream.md §6.16) fails the migration here: the final pass and post-copy need them all.
    func nextSkippingAcknowledgements() throws -> StreamEvent {
        while true {
            let event = try next()
            if case .passApplied = event { continue }
            if case .channelLost(let channel, let pass) = event {
                throw MigrationError.channel("the destination lost channel \(channel) in pass \(pass), after pre-copy")
            }
            return event
        }
    }
}

/// Writes the records of one stream to a channel. Sends from several threads are serialized (the receiver's
/// reply stream carries acknowledgements from the channels' writer threads and the handshake from the main one).
///
/// Sendable because sends hold `lock`; `encoder` is adjusted to the agreed capabilities before the writer is
/// shared with other threads, and only read after; `redirect` replaces both under `lock`.
final class RecordWriter: @unchecked Sendable {
    private(set) var channel: MigrationChannel
    var encoder: StreamEncoder
    private let lock = NSLock()

    init(channel: MigrationChannel, header: StreamHeader) {
        self.channel = channel
        encoder = StreamEncoder(header: header, checksum: FastCRC32C.function)
    }

    /// Encodes records with `body` and sends them at once.
    func send(_ body: (StreamEncoder, inout [UInt8]) -> Void) throws {
        try lock.withLock {
            var out: [UInt8] = []
            body(encoder, &out)
            try out.withUnsafeBytes { try sendUnlocked([$0]) }
        }
    }

    /// Goes on as a new stream with `header` on `channel`: a reply stream whose link broke and was replaced, so that
    /// every thread holding this writer sends on the new link (post-copy recovery, stream.md §6.14).
    func redirect(to channel: MigrationChannel, header: StreamHeader) {
        lock.withLock {
            self.channel = channel
            encoder = StreamEncoder(header: header, checksum: FastCRC32C.function)
        }
    }

    func sendRaw(_ buffers: [UnsafeRawBufferPointer]) throws {
        try lock.withLock { try sendUnlocked(buffers) }
    }

    private func sendUnlocked(_ buffers: [UnsafeRawBufferPointer]) throws {
        do {
            try channel.send(buffers)
        } catch {
            throw MigrationError.channel("\(error)")
        }
    }
}

/// Which channel carries a frame: frames go in 2 MiB runs, round robin, so that every version of a page takes
/// the same channel (a later copy can never overtake an earlier one) and runs stay sequential in memory.
func channelIndex(of frame: UInt64, channels: Int) -> Int {
    Int((frame / framesPerChannelRun) % UInt64(channels))
}

/// Frames in each run that `channelIndex` assigns to one channel: 2 MiB of 4 KiB pages.
let framesPerChannelRun: UInt64 = 512

extension GuestMemoryLayout {
    /// The layout's regions in frames, as the memory digest tracks them.
    public var digestRegions: [DigestTracker.Region] {
        regions.map { DigestTracker.Region(firstFrame: $0.guestPhysicalAddress >> 12, frameCount: Int($0.size >> 12)) }
    }

    var pageCount: Int { Int(totalBytes >> 12) }
}

/// Seconds on a clock that only goes forward, for measuring durations.
public func monotonicSeconds() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }
