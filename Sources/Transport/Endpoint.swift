import Glibc
import LinuxSystem
import NetworkAddress

/// Where a listener listens and a connection goes.
public enum Endpoint: Sendable, Hashable, CustomStringConvertible {
    /// A TCP host (a name, an IPv4 or an IPv6 address) and port. Port 0 when listening picks a free port.
    case tcp(host: String, port: UInt16)
    /// A Unix domain stream socket at a file-system path.
    case unix(path: String)

    public var description: String { address.description }
}

/// Whether a connection is encrypted. There is no default: plaintext must be chosen by name.
public enum Security: Sendable {
    case plaintext
    case tls(TLSConfiguration)
}

/// Socket and time limits of a connection.
public struct ChannelOptions: Sendable {
    /// Limit on establishing the TCP or Unix connection.
    public var connectTimeout: Duration = .seconds(10)
    /// Limit on the whole TLS handshake, including the peer's acceptance of our certificate.
    public var handshakeTimeout: Duration = .seconds(10)
    /// When set, a send or receive that makes no progress for this long fails with `timedOut`. The channel is
    /// unusable afterwards (a TLS record may be half sent): close it.
    public var ioTimeout: Duration? = nil
    /// SO_SNDBUF and SO_RCVBUF; nil leaves the kernel's auto-tuning in charge.
    public var sendBufferSize: Int? = nil
    public var receiveBufferSize: Int? = nil
    /// TCP_NODELAY, so a small record (an ack, a switchover message) leaves at once instead of after 40 ms.
    public var noDelay = true

    public init() {}
}

/// A socket address in the form the kernel wants, with its length.
struct SocketAddress {
    var storage = sockaddr_storage()
    var length: socklen_t = 0
    var family: Int32 { Int32(storage.ss_family) }

    init() {}

    init(unixPath path: String) throws(TransportError) {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard !bytes.isEmpty, bytes.count < capacity else {
            throw .configuration("Unix socket path must be 1 to \(capacity - 1) bytes: \(path)")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        withUnsafeMutableBytes(of: &storage) { destination in
            withUnsafeBytes(of: address) { destination.copyMemory(from: $0) }
        }
        length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + 1)
    }

    /// Every address `host` resolves to, in the resolver's order of preference.
    static func resolve(host: String, port: UInt16, passive: Bool) throws(TransportError) -> [SocketAddress] {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0)
        var list: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host.isEmpty ? nil : host, String(port), &hints, &list)
        guard status == 0 else { throw .addressResolution(host: host, reason: String(cString: gai_strerror(status))) }
        defer { freeaddrinfo(list) }
        var addresses: [SocketAddress] = []
        var entry = list
        while let info = entry?.pointee {
            var address = SocketAddress()
            withUnsafeMutableBytes(of: &address.storage) { $0.copyMemory(from: UnsafeRawBufferPointer(start: info.ai_addr, count: Int(info.ai_addrlen))) }
            address.length = info.ai_addrlen
            addresses.append(address)
            entry = info.ai_next
        }
        return addresses
    }

    func withSockaddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws(TransportError) -> R) throws(TransportError) -> R {
        var copy = storage
        return try withUnsafePointer(to: &copy) { (pointer) throws(TransportError) -> R in
            try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { (p) throws(TransportError) -> R in try body(p, length) }
        }
    }

    /// "host:port" for TCP, the path for Unix sockets: for messages and `Channel.peerAddress`.
    var text: String {
        switch family {
        case AF_UNIX:
            return withUnsafeBytes(of: storage) { raw in
                let pathOffset = MemoryLayout<sa_family_t>.size
                let path = raw[pathOffset ..< Int(max(length, socklen_t(pathOffset)))].prefix { $0 != 0 }
                return path.isEmpty ? "unix:(unnamed)" : "unix:" + String(decoding: path, as: UTF8.self)
            }
        default:
            guard let (host, port) = numericHostAndPort else { return "?" }
            return Endpoint.tcp(host: host, port: port).description
        }
    }

    var numericHostAndPort: (String, UInt16)? {
        var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        var service = [CChar](repeating: 0, count: Int(NI_MAXSERV))
        var copy = storage
        let status = withUnsafePointer(to: &copy) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                getnameinfo($0, length, &host, socklen_t(host.count), &service, socklen_t(service.count), NI_NUMERICHOST | NI_NUMERICSERV)
            }
        }
        guard status == 0, let port = UInt16(service.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }) else { return nil }
        return (host.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }, port)
    }
}

/// A point in time after which an operation gives up.
struct Deadline {
    let end: ContinuousClock.Instant

    init(after duration: Duration) { end = .now + duration }

    /// Milliseconds left, rounded up so that poll does not return just before the deadline and spin.
    var remainingMilliseconds: Int32 {
        let left = end - .now
        if left <= .zero { return 0 }
        let (seconds, attoseconds) = left.components
        return Int32(clamping: seconds * 1000 + (attoseconds + 999_999_999_999_999) / 1_000_000_000_000_000)
    }
}

/// Waits until `fd` is ready for `events` (POLLIN, POLLOUT), or throws `timedOut(operation)` at the deadline.
func wait(for events: Int16, on fd: Int32, until deadline: Deadline, operation: @autoclosure () -> String) throws(TransportError) {
    var entry = pollfd(fd: fd, events: events, revents: 0)
    // The closure is evaluated afresh when systemCall retries after a signal, so the remaining time shrinks.
    let ready = try transportCall("poll for \(operation())") { poll(&entry, 1, deadline.remainingMilliseconds) }
    if ready == 0 { throw .timedOut(operation: operation()) }
}

/// The socket-level calls shared by plain and TLS channels and by listeners.
enum Socket {
    static func make(family: Int32) throws(TransportError) -> OwnedFileDescriptor {
        let fd = try transportCall("socket") { socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        return OwnedFileDescriptor(taking: fd)
    }

    static func setOption(_ fd: Int32, _ level: Int32, _ name: Int32, _ value: Int32, _ label: String) throws(TransportError) {
        var value = value
        try transportCall("setsockopt \(label)") { setsockopt(fd, level, name, &value, socklen_t(MemoryLayout<Int32>.size)) }
    }

    static func setTimeout(_ fd: Int32, _ name: Int32, _ duration: Duration?, _ label: String) throws(TransportError) {
        var value = timeval()
        if let duration {
            let (seconds, attoseconds) = duration.components
            value.tv_sec = Int(seconds)
            value.tv_usec = Int(attoseconds / 1_000_000_000_000)
            if value.tv_sec == 0 && value.tv_usec == 0 { value.tv_usec = 1 } // zero would mean "no limit"
        }
        try transportCall("setsockopt \(label)") { setsockopt(fd, SOL_SOCKET, name, &value, socklen_t(MemoryLayout<timeval>.size)) }
    }

    /// Buffer sizes go on before connect or listen, so that TCP's window scale is negotiated to fit them.
    static func applyBufferSizes(_ fd: Int32, _ options: ChannelOptions) throws(TransportError) {
        if let size = options.sendBufferSize { try setOption(fd, SOL_SOCKET, SO_SNDBUF, Int32(clamping: size), "SO_SNDBUF") }
        if let size = options.receiveBufferSize { try setOption(fd, SOL_SOCKET, SO_RCVBUF, Int32(clamping: size), "SO_RCVBUF") }
    }

    /// Options of an established connection: no Nagle delay, and the I/O timeout.
    static func applyConnectionOptions(_ fd: Int32, family: Int32, _ options: ChannelOptions) throws(TransportError) {
        if family != AF_UNIX && options.noDelay {
            try setOption(fd, Int32(IPPROTO_TCP), TCP_NODELAY, 1, "TCP_NODELAY")
        }
        try setTimeout(fd, SO_RCVTIMEO, options.ioTimeout, "SO_RCVTIMEO")
        try setTimeout(fd, SO_SNDTIMEO, options.ioTimeout, "SO_SNDTIMEO")
    }

    static func setNonBlocking(_ fd: Int32, _ nonBlocking: Bool) throws(TransportError) {
        let flags = try transportCall("fcntl F_GETFL") { fcntl(fd, F_GETFL) }
        let wanted = nonBlocking ? flags | O_NONBLOCK : flags & ~O_NONBLOCK
        if wanted != flags { try transportCall("fcntl F_SETFL") { fcntl(fd, F_SETFL, wanted) } }
    }

    static func peerAddress(_ fd: Int32) -> String {
        var address = SocketAddress()
        address.length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let status = withUnsafeMutablePointer(to: &address.storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &address.length) }
        }
        return status == 0 ? address.text : "?"
    }

    /// Connects a non-blocking socket within the deadline. The socket stays non-blocking.
    static func connect(_ address: SocketAddress, options: ChannelOptions, deadline: Deadline) throws(TransportError) -> OwnedFileDescriptor {
        let socket = try make(family: address.family)
        let fd = socket.rawValue
        try applyBufferSizes(fd, options)
        try setNonBlocking(fd, true)
        do {
            _ = try address.withSockaddr { (pointer, length) throws(TransportError) in
                try transportCall("connect to \(address.text)") { Glibc.connect(fd, pointer, length) }
            }
        } catch .system(let error) where error.errno == EINPROGRESS {
            try wait(for: Int16(POLLOUT), on: fd, until: deadline, operation: "connect to \(address.text)")
            var status: Int32 = 0
            var length = socklen_t(MemoryLayout<Int32>.size)
            try transportCall("getsockopt SO_ERROR") { getsockopt(fd, SOL_SOCKET, SO_ERROR, &status, &length) }
            if status != 0 { throw TransportError(SystemError("connect to \(address.text)", errno: status)) }
        }
        return socket
    }
}

extension Endpoint {
    /// The endpoint an address names.
    public init(_ address: PeerAddress) {
        switch address {
        case .tcp(let host, let port): self = .tcp(host: host, port: port)
        case .unix(let path): self = .unix(path: path)
        }
    }

    /// The address that names this endpoint, in the syntax `PeerAddress` reads.
    public var address: PeerAddress {
        switch self {
        case .tcp(let host, let port): .tcp(host: host, port: port)
        case .unix(let path): .unix(path: path)
        }
    }
}
