import Foundation
import Glibc
import Threads

/// A TCP proxy on loopback between a migration's source and its destination, which can break what it carries:
/// cut every connection once `cutAfter` bytes have gone from source to destination in all, or flip one bit of the
/// byte at offset `corruptAt` of that direction; or cut every connection when the test says (`cut`), and carry the
/// next ones on. For the fault tests of processes the test cannot reach into.
///
/// Sendable: `forwarded` and `sockets` are guarded by `lock`; the rest is set in `init`.
public final class TCPProxy: @unchecked Sendable {
    /// Where the proxy listens, on 127.0.0.1.
    public let port: UInt16
    private let listener: Int32
    private let target: UInt16
    private let lock = NSLock()
    private var forwarded = 0
    private var sockets: [Int32] = []
    private let cutAfter: Int?
    private let corruptAt: Int?

    /// Forwards connections to 127.0.0.1:`target`.
    public init(to target: UInt16, cutAfter: Int? = nil, corruptAt: Int? = nil) throws {
        self.target = target
        self.cutAfter = cutAfter
        self.corruptAt = corruptAt
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var address = Self.loopback(port: 0)
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
                bind(fd, pointer, length) == 0 && listen(fd, 64) == 0 && getsockname(fd, pointer, &length) == 0
            }
        }
        guard fd >= 0, bound else { throw POSIXError(.EADDRNOTAVAIL) }
        listener = fd
        port = UInt16(bigEndian: address.sin_port)
        startThread(named: "test-proxy") { [self] in acceptLoop() }
    }

    /// Bytes carried from source to destination so far.
    public var bytesForwarded: Int { lock.withLock { forwarded } }

    /// Breaks every connection carried so far, as a link that fails does; later connections are carried as before.
    public func cut() {
        for fd in lock.withLock({ sockets }) { shutdown(fd, Int32(SHUT_RDWR)) }
    }

    /// Stops listening and breaks every connection.
    public func close() {
        shutdown(listener, Int32(SHUT_RDWR))
        Glibc.close(listener)
        for fd in lock.withLock({ sockets }) { shutdown(fd, Int32(SHUT_RDWR)) }
    }

    private static func loopback(port: UInt16) -> sockaddr_in {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        return address
    }

    private func acceptLoop() {
        while true {
            let client = accept(listener, nil, nil)
            guard client >= 0 else { return }
            let server = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            var address = Self.loopback(port: target)
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(server, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
            }
            guard connected else {
                Glibc.close(client)
                Glibc.close(server)
                continue
            }
            // A cut resets both connections (no lingering data), as a dead link or peer does, so the source sees it.
            var reset = linger(l_onoff: 1, l_linger: 0)
            for fd in [client, server] { setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, socklen_t(MemoryLayout<linger>.size)) }
            lock.withLock { sockets += [client, server] }
            let pair = PumpPair(client, server) { [self] in lock.withLock { sockets.removeAll { $0 == client || $0 == server } } }
            startThread(named: "test-proxy-up") { [self] in
                pump(from: client, to: server, downstream: true)
                pair.finished()
            }
            startThread(named: "test-proxy-down") { [self] in
                pump(from: server, to: client, downstream: false)
                pair.finished()
            }
        }
    }

    /// Copies one direction until either side closes; source-to-destination bytes are counted, cut and corrupted.
    private func pump(from input: Int32, to output: Int32, downstream: Bool) {
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        defer {
            shutdown(input, Int32(SHUT_RDWR))
            shutdown(output, Int32(SHUT_RDWR))
        }
        while true {
            let count = read(input, &buffer, buffer.count)
            guard count > 0 else { return }
            var length = count
            if downstream {
                let (start, cut): (Int, Bool) = lock.withLock {
                    let start = forwarded
                    if let cutAfter, start + count >= cutAfter {
                        length = max(0, cutAfter - start)
                        forwarded = cutAfter
                        return (start, true)
                    }
                    forwarded += count
                    return (start, false)
                }
                if let corruptAt, corruptAt >= start, corruptAt < start + length { buffer[corruptAt - start] ^= 0x10 }
                if cut {
                    _ = write(output, buffer, length)
                    for fd in lock.withLock({ sockets }) { shutdown(fd, Int32(SHUT_RDWR)) }
                    return
                }
            }
            var done = 0
            while done < length {
                let written = buffer.withUnsafeBytes { write(output, $0.baseAddress! + done, length - done) }
                guard written > 0 else { return }
                done += written
            }
        }
    }
}

/// The two sockets of one proxied connection, closed once both directions have stopped.
///
/// Sendable: `running` is guarded by `lock`; `forget` runs once, on the thread that finishes last.
private final class PumpPair: @unchecked Sendable {
    private let lock = NSLock()
    private var running = 2
    private let sockets: [Int32]
    /// Forgets the sockets in the proxy's list before they close, so that nothing touches their numbers again.
    private let forget: () -> Void

    init(_ a: Int32, _ b: Int32, forget: @escaping () -> Void) {
        sockets = [a, b]
        self.forget = forget
    }

    func finished() {
        let last = lock.withLock { running -= 1; return running == 0 }
        guard last else { return }
        forget()
        for fd in sockets { close(fd) }
    }
}
