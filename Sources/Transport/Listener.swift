import Glibc
import LinuxSystem

/// Connects to `endpoint` and, for TLS, completes the mutual handshake before returning.
/// For a host name that resolves to several addresses, each is tried in turn within `connectTimeout`.
public func connect(to endpoint: Endpoint, security: Security, options: ChannelOptions = ChannelOptions()) throws(TransportError) -> any Channel {
    let deadline = Deadline(after: options.connectTimeout)
    let addresses: [SocketAddress]
    switch endpoint {
    case .tcp(let host, let port): addresses = try SocketAddress.resolve(host: host, port: port, passive: false)
    case .unix(let path): addresses = [try SocketAddress(unixPath: path)]
    }
    var lastError = TransportError.addressResolution(host: endpoint.description, reason: "no address")
    for address in addresses {
        do throws(TransportError) {
            let socket = try Socket.connect(address, options: options, deadline: deadline)
            return try makeChannel(socket: socket, family: address.family, security: security, server: false, context: nil, options: options)
        } catch .connectionRefused {
            lastError = .connectionRefused(endpoint: endpoint.description)
        } catch .system(let error) where error.errno == ENETUNREACH || error.errno == EADDRNOTAVAIL || error.errno == ENOENT {
            lastError = .system(error)
        }
    }
    throw lastError
}

/// Makes a channel of a stream socket that is already connected (a VMM's own connection, say), using a duplicate
/// of `fd` so that the caller keeps its own. For TLS, `server` says which side of the handshake this end takes;
/// the handshake is done before this returns.
public func adopt(socket fd: Int32, security: Security, server: Bool, options: ChannelOptions = ChannelOptions()) throws(TransportError) -> any Channel {
    var type: Int32 = 0
    var length = socklen_t(MemoryLayout<Int32>.size)
    guard fd >= 0, getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &length) == 0, type == Int32(SOCK_STREAM.rawValue) else {
        throw .configuration("descriptor \(fd) is not a stream socket")
    }
    var address = SocketAddress()
    address.length = socklen_t(MemoryLayout<sockaddr_storage>.size)
    _ = try transportCall("getsockname") {
        withUnsafeMutablePointer(to: &address.storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &address.length) } }
    }
    let socket = OwnedFileDescriptor(taking: try transportCall("fcntl F_DUPFD_CLOEXEC") { fcntl(fd, F_DUPFD_CLOEXEC, 0) })
    return try makeChannel(socket: socket, family: address.family, security: security, server: server, context: nil, options: options)
}

/// Wraps a connected socket in the channel its security asks for. `context` is the listener's, built once;
/// a client builds its own.
private func makeChannel(socket: OwnedFileDescriptor, family: Int32, security: Security, server: Bool,
                         context: TLSContext?, options: ChannelOptions) throws(TransportError) -> any Channel {
    switch security {
    case .plaintext:
        try Socket.setNonBlocking(socket.rawValue, false)
        try Socket.applyConnectionOptions(socket.rawValue, family: family, options)
        return SocketChannel(socket: socket)
    case .tls(let configuration):
        let context = if let context { context } else { try TLSContext(configuration, server: server) }
        return try TLSChannel(socket: socket, family: family, context: context, server: server, options: options)
    }
}

/// The host part of a peer address as `Channel.peerAddress` writes it ("10.0.0.2:51234", "[fe80::1]:51234"), or
/// "unix" for a Unix socket's peer.
public func host(ofPeerAddress address: String) -> String {
    if address.hasPrefix("unix:") { return "unix" }
    guard let colon = address.lastIndex(of: ":") else { return address }
    return String(address[..<colon].filter { $0 != "[" && $0 != "]" })
}

/// A listening socket that hands out channels, one per accepted connection.
public final class Listener: Sendable {
    private let socket: OwnedFileDescriptor
    private let family: Int32
    private let security: Security
    private let context: TLSContext?
    private let options: ChannelOptions
    /// Where the listener actually listens: with port 0 asked for, the port the kernel chose.
    public let endpoint: Endpoint

    public init(endpoint: Endpoint, security: Security, options: ChannelOptions = ChannelOptions(), backlog: Int32 = 64) throws(TransportError) {
        let address: SocketAddress
        switch endpoint {
        case .tcp(let host, let port):
            guard let first = try SocketAddress.resolve(host: host, port: port, passive: true).first else {
                throw .addressResolution(host: host, reason: "no address")
            }
            address = first
        case .unix(let path):
            address = try SocketAddress(unixPath: path)
        }
        socket = try Socket.make(family: address.family)
        family = address.family
        self.security = security
        self.options = options
        if case .tls(let configuration) = security {
            context = try TLSContext(configuration, server: true) // before binding: a bad key fails here, not at accept
        } else {
            context = nil
        }
        let fd = socket.rawValue
        if family != AF_UNIX { try Socket.setOption(fd, SOL_SOCKET, SO_REUSEADDR, 1, "SO_REUSEADDR") }
        try Socket.applyBufferSizes(fd, options) // accepted sockets inherit them
        _ = try address.withSockaddr { (pointer, length) throws(TransportError) in
            try transportCall("bind \(endpoint)") { bind(fd, pointer, length) }
        }
        try transportCall("listen on \(endpoint)") { listen(fd, backlog) }

        var bound = SocketAddress()
        bound.length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        try transportCall("getsockname") {
            withUnsafeMutablePointer(to: &bound.storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &bound.length) }
            }
        }
        if case .tcp = endpoint, let (host, port) = bound.numericHostAndPort {
            self.endpoint = .tcp(host: host, port: port)
        } else {
            self.endpoint = endpoint
        }
    }

    /// Waits for a connection and, for TLS, runs its handshake (bounded by `handshakeTimeout`).
    /// A refused peer is an error of this call; the listener itself carries on.
    public func accept() throws(TransportError) -> any Channel {
        try acceptConnection().establish()
    }

    /// Waits for a connection and returns it before any handshake, so that a server can run handshakes on
    /// threads of their own: a peer that connects and then stalls holds up only its own connection.
    public func acceptConnection() throws(TransportError) -> AcceptedConnection {
        let fd = try transportCall("accept on \(endpoint)") { Glibc.accept(socket.rawValue, nil, nil) }
        let connection = OwnedFileDescriptor(taking: fd)
        // accept4 with SOCK_CLOEXEC is not visible to Swift; the descriptor must not leak into a forked child.
        try transportCall("fcntl FD_CLOEXEC") { fcntl(fd, F_SETFD, FD_CLOEXEC) }
        return AcceptedConnection(socket: connection, listener: self)
    }

    fileprivate func establish(_ connection: OwnedFileDescriptor) throws(TransportError) -> any Channel {
        try makeChannel(socket: connection, family: family, security: security, server: true, context: context, options: options)
    }

    public func close() {
        _ = shutdown(socket.rawValue, Int32(SHUT_RDWR))
    }

    deinit {
        if case .unix(let path) = endpoint { unlink(path) } // the socket file is ours; leave no stale one behind
    }
}

/// A connection a listener accepted, before its handshake.
public final class AcceptedConnection: Sendable {
    private let socket: OwnedFileDescriptor
    private let listener: Listener

    fileprivate init(socket: OwnedFileDescriptor, listener: Listener) {
        self.socket = socket
        self.listener = listener
    }

    /// The peer's address, as the socket reports it.
    public var peerAddress: String { Socket.peerAddress(socket.rawValue) }

    /// The host the connection comes from, without its port (which changes with every connection): what limits
    /// and logs count connections by. "unix" for a Unix socket.
    public var peerHost: String { host(ofPeerAddress: peerAddress) }

    /// Runs the handshake the listener's security asks for (TLS: bounded by `handshakeTimeout`), once. When it
    /// fails, the connection closes as soon as this object goes away.
    public func establish() throws(TransportError) -> any Channel {
        try listener.establish(socket)
    }
}
