import Foundation

/// What the control socket accepts from one client (control-api.md §1.1). FlyingFox 0.27's decoder has no such
/// limits (it collects a request line or header line until a newline, however long, and waits for it forever),
/// so the daemon reads requests itself, under these.
public struct ControlLimits: Sendable, Equatable {
    /// The request line: method, target and version. Longer is 414.
    public var requestLineBytes = 8 << 10
    /// All header lines together, up to and including the empty line. Longer is 431.
    public var headerSectionBytes = 16 << 10
    /// A request body (`Content-Length`). The API's bodies are small JSON documents; more is 413.
    public var bodyBytes = 1 << 20
    /// A connection is closed when a whole request (head and body) has not arrived this long after the
    /// connection opened or the previous answer was sent, or an answer is not taken within it.
    public var idleTimeout: Duration = .seconds(10)
    /// Connections open at once; one more is answered 503 and closed.
    public var connections = 1024

    public init() {}
}

/// A request line and the headers the daemon acts on, parsed from the bytes received so far.
struct HTTPRequestHead: Equatable {
    var method: String
    /// The target without its query: the API has no query parameters.
    var path: String
    var contentLength: Int
    /// HTTP/1.1 keeps the connection unless `Connection: close`; HTTP/1.0 closes it unless `keep-alive`.
    var keepAlive: Bool

    enum Parse: Equatable {
        case incomplete
        /// The head, and how many bytes of the buffer it took (the body follows them).
        case complete(HTTPRequestHead, headBytes: Int)
    }

    /// Parses `buffer` when it holds a whole head; throws as soon as it cannot become a valid one, and never
    /// lets `buffer` grow past the limits before saying so.
    static func parse(_ buffer: [UInt8], limits: ControlLimits) throws(ControlError) -> Parse {
        var start = 0
        while start + 1 < buffer.count, buffer[start] == 0x0D, buffer[start + 1] == 0x0A { start += 2 } // RFC 9112 §2.2
        guard let lineEnd = buffer[start...].firstIndex(of: 0x0A) else {
            if buffer.count - start > limits.requestLineBytes { throw .uriTooLong(limits) }
            return .incomplete
        }
        if lineEnd - start > limits.requestLineBytes { throw .uriTooLong(limits) }
        var head = try requestLine(buffer[start..<lineEnd])

        var lines: [ArraySlice<UInt8>] = []
        var position = lineEnd + 1
        while true {
            guard let end = buffer[position...].firstIndex(of: 0x0A) else {
                if buffer.count - (lineEnd + 1) > limits.headerSectionBytes { throw .headersTooLarge(limits) }
                return .incomplete
            }
            if end + 1 - (lineEnd + 1) > limits.headerSectionBytes { throw .headersTooLarge(limits) }
            let line = trimmingCR(buffer[position..<end])
            position = end + 1
            if line.isEmpty { break }
            lines.append(line)
        }
        try apply(headers: lines, to: &head, limits: limits)
        return .complete(head, headBytes: position)
    }

    private static func requestLine(_ bytes: ArraySlice<UInt8>) throws(ControlError) -> HTTPRequestHead {
        let parts = trimmingCR(bytes).split(separator: 0x20, omittingEmptySubsequences: false)
        guard parts.count == 3, let method = String(bytes: parts[0], encoding: .ascii),
              let target = String(bytes: parts[1], encoding: .utf8), let version = String(bytes: parts[2], encoding: .ascii) else {
            throw .badHTTP("the request line is not 'METHOD /path HTTP/1.1'")
        }
        guard !method.isEmpty, method.utf8.allSatisfy(isTokenByte) else { throw .badHTTP("'\(method)' is not a method") }
        guard version == "HTTP/1.1" || version == "HTTP/1.0" else { throw .badHTTP("'\(version)' is not HTTP/1.1 or 1.0") }
        guard target.hasPrefix("/"), !target.utf8.contains(where: { $0 < 0x21 || $0 == 0x7F }) else {
            throw .badHTTP("the request target must be a path starting with '/'")
        }
        let path = String(target.prefix { $0 != "?" && $0 != "#" })
        return HTTPRequestHead(method: method, path: path, contentLength: 0, keepAlive: version == "HTTP/1.1")
    }

    private static func apply(headers lines: [ArraySlice<UInt8>], to head: inout HTTPRequestHead,
                              limits: ControlLimits) throws(ControlError) {
        var contentLength: Int?
        for line in lines {
            guard let colon = line.firstIndex(of: 0x3A), colon > line.startIndex,
                  line[line.startIndex..<colon].allSatisfy(isTokenByte),
                  let name = String(bytes: line[line.startIndex..<colon], encoding: .ascii),
                  let value = String(bytes: line[(colon + 1)...], encoding: .utf8) else {
                throw .badHTTP("a header line is not 'Name: value'")
            }
            let trimmed = value.trimmingCharacters(in: .whitespaces)
            switch name.lowercased() {
            case "content-length":
                // Digits only: "+5", " 5 5" or a second, different length are request smuggling, not a length.
                guard !trimmed.isEmpty, trimmed.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else {
                    throw .badHTTP("Content-Length '\(trimmed)' is not a number")
                }
                guard trimmed.count <= 12, let length = Int(trimmed), length <= limits.bodyBytes else { throw .bodyTooLarge(limits) }
                if let contentLength, contentLength != length { throw .badHTTP("two different Content-Length headers") }
                contentLength = length
            case "transfer-encoding":
                throw ControlError(411, "length_required", "Transfer-Encoding is not supported: send the body with a Content-Length")
            case "connection":
                let options = trimmed.lowercased().split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
                if options.contains("close") { head.keepAlive = false }
                if options.contains("keep-alive") { head.keepAlive = true }
            default:
                break
            }
        }
        head.contentLength = contentLength ?? 0
    }

    private static func trimmingCR(_ line: ArraySlice<UInt8>) -> ArraySlice<UInt8> {
        line.last == 0x0D ? line.dropLast() : line
    }

    /// RFC 9110 §5.6.2 tchar: what a method or a header name may be made of.
    private static func isTokenByte(_ byte: UInt8) -> Bool {
        switch byte {
        case 0x30...0x39, 0x41...0x5A, 0x61...0x7A: true
        case UInt8(ascii: "!"), UInt8(ascii: "#"), UInt8(ascii: "$"), UInt8(ascii: "%"), UInt8(ascii: "&"), UInt8(ascii: "'"),
             UInt8(ascii: "*"), UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "^"), UInt8(ascii: "_"),
             UInt8(ascii: "`"), UInt8(ascii: "|"), UInt8(ascii: "~"): true
        default: false
        }
    }
}

extension ControlError {
    static func badHTTP(_ message: String) -> ControlError { ControlError(400, "bad_http", message) }
    static func uriTooLong(_ limits: ControlLimits) -> ControlError {
        ControlError(414, "uri_too_long", "the request line is longer than \(limits.requestLineBytes) bytes")
    }
    static func headersTooLarge(_ limits: ControlLimits) -> ControlError {
        ControlError(431, "headers_too_large", "the header section is longer than \(limits.headerSectionBytes) bytes")
    }
    static func bodyTooLarge(_ limits: ControlLimits) -> ControlError {
        ControlError(413, "body_too_large", "the body is longer than \(limits.bodyBytes) bytes")
    }
}
