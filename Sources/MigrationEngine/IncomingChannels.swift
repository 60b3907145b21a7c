import MigrationWire

/// Gathers the channels of one incoming migration from a listener. Connections may arrive in any order:
/// each opens with its stream header, which names its channel index and the channel count, so the first
/// header read says how many more to accept, and every channel is put in its place.
public enum IncomingChannels {
    /// Accepts connections with `accept` until all channels of one migration are in, and returns them in
    /// channel order, each still positioned at the start of its stream.
    public static func collect(accept: () throws -> MigrationChannel, maximumChannels: Int = 64) throws -> [MigrationChannel] {
        var slots: [MigrationChannel?] = []
        var expected = 1
        var accepted = 0
        while accepted < expected {
            let channel = try accept()
            let header = try readHeader(channel)
            accepted += 1
            if slots.isEmpty {
                guard Int(header.channelCount) <= maximumChannels else {
                    channel.close()
                    throw MigrationError.protocolViolation("sender asks for \(header.channelCount) channels, at most \(maximumChannels) are accepted")
                }
                expected = Int(header.channelCount)
                slots = Array(repeating: nil, count: expected)
            }
            guard Int(header.channelCount) == expected, slots[Int(header.channel)] == nil else {
                channel.close()
                for open in slots { open?.close() }
                throw MigrationError.protocolViolation("connection claims channel \(header.channel) of \(header.channelCount), this migration has \(expected) channels")
            }
            slots[Int(header.channel)] = ReplayingChannel(channel, replay: header.bytes)
        }
        return slots.map { $0! }
    }

    /// Reads exactly one stream header, checked by the wire decoder.
    private static func readHeader(_ channel: MigrationChannel) throws -> (channel: UInt16, channelCount: UInt16, bytes: [UInt8]) {
        var bytes = [UInt8](repeating: 0, count: WireFormat.headerLength)
        var filled = 0
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
            return (header.channel, header.channelCount, bytes)
        } catch let error as WireError {
            channel.close()
            throw MigrationError.malformedStream("\(error)")
        }
    }
}

/// A channel that first hands back bytes already read from it.
final class ReplayingChannel: MigrationChannel {
    private let base: MigrationChannel
    private var replay: [UInt8]

    init(_ base: MigrationChannel, replay: [UInt8]) {
        self.base = base
        self.replay = replay
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
