import Glibc
import MigrationEngine
import Threads

/// A real Unix stream socket pair, for engine tests that need no TLS; `cutAfter` closes the sending side
/// after that many bytes, as a failing network would, and `corruptByteAt` flips the bits of the byte sent at
/// that offset of the stream, as a faulty one would.
final class SocketPairChannel: MigrationChannel, @unchecked Sendable {
    private let fd: Int32
    private var closed = false
    var cutAfter: Int?
    var corruptByteAt: Int?
    /// Runs once, on the sending thread, when this many bytes have been sent.
    var whenSent: (bytes: Int, action: () -> Void)?
    /// Fails receiving once this many bytes came in, as a crashed receiver would.
    var dieAfterReceiving: Int?
    /// Fails receiving once this many bytes came in, and from then on reads and drops whatever comes, and lets `close`
    /// close nothing: a link cut only on its way to this side (a proxy that stopped forwarding one direction), where
    /// the peer's writes go on succeeding until the peer closes its end.
    var deafAfterReceiving: Int?
    private var deaf = false
    private(set) var sent = 0
    private(set) var received = 0

    init(fd: Int32) { self.fd = fd }

    static func pair() -> (SocketPairChannel, SocketPairChannel) {
        var fds: [Int32] = [0, 0]
        precondition(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0)
        return (SocketPairChannel(fd: fds[0]), SocketPairChannel(fd: fds[1]))
    }

    func send(_ buffers: [UnsafeRawBufferPointer]) throws {
        for buffer in buffers {
            var done = 0
            while done < buffer.count {
                var length = buffer.count - done
                if let cutAfter {
                    length = min(length, cutAfter - sent)
                    if length <= 0 {
                        close()
                        throw ChannelError("connection cut after \(sent) bytes")
                    }
                }
                let bytes = buffer.baseAddress! + done
                var flipped: UInt8?
                if let corruptByteAt, corruptByteAt >= sent {
                    if corruptByteAt == sent {
                        // That byte alone, from a copy: the sender's buffer may be guest memory.
                        flipped = ~bytes.load(as: UInt8.self)
                        self.corruptByteAt = nil
                    } else {
                        length = min(length, corruptByteAt - sent)
                    }
                }
                let n = if var flipped {
                    withUnsafeBytes(of: &flipped) { Glibc.send(fd, $0.baseAddress, 1, Int32(MSG_NOSIGNAL)) }
                } else {
                    Glibc.send(fd, bytes, length, Int32(MSG_NOSIGNAL))
                }
                if n < 0 {
                    if errno == EINTR { continue }
                    throw ChannelError("send: \(String(cString: strerror(errno)))")
                }
                done += n
                sent += n
                if let trigger = whenSent, sent >= trigger.bytes {
                    whenSent = nil
                    trigger.action()
                }
            }
        }
    }

    func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        while true {
            if let dieAfterReceiving, received >= dieAfterReceiving {
                close()
                throw ChannelError("receiver died after \(received) bytes")
            }
            if let deafAfterReceiving, received >= deafAfterReceiving {
                if !deaf {
                    deaf = true
                    // Holds the channel, and so its descriptor, until the peer closes its end.
                    startThread(named: "deaf-channel") { [self] in
                        var dropped = [UInt8](repeating: 0, count: 1 << 16)
                        while recv(fd, &dropped, dropped.count, 0) > 0 {}
                    }
                }
                throw ChannelError("the link towards the receiver was cut after \(received) bytes")
            }
            let n = recv(fd, buffer.baseAddress, buffer.count, 0)
            if n >= 0 {
                received += n
                return n
            }
            if errno == EINTR { continue }
            throw ChannelError("recv: \(String(cString: strerror(errno)))")
        }
    }

    func close() {
        // shutdown wakes a thread blocked in recv on this descriptor; the descriptor itself is closed in deinit.
        if !deaf { shutdown(fd, Int32(SHUT_RDWR)) }
    }

    /// Ends this side's stream (the peer reads end of file) while replies can still arrive.
    func finishSending() {
        shutdown(fd, Int32(SHUT_WR))
    }

    deinit { Glibc.close(fd) }
}

struct ChannelError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
