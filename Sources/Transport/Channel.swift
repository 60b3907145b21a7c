import Glibc
import LinuxSystem

/// One connection between a sender and a receiver, used with blocking calls from dedicated threads.
///
/// A channel is used by one thread at a time: TLS keeps per-connection state that a concurrent send and
/// receive would corrupt. The one exception is `close()`, which any thread may call to wake a blocked one.
/// Sends return once every byte is handed to the kernel; nothing is buffered across calls.
public protocol Channel: AnyObject, Sendable {
    /// Sends all of `buffer`.
    func send(_ buffer: UnsafeRawBufferPointer) throws(TransportError)
    /// Sends the buffers back to back, as if they were one (a record header and the pages it describes),
    /// without copying them together where the transport can avoid it.
    func send(_ buffers: [UnsafeRawBufferPointer]) throws(TransportError)
    /// Receives what is available, at least one byte, at most `buffer.count`. 0 means the peer ended the
    /// stream cleanly (FIN for plain sockets, close_notify for TLS).
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws(TransportError) -> Int
    /// Fills all of `buffer`; the stream ending first is `connectionClosed(expectedBytes:receivedBytes:)`.
    func receive(exactly buffer: UnsafeMutableRawBufferPointer) throws(TransportError)
    /// Ends our direction of the stream; the peer's receive then returns 0. Receiving still works.
    func shutdown() throws(TransportError)
    /// Breaks the connection in both directions at once, waking any thread blocked on it. The descriptor
    /// itself is closed when the channel is released, so it cannot be reused under a blocked thread.
    func close()
    /// The verified name of the peer: the allow-listed name its certificate matched. Nil for plaintext.
    var peerName: String? { get }
    /// The peer's address, "host:port" or "unix:path", for logs.
    var peerAddress: String { get }
}

/// A channel over a plain TCP or Unix socket.
final class SocketChannel: Channel, Sendable {
    let socket: OwnedFileDescriptor
    let peerAddress: String
    var peerName: String? { nil }

    init(socket: OwnedFileDescriptor) {
        self.socket = socket
        self.peerAddress = Socket.peerAddress(socket.rawValue)
    }

    func send(_ buffer: UnsafeRawBufferPointer) throws(TransportError) {
        var done = 0
        while done < buffer.count {
            // MSG_NOSIGNAL: a vanished peer is an error to report, not a SIGPIPE that kills the daemon.
            done += try transportCall("send") {
                Glibc.send(socket.rawValue, buffer.baseAddress! + done, buffer.count - done, Int32(MSG_NOSIGNAL))
            }
        }
    }

    func send(_ buffers: [UnsafeRawBufferPointer]) throws(TransportError) {
        let batchLimit = 1024 // IOV_MAX on Linux: sendmsg takes no more vectors per call
        try withUnsafeTemporaryAllocation(of: iovec.self, capacity: min(buffers.count, batchLimit)) { (vectors) throws(TransportError) in
            var next = 0 // first buffer not yet put in `vectors`
            while next < buffers.count {
                var count = 0
                while count < vectors.count && next < buffers.count {
                    let buffer = buffers[next]
                    next += 1
                    if buffer.count == 0 { continue }
                    vectors[count] = iovec(iov_base: UnsafeMutableRawPointer(mutating: buffer.baseAddress!), iov_len: buffer.count)
                    count += 1
                }
                var first = 0
                while first < count {
                    var message = msghdr()
                    message.msg_iov = vectors.baseAddress! + first
                    message.msg_iovlen = count - first
                    var sent = try transportCall("sendmsg") { sendmsg(socket.rawValue, &message, Int32(MSG_NOSIGNAL)) }
                    // A short send stops inside some vector: drop the vectors it finished, trim the one it stopped in.
                    while first < count && sent >= vectors[first].iov_len {
                        sent -= vectors[first].iov_len
                        first += 1
                    }
                    if first < count && sent > 0 {
                        vectors[first].iov_base += sent
                        vectors[first].iov_len -= sent
                    }
                }
            }
        }
    }

    func receive(into buffer: UnsafeMutableRawBufferPointer) throws(TransportError) -> Int {
        guard buffer.count > 0 else { return 0 }
        return try transportCall("receive") { recv(socket.rawValue, buffer.baseAddress!, buffer.count, 0) }
    }

    func receive(exactly buffer: UnsafeMutableRawBufferPointer) throws(TransportError) {
        var done = 0
        while done < buffer.count {
            // MSG_WAITALL lets the kernel fill the whole buffer in one call when the data keeps coming.
            let n = try transportCall("receive") {
                recv(socket.rawValue, buffer.baseAddress! + done, buffer.count - done, Int32(MSG_WAITALL))
            }
            if n == 0 { throw .connectionClosed(expectedBytes: buffer.count, receivedBytes: done) }
            done += n
        }
    }

    func shutdown() throws(TransportError) {
        try transportCall("shutdown") { Glibc.shutdown(socket.rawValue, Int32(SHUT_WR)) }
    }

    func close() {
        _ = Glibc.shutdown(socket.rawValue, Int32(SHUT_RDWR))
    }
}
