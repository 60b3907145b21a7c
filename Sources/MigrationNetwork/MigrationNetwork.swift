import MigrationEngine
import Transport

/// Opens and accepts the channels of a migration over the network: TCP or Unix sockets, with mutual TLS
/// or, when asked for by name, plaintext.
public enum MigrationNetwork {
    /// Connects one channel to a receiver; a `MigrationSender` calls it once per channel.
    public static func connect(to endpoint: Endpoint, security: Security,
                               options: ChannelOptions = ChannelOptions()) throws -> MigrationChannel {
        TransportMigrationChannel(try Transport.connect(to: endpoint, security: security, options: options))
    }

    /// Runs an accepted connection's handshake and names its peer: with TLS, the verified certificate name; in
    /// plaintext, the peer's host. For a `ChannelGatherer`, on the connection's own thread.
    public static func establish(_ connection: AcceptedConnection) throws -> (channel: MigrationChannel, peer: String) {
        let channel = TransportMigrationChannel(try connection.establish())
        return (channel, channel.peer)
    }

    /// Accepts the channels of the next incoming migration, in channel order, when one migration comes at a
    /// time. Every channel must come from the same peer: with TLS, the same allow-listed certificate name.
    public static func accept(from listener: Listener, maximumChannels: Int = 64) throws -> (channels: [MigrationChannel], peer: String) {
        var peers = Set<String>()
        let channels = try IncomingChannels.collect(accept: {
            let (channel, peer) = try establish(listener.acceptConnection())
            peers.insert(peer)
            return channel
        }, maximumChannels: maximumChannels)
        guard peers.count == 1, let peer = peers.first else {
            for channel in channels { channel.close() }
            throw MigrationError.protocolViolation("the channels of one migration come from different peers: \(peers.sorted())")
        }
        return (channels, peer)
    }
}

/// A transport channel seen by the migration engine.
final class TransportMigrationChannel: MigrationChannel {
    let channel: any Channel

    init(_ channel: any Channel) { self.channel = channel }

    /// The verified certificate name for TLS; for plaintext the peer's host (its port differs per connection).
    var peer: String { channel.peerName ?? host(ofPeerAddress: channel.peerAddress) }

    func send(_ buffers: [UnsafeRawBufferPointer]) throws { try channel.send(buffers) }
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> Int { try channel.receive(into: buffer) }
    func close() { channel.close() }
}

extension MigrationNetwork {
    /// Makes a channel of a socket the caller has already connected (a VMM's own), using a duplicate of it; for
    /// TLS, `server` says which side of the handshake this end takes.
    public static func adopt(socket fd: Int32, security: Security, server: Bool,
                             options: ChannelOptions = ChannelOptions()) throws -> (channel: MigrationChannel, peer: String) {
        let channel = TransportMigrationChannel(try Transport.adopt(socket: fd, security: security, server: server, options: options))
        return (channel, channel.peer)
    }
}
