import Foundation
import MigrationWire
import Threads

/// Gathers the channels of one incoming migration from a listener. Connections may arrive in any order:
/// each opens with its stream header, which names its channel index and the channel count, so the first
/// header read says how many more to accept, and every channel is put in its place.
public enum IncomingChannels {
    /// Accepts connections with `accept` until all channels of one migration are in, and returns them in
    /// channel order, each still positioned at the start of its stream. For a listener that serves one
    /// migration at a time; `ChannelGatherer` serves concurrent ones.
    public static func collect(accept: () throws -> MigrationChannel, maximumChannels: Int = 64) throws -> [MigrationChannel] {
        var migration: PartialMigration?
        while true {
            let channel = try accept()
            let header = try readHeader(channel)
            if migration == nil { migration = try PartialMigration(header.header, maximumChannels: maximumChannels, closing: channel) }
            do {
                if let complete = try migration!.place(channel, header: header) { return complete }
            } catch {
                migration!.close()
                throw error
            }
        }
    }

    /// Reads exactly one stream header, checked by the wire decoder; on any failure the channel is closed.
    static func readHeader(_ channel: MigrationChannel) throws -> (header: StreamHeader, bytes: [UInt8]) {
        var bytes = [UInt8](repeating: 0, count: WireFormat.headerLength)
        var filled = 0
        do {
            while filled < bytes.count {
                let count = try bytes.withUnsafeMutableBytes { buffer in
                    try channel.receive(into: UnsafeMutableRawBufferPointer(rebasing: buffer[filled...]))
                }
                guard count > 0 else { throw MigrationError.channel("peer closed the connection inside the stream header") }
                filled += count
            }
            let decoder = StreamDecoder()
            decoder.feed(bytes)
            do {
                guard case .header(let header)? = try decoder.next() else { throw MigrationError.protocolViolation("no stream header") }
                return (header, bytes)
            } catch let error as WireError {
                throw MigrationError.malformedStream("\(error)")
            }
        } catch {
            channel.close()
            throw error as? MigrationError ?? .channel("\(error)")
        }
    }
}

/// The channels of one migration gathered so far, in their places.
struct PartialMigration {
    private var slots: [MigrationChannel?]
    private var placed = 0

    /// Sized by the first header seen; refuses (and closes `channel`) a count above `maximumChannels`.
    init(_ first: StreamHeader, maximumChannels: Int, closing channel: MigrationChannel) throws {
        guard Int(first.channelCount) <= maximumChannels else {
            channel.close()
            throw MigrationError.protocolViolation("sender asks for \(first.channelCount) channels, at most \(maximumChannels) are accepted")
        }
        slots = Array(repeating: nil, count: Int(first.channelCount))
    }

    /// Puts `channel` in its place; returns all channels in order once the last one is in. A channel that
    /// disagrees on the count or repeats an index is closed and refused; the others stay.
    mutating func place(_ channel: MigrationChannel, header: (header: StreamHeader, bytes: [UInt8])) throws -> [MigrationChannel]? {
        let (index, count) = (Int(header.header.channel), Int(header.header.channelCount))
        guard count == slots.count else {
            channel.close()
            throw MigrationError.protocolViolation("connection claims channel \(index) of \(count), this migration has \(slots.count) channels")
        }
        guard slots[index] == nil else {
            channel.close()
            throw MigrationError.protocolViolation("connection claims channel \(index) of \(count), which this migration already has")
        }
        slots[index] = ReplayingChannel(channel, replay: header.bytes, migrationID: header.header.migrationID)
        placed += 1
        return placed == slots.count ? slots.map { $0! } : nil
    }

    func close() { for channel in slots { channel?.close() } }
}

extension IncomingChannels {
    /// The migration ID in the stream headers of channels gathered by `collect` or a `ChannelGatherer`, nil for other
    /// channels: a listener hands the channels of a resumed post-copy to the receiver of that migration.
    public static func migrationID(of channels: [MigrationChannel]) -> UInt32? {
        (channels.first as? ReplayingChannel)?.migrationID
    }
}

/// Gathers the channels of concurrent incoming migrations: each connection is opened (its handshake) and its
/// header read on a thread of its own, and connections are grouped by peer and migration ID (stream.md §10.5),
/// so that neither another migration's connections nor a connection that never speaks hold anyone up. A
/// complete migration is handed to `ready`; a connection whose header does not come within `headerTimeout`, or
/// a migration not complete within `gatherTimeout` of its first channel, is closed and reported to `refused`,
/// as is a connection that fails to open.
///
/// Sendable: `pending`, `serials`, `opening` and `openingBySource` are guarded by `lock`; `ready` and `refused` are
/// @Sendable.
public final class ChannelGatherer: @unchecked Sendable {
    public typealias Ready = @Sendable (_ channels: [MigrationChannel], _ peer: String) -> Void
    public typealias Refused = @Sendable (_ peer: String, _ reason: MigrationError) -> Void

    private struct Key: Hashable { var peer: String, migrationID: UInt32 }

    private let maximumChannels: Int
    private let maximumOpening: Int
    private let maximumOpeningPerSource: Int
    private let headerTimeout: Double
    private let gatherTimeout: Double
    private let ready: Ready
    private let refused: Refused
    private let lock = NSLock()
    /// Incomplete migrations; the serial tells a migration from a later one that happens to reuse its key.
    private var pending: [Key: (serial: Int, migration: PartialMigration)] = [:]
    private var serials = 0
    /// Connections not yet past their header: each holds a thread until it is, or until it times out; in all,
    /// and per source address.
    private var opening = 0
    private var openingBySource: [String: Int] = [:]

    /// At most `maximumOpening` connections may be in their handshake or header at once, and at most
    /// `maximumOpeningPerSource` from one source address; more are closed at once, so that a flood of connections
    /// costs a bounded number of threads, and one flooding host cannot take the slots of the peers that migrate.
    public init(maximumChannels: Int = 64, maximumOpening: Int = 256, maximumOpeningPerSource: Int = 32, headerTimeout: Double = 10,
                gatherTimeout: Double = 30, ready: @escaping Ready, refused: @escaping Refused) {
        self.maximumChannels = maximumChannels
        self.maximumOpening = maximumOpening
        self.maximumOpeningPerSource = maximumOpeningPerSource
        self.headerTimeout = headerTimeout
        self.gatherTimeout = gatherTimeout
        self.ready = ready
        self.refused = refused
    }

    /// Takes a new connection and returns at once. `open` runs on the connection's thread: it completes the
    /// connection (a TLS handshake, bounded by its own timeout) and names the peer (with TLS, its verified
    /// name); `address` is where the connection comes from (a host, which the per-source limit counts by), and
    /// names it if it fails.
    /// When too many connections are opening, `open` is not called and `abandon` closes the connection (the
    /// default does nothing, for connections that close when `open` is dropped, as an `AcceptedConnection` does).
    public func add(from address: String, open: @escaping @Sendable () throws -> (channel: MigrationChannel, peer: String),
                    abandon: () -> Void = {}) {
        let refusal = lock.withLock { () -> String? in
            if opening >= maximumOpening { return "\(maximumOpening) connections are already opening" }
            if openingBySource[address, default: 0] >= maximumOpeningPerSource {
                return "\(maximumOpeningPerSource) connections from \(address) are already opening"
            }
            opening += 1
            openingBySource[address, default: 0] += 1
            return nil
        }
        if let refusal {
            abandon()
            refused(address, .channel("\(refusal); this one is closed"))
            return
        }
        startThread(named: "migrate-gather") { [self] in
            do {
                let (channel, peer) = try open()
                gather(channel, peer: peer, source: address)
            } catch {
                finishedOpening(address)
                refused(address, error as? MigrationError ?? .channel("\(error)"))
            }
        }
    }

    /// Takes a connection that is already open, from `peer`.
    public func add(_ channel: MigrationChannel, peer: String) {
        add(from: peer, open: { (channel, peer) }, abandon: { channel.close() })
    }

    /// Migrations with some but not all channels in.
    public var pendingCount: Int { lock.withLock { pending.count } }

    /// A connection from `source` is past its handshake and header, or failed in them.
    private func finishedOpening(_ source: String) {
        lock.withLock {
            opening -= 1
            openingBySource[source, default: 1] -= 1
            if openingBySource[source] == 0 { openingBySource[source] = nil }
        }
    }

    private func gather(_ channel: MigrationChannel, peer: String, source: String) {
        let wait = HeaderWait(channel)
        DispatchQueue.global().asyncAfter(deadline: .now() + headerTimeout) {
            // Closing the channel makes the header read below fail: a silent peer costs a thread for this long.
            wait.expire()?.close()
        }
        let header: (header: StreamHeader, bytes: [UInt8])
        do {
            defer {
                wait.finish()
                finishedOpening(source)
            }
            header = try IncomingChannels.readHeader(channel)
        } catch {
            refused(peer, error as? MigrationError ?? .channel("\(error)"))
            return
        }
        let key = Key(peer: peer, migrationID: header.header.migrationID)
        let outcome: Result<[MigrationChannel]?, Error> = lock.withLock {
            do {
                var entry = try pending[key] ?? {
                    serials += 1
                    return (serials, try PartialMigration(header.header, maximumChannels: maximumChannels, closing: channel))
                }()
                let complete = try entry.migration.place(channel, header: header)
                if complete == nil, pending[key] == nil { expire(key, serial: entry.serial, after: gatherTimeout) }
                pending[key] = complete == nil ? entry : nil
                return .success(complete)
            } catch {
                return .failure(error)
            }
        }
        switch outcome {
        case .success(let complete?): ready(complete, peer)
        case .success(nil): break
        case .failure(let error): refused(peer, error as? MigrationError ?? .protocolViolation("\(error)"))
        }
    }

    /// Drops the migration under `key` if it is still incomplete after `seconds`.
    private func expire(_ key: Key, serial: Int, after seconds: Double) {
        DispatchQueue.global().asyncAfter(deadline: .now() + seconds) { [self] in
            let stale: PartialMigration? = lock.withLock {
                guard pending[key]?.serial == serial else { return nil }
                return pending.removeValue(forKey: key)?.migration
            }
            guard let stale else { return }
            stale.close()
            refused(key.peer, .channel("migration \(key.migrationID) did not open all its channels within \(Int(seconds)) s"))
        }
    }
}

/// Whether a connection's header came before its deadline; whichever of the two comes first wins.
///
/// The deadline's closure holds this, not the connection: the connection is let go when the header comes, so
/// that it closes as soon as its migration is done with it rather than when the deadline passes (10 s after it
/// was accepted, which kept every received migration's sockets and TLS buffers that long).
///
/// Sendable: `channel` is guarded by `lock`.
private final class HeaderWait: @unchecked Sendable {
    private let lock = NSLock()
    private var channel: MigrationChannel?

    init(_ channel: MigrationChannel) { self.channel = channel }

    /// The header was read (or failed); the deadline will do nothing.
    func finish() { lock.withLock { channel = nil } }

    /// The connection to close if the deadline came first, nil otherwise.
    func expire() -> MigrationChannel? { lock.withLock { defer { channel = nil }; return channel } }
}

/// A channel that first hands back bytes already read from it.
///
/// Sendable as its base is, given that only the one thread that reads the channel calls `receive`, the only user
/// of `replay`; `send` and `close` just forward.
final class ReplayingChannel: MigrationChannel, @unchecked Sendable {
    private let base: MigrationChannel
    private var replay: [UInt8]
    /// From the header in `replay`.
    let migrationID: UInt32

    init(_ base: MigrationChannel, replay: [UInt8], migrationID: UInt32) {
        self.base = base
        self.replay = replay
        self.migrationID = migrationID
    }

    func send(_ buffers: [UnsafeRawBufferPointer]) throws { try base.send(buffers) }

    func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        guard !replay.isEmpty else { return try base.receive(into: buffer) }
        let count = min(buffer.count, replay.count)
        replay.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[0 ..< count])) }
        replay.removeFirst(count)
        return count
    }

    func close() { base.close() }
}
