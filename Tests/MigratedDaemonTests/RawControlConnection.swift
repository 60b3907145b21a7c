import Foundation
import Glibc
import XCTest

/// A control-socket connection that sends whatever bytes a test likes, for requests no HTTP client would send.
/// One thread reads it at a time; another may send meanwhile (a slow writer).
final class RawControlConnection: @unchecked Sendable {
    let fd: Int32

    struct Response {
        var status: Int
        var headers: [String: String]
        var body: Data
    }

    /// Connects to `path`; a receive waits `timeout` at most.
    init(_ path: String, timeout: TimeInterval = 5) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        var wait = timeval(tv_sec: Int(timeout), tv_usec: Int((timeout - timeout.rounded(.down)) * 1_000_000))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &wait, socklen_t(MemoryLayout<timeval>.size))
        let connected = withUnixAddress(path) { connect(fd, $0, $1) }
        guard connected == 0 else {
            let code = errno
            close(fd)
            throw POSIXError(POSIXErrorCode(rawValue: code) ?? .EIO)
        }
    }

    deinit { close(fd) }

    /// Sends all of `bytes`; a daemon that closed the connection already is not an error here.
    func send(_ bytes: some Collection<UInt8>) {
        let array = Array(bytes)
        var done = 0
        while done < array.count {
            let sent = array.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, array.count - done, Int32(MSG_NOSIGNAL)) }
            guard sent > 0 else { return }
            done += sent
        }
    }

    func send(_ text: String) { send(Array(text.utf8)) }

    private var pending: [UInt8] = []

    /// Reads one response (head, then `Content-Length` bytes of body); nil when the connection ended first.
    func response() -> Response? {
        while true {
            if let end = pending.firstRange(of: Array("\r\n\r\n".utf8)) {
                let head = String(decoding: pending[..<end.lowerBound], as: UTF8.self).components(separatedBy: "\r\n")
                let status = head.first.flatMap { Int($0.split(separator: " ").dropFirst().first ?? "") } ?? 0
                var headers: [String: String] = [:]
                for line in head.dropFirst() {
                    guard let colon = line.firstIndex(of: ":") else { continue }
                    headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
                }
                let length = Int(headers["content-length"] ?? "0") ?? 0
                while pending.count < end.upperBound + length { guard receive() else { return nil } }
                let body = Data(pending[end.upperBound..<end.upperBound + length])
                pending.removeFirst(end.upperBound + length)
                return Response(status: status, headers: headers, body: body)
            }
            guard receive() else { return nil }
        }
    }

    /// True once the daemon has closed the connection (reads end), false if it is still open after the
    /// receive timeout.
    func waitForClose() -> Bool {
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = recv(fd, &chunk, chunk.count, 0)
            if count == 0 || (count < 0 && errno == ECONNRESET) { return true }
            if count < 0 { return false }
        }
    }

    private func receive() -> Bool {
        var chunk = [UInt8](repeating: 0, count: 16 << 10)
        let count = recv(fd, &chunk, chunk.count, 0)
        guard count > 0 else { return false }
        pending.append(contentsOf: chunk[..<count])
        return true
    }
}

/// Runs `body` with `path` as a sockaddr_un.
func withUnixAddress<T>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        for (index, byte) in path.utf8.prefix(raw.count - 1).enumerated() { raw[index] = byte }
    }
    return withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
}

/// The resident set of this process, in bytes.
func residentBytes() -> Int {
    guard let statm = try? String(contentsOfFile: "/proc/self/statm", encoding: .ascii),
          let pages = statm.split(separator: " ").dropFirst().first.flatMap({ Int($0) }) else { return 0 }
    return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
}
