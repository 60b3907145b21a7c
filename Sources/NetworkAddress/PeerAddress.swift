// The address syntax shared by the daemon's API, its configuration, and the C library: a module of its own, with
// no dependencies, so that the control API's client and the transport both read addresses the same way.

/// A migration peer or listen address, as written in requests and in the daemon's configuration.
public enum PeerAddress: Sendable, Equatable, CustomStringConvertible {
    case tcp(host: String, port: UInt16)
    case unix(path: String)

    /// Parses `host:port`, `[v6-address]:port` or `unix:/absolute/path`; nil for anything else.
    public init?(_ text: String) {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard path.hasPrefix("/"), path.utf8.count < 108 else { return nil } // sun_path holds 107 bytes and a NUL
            self = .unix(path: path)
            return
        }
        let host: Substring, port: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else { return nil }
            host = text[text.index(after: text.startIndex) ..< close]
            port = text[text.index(close, offsetBy: 2)...]
        } else {
            let parts = text.split(separator: ":", omittingEmptySubsequences: false)
            guard parts.count == 2 else { return nil }
            (host, port) = (parts[0], parts[1])
        }
        guard !host.isEmpty, !host.contains(where: { $0 == " " || $0 == "/" }),
              let number = UInt16(port) else { return nil }
        self = .tcp(host: String(host), port: number)
    }

    public var description: String {
        switch self {
        case .tcp(let host, let port): host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .unix(let path): "unix:\(path)"
        }
    }
}
