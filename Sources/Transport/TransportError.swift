import Glibc
import LinuxSystem

/// Why a connection could not be made or could not go on. Each case says what happened in terms the
/// migration engine can act on (retry, give up, report a misconfigured peer) without parsing strings.
public enum TransportError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Nothing listens at the endpoint.
    case connectionRefused(endpoint: String)
    /// The peer reset the connection (or it broke) during `operation`.
    case connectionReset(operation: String)
    /// The peer ended the stream while `expectedBytes` were awaited and `receivedBytes` of them had come.
    /// `expectedBytes` is nil when no particular amount was awaited (a TLS peer vanished without close_notify).
    case connectionClosed(expectedBytes: Int?, receivedBytes: Int)
    /// `operation` did not finish within its time limit.
    case timedOut(operation: String)
    /// The TLS handshake failed; `reason` is OpenSSL's, or the alert the peer sent.
    case handshakeFailed(reason: String)
    /// The peer's certificate does not chain to our CA, or the peer says ours does not chain to its CA.
    case untrustedCertificate(reason: String)
    /// The peer's certificate is outside its validity period, or the peer says ours is.
    case expiredCertificate(reason: String)
    /// The peer's certificate is valid, but none of its names is on the allow-list.
    case peerNameNotAllowed(names: [String], allowed: [String])
    /// A TLS endpoint received bytes that are not TLS: the peer was configured for plaintext.
    case plaintextRefused
    /// TLS failed after the handshake (a bad record, an unexpected alert).
    case tlsFailure(reason: String)
    /// The host name of an endpoint did not resolve.
    case addressResolution(host: String, reason: String)
    /// The endpoint or the TLS configuration cannot be used (unreadable key, path too long, ...).
    case configuration(String)
    /// Any other failed system call.
    case system(SystemError)

    public var description: String {
        switch self {
        case .connectionRefused(let endpoint): "connection refused by \(endpoint)"
        case .connectionReset(let operation): "connection reset by peer during \(operation)"
        case .connectionClosed(let expected?, let received):
            "peer closed the connection after \(received) of \(expected) expected bytes"
        case .connectionClosed(nil, _): "peer closed the connection without ending the TLS session (truncated stream)"
        case .timedOut(let operation): "\(operation) timed out"
        case .handshakeFailed(let reason): "TLS handshake failed: \(reason)"
        case .untrustedCertificate(let reason): "untrusted certificate: \(reason)"
        case .expiredCertificate(let reason): "certificate not valid now: \(reason)"
        case .peerNameNotAllowed(let names, let allowed):
            "peer certificate names \(names) are not on the allow-list \(allowed)"
        case .plaintextRefused: "plaintext connection refused: this endpoint requires TLS"
        case .tlsFailure(let reason): "TLS failure: \(reason)"
        case .addressResolution(let host, let reason): "cannot resolve \(host): \(reason)"
        case .configuration(let message): "transport configuration: \(message)"
        case .system(let error): error.description
        }
    }

    /// Classifies a failed system call by its errno, so callers see a refused, reset or timed-out connection
    /// as such rather than as a bare errno.
    init(_ error: SystemError) {
        switch error.errno {
        case ECONNREFUSED: self = .connectionRefused(endpoint: error.operation)
        case ECONNRESET, EPIPE, ENOTCONN: self = .connectionReset(operation: error.operation)
        case EAGAIN, ETIMEDOUT: self = .timedOut(operation: error.operation)
        default: self = .system(error)
        }
    }
}

/// `systemCall` with its failure classified as a `TransportError`.
@inline(__always) @discardableResult
func transportCall<R: BinaryInteger>(_ operation: @autoclosure () -> String, _ call: () -> R) throws(TransportError) -> R {
    do {
        return try systemCall(operation(), call)
    } catch {
        throw TransportError(error as! SystemError) // systemCall throws nothing else
    }
}
