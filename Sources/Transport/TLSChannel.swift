import COpenSSL
import Glibc
import LinuxSystem

/// A channel over TLS 1.3, after a handshake in which both sides proved who they are.
///
/// After the handshake the server sends one byte, `accepted`, which the client waits for before its
/// connect returns. TLS 1.3 lets a client finish its handshake before the server has judged the client's
/// certificate; without this byte a refused client would learn of it only at its first receive, after it
/// had started sending.
///
/// Sendable: at most one thread sends and one receives at a time (the engine's discipline; `staging` is the
/// sender's), and `close` only shuts the socket down, which wakes both. `peerName` is set during the handshake,
/// before the channel is shared. A channel that carries a reply stream is read and written at once, which
/// OpenSSL does not promise for one SSL object; it works because TLS 1.3 reads and writes keep separate record
/// state and the peers send no post-handshake messages (no key update, no tickets), but it is not proven.
final class TLSChannel: Channel, @unchecked Sendable {
    static let accepted: UInt8 = 0x01

    let socket: OwnedFileDescriptor
    let ssl: OpaquePointer
    let io: SocketIO
    let context: TLSContext // the SSL refers to its SSL_CTX
    let peerAddress: String
    private(set) var peerName: String?
    /// Where small pieces of a vectored send are gathered into full records.
    private let staging = UnsafeMutableRawBufferPointer.allocate(byteCount: tlsRecordSize, alignment: 16)

    /// Runs the handshake on a connected socket, within `options.handshakeTimeout`.
    init(socket: OwnedFileDescriptor, family: Int32, context: TLSContext, server: Bool, options: ChannelOptions) throws(TransportError) {
        self.socket = socket
        self.context = context
        self.peerAddress = Socket.peerAddress(socket.rawValue)
        guard let ssl = SSL_new(context.context) else {
            staging.deallocate()
            throw .configuration("SSL_new: \(openSSLErrors())")
        }
        self.ssl = ssl
        io = SocketIO(fd: socket.rawValue)
        SSL_set_ex_data(ssl, 0, Unmanaged.passUnretained(io).toOpaque()) // for the verify callback
        let bio = io.makeBIO()
        SSL_set_bio(ssl, bio, bio)
        if server { SSL_set_accept_state(ssl) } else { SSL_set_connect_state(ssl) }

        let deadline = Deadline(after: options.handshakeTimeout)
        try Socket.setNonBlocking(socket.rawValue, true)
        if server { try refusePlaintext(deadline: deadline) }
        try step("TLS handshake", deadline: deadline) { SSL_do_handshake(ssl) }
        try confirm(server: server, deadline: deadline)
        peerName = SSL_get0_peername(ssl).map { String(cString: $0) }
        try Socket.setNonBlocking(socket.rawValue, false)
        try Socket.applyConnectionOptions(socket.rawValue, family: family, options)
        io.gathersWrites = true
    }

    deinit {
        SSL_free(ssl) // frees the BIO, which releases `io`
        staging.deallocate()
    }

    /// A TLS client's first byte is 0x16, a handshake record. Anything else is a peer speaking plaintext,
    /// which gets a clear refusal rather than OpenSSL's "wrong version number".
    private func refusePlaintext(deadline: Deadline) throws(TransportError) {
        var first: UInt8 = 0
        while true {
            do throws(TransportError) {
                let n = try transportCall("receive the first byte") { recv(socket.rawValue, &first, 1, Int32(MSG_PEEK)) }
                if n == 0 { throw TransportError.connectionClosed(expectedBytes: 1, receivedBytes: 0) }
                break
            } catch .timedOut { // EAGAIN on the non-blocking socket: nothing yet
                try wait(for: Int16(POLLIN), on: socket.rawValue, until: deadline, operation: "TLS handshake")
            }
        }
        if first != 0x16 { throw .plaintextRefused }
    }

    /// The server tells the client it was accepted; the client waits to hear it.
    private func confirm(server: Bool, deadline: Deadline) throws(TransportError) {
        var byte = server ? TLSChannel.accepted : 0
        var count = 0
        if server {
            try step("TLS handshake", deadline: deadline) { SSL_write_ex(ssl, &byte, 1, &count) }
        } else {
            try step("TLS handshake", deadline: deadline) { SSL_read_ex(ssl, &byte, 1, &count) }
            if byte != TLSChannel.accepted { throw .handshakeFailed(reason: "the server sent \(byte) instead of its acceptance") }
        }
    }

    /// Runs one OpenSSL call on the non-blocking socket until it succeeds, polling as OpenSSL asks.
    private func step(_ operation: String, deadline: Deadline, _ call: () -> Int32) throws(TransportError) {
        while true {
            ERR_clear_error()
            let result = call()
            if result == 1 { return }
            switch SSL_get_error(ssl, result) {
            case SSL_ERROR_WANT_READ: try wait(for: Int16(POLLIN), on: socket.rawValue, until: deadline, operation: operation)
            case SSL_ERROR_WANT_WRITE: try wait(for: Int16(POLLOUT), on: socket.rawValue, until: deadline, operation: operation)
            default: throw handshakeFailure(result)
            }
        }
    }

    /// Says why the handshake failed: our verdict on the peer's certificate if we refused it, the alert the
    /// peer sent if it refused ours, or OpenSSL's reason.
    private func handshakeFailure(_ result: Int32) -> TransportError {
        let verdict = Int32(SSL_get_verify_result(ssl))
        if verdict != X509_V_OK {
            let reason = String(cString: X509_verify_cert_error_string(Int(verdict)))
            switch verdict {
            case X509_V_ERR_HOSTNAME_MISMATCH:
                return .peerNameNotAllowed(names: io.peerCertificateNames, allowed: context.allowedPeerNames)
            case X509_V_ERR_CERT_HAS_EXPIRED, X509_V_ERR_CERT_NOT_YET_VALID:
                return .expiredCertificate(reason: "\(reason) (peer \(io.peerCertificateNames))")
            default:
                return .untrustedCertificate(reason: "\(reason) (peer \(io.peerCertificateNames))")
            }
        }
        return failure(result, operation: "TLS handshake", expected: nil, received: 0, handshake: true)
    }

    /// Classifies a failed SSL call. Alerts the peer sent about our certificate become the same typed errors
    /// as our own verdicts, prefixed with "the peer says".
    private func failure(_ result: Int32, operation: String, expected: Int?, received: Int, handshake: Bool) -> TransportError {
        let kind = SSL_get_error(ssl, result)
        let code = ERR_peek_error()
        let reasons = openSSLErrors()
        switch kind {
        case SSL_ERROR_ZERO_RETURN:
            return .connectionClosed(expectedBytes: expected ?? 1, receivedBytes: received)
        case SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE:
            return .timedOut(operation: operation)
        case SSL_ERROR_SYSCALL where io.lastErrno != 0:
            return TransportError(SystemError(operation, errno: io.lastErrno))
        case SSL_ERROR_SYSCALL where handshake:
            return .handshakeFailed(reason: "the peer closed the connection during the handshake")
        case SSL_ERROR_SYSCALL:
            return .connectionClosed(expectedBytes: expected, receivedBytes: received)
        default:
            break
        }
        let reason = ERR_GET_REASON(code)
        if reason == SSL_R_UNEXPECTED_EOF_WHILE_READING {
            return handshake ? .handshakeFailed(reason: "the peer closed the connection during the handshake")
                : .connectionClosed(expectedBytes: expected, receivedBytes: received)
        }
        if io.lastErrno == ECONNRESET || io.lastErrno == EPIPE { return .connectionReset(operation: operation) }
        switch reason - SSL_AD_REASON_OFFSET {
        case SSL_AD_CERTIFICATE_EXPIRED:
            return .expiredCertificate(reason: "the peer says our certificate has expired")
        case SSL_AD_UNKNOWN_CA:
            return .untrustedCertificate(reason: "the peer does not trust our certificate (\(reasons))")
        case SSL_AD_BAD_CERTIFICATE, SSL_AD_CERTIFICATE_UNKNOWN:
            // OpenSSL sends bad_certificate for a name that is not on the allow-list, among other things.
            return .handshakeFailed(reason: "the peer refused our certificate, e.g. our name is not on its allow-list (\(reasons))")
        default:
            return handshake ? .handshakeFailed(reason: reasons) : .tlsFailure(reason: reasons)
        }
    }

    // MARK: Channel

    func send(_ buffer: UnsafeRawBufferPointer) throws(TransportError) {
        try write(buffer)
        try flush()
    }

    /// Encrypts `buffer` into records that `SocketIO` gathers. One call for the whole buffer: OpenSSL cuts
    /// it into full 16 KiB records.
    private func write(_ buffer: UnsafeRawBufferPointer) throws(TransportError) {
        guard buffer.count > 0 else { return }
        var written = 0
        ERR_clear_error()
        let result = SSL_write_ex(ssl, buffer.baseAddress, buffer.count, &written)
        if result != 1 { throw failure(result, operation: "send", expected: nil, received: 0, handshake: false) }
    }

    /// Sends the records `SocketIO` gathered.
    private func flush() throws(TransportError) {
        if let code = io.flush() { throw TransportError(SystemError("send", errno: code)) }
    }

    /// Small pieces (a record header) are gathered with what follows them into full TLS records, so that
    /// a header does not cost a record and a syscall of its own; large pieces go to OpenSSL as they are.
    func send(_ buffers: [UnsafeRawBufferPointer]) throws(TransportError) {
        var staged = 0
        for buffer in buffers where buffer.count > 0 {
            var rest = buffer
            if staged > 0 {
                let n = min(rest.count, tlsRecordSize - staged)
                (staging.baseAddress! + staged).copyMemory(from: rest.baseAddress!, byteCount: n)
                staged += n
                rest = UnsafeRawBufferPointer(rebasing: rest[n...])
                if staged == tlsRecordSize {
                    try write(UnsafeRawBufferPointer(staging))
                    staged = 0
                }
            }
            let whole = rest.count - rest.count % tlsRecordSize
            if whole > 0 {
                try write(UnsafeRawBufferPointer(rebasing: rest[..<whole]))
                rest = UnsafeRawBufferPointer(rebasing: rest[whole...])
            }
            if rest.count > 0 {
                staging.baseAddress!.copyMemory(from: rest.baseAddress!, byteCount: rest.count)
                staged = rest.count
            }
        }
        if staged > 0 { try write(UnsafeRawBufferPointer(rebasing: staging[..<staged])) }
        try flush()
    }

    func receive(into buffer: UnsafeMutableRawBufferPointer) throws(TransportError) -> Int {
        guard buffer.count > 0 else { return 0 }
        var count = 0
        ERR_clear_error()
        let result = SSL_read_ex(ssl, buffer.baseAddress, buffer.count, &count)
        if result == 1 { return count }
        if SSL_get_error(ssl, result) == SSL_ERROR_ZERO_RETURN { return 0 }
        throw failure(result, operation: "receive", expected: nil, received: 0, handshake: false)
    }

    func receive(exactly buffer: UnsafeMutableRawBufferPointer) throws(TransportError) {
        var done = 0
        while done < buffer.count {
            var count = 0
            ERR_clear_error()
            let result = SSL_read_ex(ssl, buffer.baseAddress! + done, buffer.count - done, &count)
            if result != 1 { throw failure(result, operation: "receive", expected: buffer.count, received: done, handshake: false) }
            done += count
        }
    }

    func shutdown() throws(TransportError) {
        ERR_clear_error()
        let result = SSL_shutdown(ssl) // sends close_notify; 0 means "sent, the peer's not yet seen", which is fine
        if result < 0 { throw failure(result, operation: "shutdown", expected: nil, received: 0, handshake: false) }
        try flush()
        try transportCall("shutdown") { Glibc.shutdown(socket.rawValue, Int32(SHUT_WR)) }
    }

    func close() {
        _ = Glibc.shutdown(socket.rawValue, Int32(SHUT_RDWR))
    }
}
