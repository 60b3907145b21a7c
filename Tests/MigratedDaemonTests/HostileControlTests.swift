import Dispatch
import Foundation
import Glibc
import MigratedAPI
import MigratedDaemon
import XCTest

/// Hostile input on the control socket (control-api.md §1.1): every malformed request gets a 4xx with the API's
/// error document, late and idle connections are closed, and the daemon answers others throughout.
final class HostileControlTests: XCTestCase {
    private struct Case {
        var name: String
        var request: [UInt8]
        var status: Int
        var error: String

        init(_ name: String, _ request: String, _ status: Int, _ error: String) {
            self.init(name, Array(request.utf8), status, error)
        }

        init(_ name: String, _ request: [UInt8], _ status: Int, _ error: String) {
            self.name = name
            self.request = request
            self.status = status
            self.error = error
        }
    }

    private static func post(_ path: String, _ body: String) -> String {
        "POST \(path) HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
    }

    private static let malformed: [Case] = [
        Case("garbage request line", "GARBAGE\r\n\r\n", 400, "bad_http"),
        Case("binary request line", [0x00, 0xFF, 0x10, 0x80, 0x20, 0x2F, 0x20, 0xC3, 0x28, 0x0D, 0x0A, 0x0D, 0x0A], 400, "bad_http"),
        Case("two words", "GET /vms\r\n\r\n", 400, "bad_http"),
        Case("unknown version", "GET /vms HTTP/9.9\r\n\r\n", 400, "bad_http"),
        Case("absolute-form target", "GET http://x/vms HTTP/1.1\r\n\r\n", 400, "bad_http"),
        Case("method with a separator", "GE(T /vms HTTP/1.1\r\n\r\n", 400, "bad_http"),
        Case("unknown method on a route", "BREW /vms HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
        Case("unknown route", "GET /teapot HTTP/1.1\r\n\r\n", 404, "not_found"),
        Case("header without colon", "GET /vms HTTP/1.1\r\nNoColonHere\r\n\r\n", 400, "bad_http"),
        Case("space before colon", "GET /vms HTTP/1.1\r\nHost : x\r\n\r\n", 400, "bad_http"),
        Case("request line over 8 KiB", "GET /" + String(repeating: "a", count: 9000) + " HTTP/1.1\r\n\r\n", 414, "uri_too_long"),
        Case("endless request line", "GET /" + String(repeating: "a", count: 40000), 414, "uri_too_long"),
        Case("request line just over 8 KiB, and a wait", "GET /" + String(repeating: "a", count: 8200), 414, "uri_too_long"),
        Case("header section over 16 KiB", "GET /vms HTTP/1.1\r\n" + (0..<20).map { "X-Pad-\($0): \(String(repeating: "p", count: 1000))\r\n" }.joined() + "\r\n",
             431, "headers_too_large"),
        Case("endless header line", "GET /vms HTTP/1.1\r\nX-Pad: " + String(repeating: "p", count: 40000), 431, "headers_too_large"),
        Case("body over 1 MiB by Content-Length", "POST /vms HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n{", 413, "body_too_large"),
        Case("absurd Content-Length", "POST /vms HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n", 413, "body_too_large"),
        Case("negative Content-Length", "POST /vms HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400, "bad_http"),
        Case("Content-Length not a number", "POST /vms HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n", 400, "bad_http"),
        Case("two Content-Lengths", "POST /vms HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400, "bad_http"),
        Case("chunked body", "POST /vms HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411, "length_required"),
        Case("invalid JSON", post("/vms", "{\"image\": "), 400, "bad_json"),
        Case("binary body", "POST /vms HTTP/1.1\r\nContent-Length: 4\r\n\r\n\u{0}\u{1}\u{2}\u{3}", 400, "bad_json"),
        Case("wrong JSON types", post("/vms", #"{"image": 5, "memory_mib": "lots"}"#), 400, "bad_request"),
        Case("JSON not an object", post("/vms", "[[[[[[[[[[]]]]]]]]]]"), 400, "bad_request"),
        Case("unknown fields", post("/vms", #"{"image": "/x", "memory_mib": 128, "colour": "blue"}"#), 400, "bad_request"),
        Case("null for a required field", post("/vms", #"{"image": null, "memory_mib": 128}"#), 400, "bad_request"),
        Case("wrong types for a migration", post("/vms/x/migrate", #"{"peer": ["a"], "channels": "two"}"#), 400, "bad_request"),
    ]

    func testMalformedRequestsAre4xxAndTheDaemonAnswersOn() async throws {
        try await withDaemon { daemon in
            let path = daemon.socketPath
            for item in Self.malformed {
                let response = try await offPool { () -> RawControlConnection.Response? in
                    let connection = try RawControlConnection(path)
                    connection.send(item.request)
                    return connection.response()
                }
                guard let response else { XCTFail("\(item.name): no answer"); continue }
                XCTAssertEqual(response.status, item.status, item.name)
                let error = try? APIJSON.decode(APIError.self, from: response.body)
                XCTAssertEqual(error?.error, item.error, "\(item.name): \(String(decoding: response.body, as: UTF8.self))")
                XCTAssertFalse(error?.message.isEmpty ?? true, item.name)
                let vms = try await daemon.client.listVMs()
                XCTAssertEqual(vms, [], "after \(item.name)")
            }
            let metrics = try await daemon.client.metrics()
            XCTAssertTrue(metrics.contains(#"migrated_http_requests_total{code="431"} 2"#), "refusals are counted:\n\(metrics)")
        }
    }

    /// The bytes past a body are the next request: here garbage, answered as such, and the connection ends.
    func testBodyLongerThanItsContentLength() async throws {
        try await withDaemon { daemon in
            let path = daemon.socketPath
            let (first, second, closed) = try await offPool { () -> (Int?, Int?, Bool) in
                let connection = try RawControlConnection(path)
                connection.send("POST /vms HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}\"image\": \"/x\"}\r\n\r\n")
                return (connection.response()?.status, connection.response()?.status, connection.waitForClose())
            }
            XCTAssertEqual(first, 400, "the 2-byte body {} lacks image and memory_mib")
            XCTAssertEqual(second, 400, "the rest is not a request line")
            XCTAssertTrue(closed)
            let vms = try await daemon.client.listVMs()
            XCTAssertEqual(vms, [])
        }
    }

    /// Keep-alive and pipelining still work: three requests in one write, three answers in order.
    func testPipelinedRequestsOnOneConnection() async throws {
        try await withDaemon { daemon in
            let path = daemon.socketPath
            let statuses = try await offPool { () -> [Int?] in
                let connection = try RawControlConnection(path)
                connection.send("GET /vms HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
                return [connection.response()?.status, connection.response()?.status, connection.response()?.status,
                        connection.waitForClose() ? 0 : nil]
            }
            XCTAssertEqual(statuses, [200, 404, 200, 0])
        }
    }

    /// With a 0.5 s timeout: silence, half a head, half a body, a byte every 100 ms, and a kept-alive
    /// connection after its answer are all closed, after the timeout and well before 3 s.
    func testIdleAndSlowConnectionsAreClosedAfterTheTimeout() async throws {
        var limits = ControlLimits()
        limits.idleTimeout = .milliseconds(500)
        try await withDaemon(controlLimits: limits) { daemon in
            let path = daemon.socketPath
            let held: [(String, String)] = [
                ("silent", ""),
                ("half a head", "GET /vms HTTP/1.1\r\nHost: x\r\n"),
                ("half a body", "POST /vms HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"image\": "),
            ]
            for (name, bytes) in held {
                let (closed, seconds) = try await offPool { () -> (Bool, Double) in
                    let connection = try RawControlConnection(path)
                    let start = Date()
                    connection.send(bytes)
                    return (connection.waitForClose(), Date().timeIntervalSince(start))
                }
                XCTAssertTrue(closed, name)
                XCTAssertGreaterThan(seconds, 0.4, name)
                XCTAssertLessThan(seconds, 3, name)
            }
            let (slowClosed, slowSeconds) = try await offPool { () -> (Bool, Double) in
                let connection = try RawControlConnection(path)
                let start = Date()
                let dripping = DispatchWorkItem {
                    for byte in "GET /vms HTTP/1.1\r\nX-Slow: ".utf8 + Array(repeating: UInt8(ascii: "s"), count: 100) {
                        connection.send([byte])
                        usleep(100_000)
                    }
                }
                DispatchQueue.global().async(execute: dripping)
                defer { dripping.cancel() }
                return (connection.waitForClose(), Date().timeIntervalSince(start))
            }
            XCTAssertTrue(slowClosed, "a byte every 100 ms does not keep a request alive")
            XCTAssertLessThan(slowSeconds, 3)
            let (answered, idleClosed) = try await offPool { () -> (Int?, Bool) in
                let connection = try RawControlConnection(path)
                connection.send("GET /vms HTTP/1.1\r\n\r\n")
                return (connection.response()?.status, connection.waitForClose())
            }
            XCTAssertEqual(answered, 200)
            XCTAssertTrue(idleClosed, "an idle kept-alive connection is closed too")
            let vms = try await daemon.client.listVMs()
            XCTAssertEqual(vms, [])
        }
    }

    /// 500 connections held open at once, half of them with half a request, do not stop the daemon answering.
    func testFiveHundredConnectionsAtOnce() async throws {
        try await withDaemon { daemon in
            // Both ends of every connection are in this process; the daemon raised the soft limit for both.
            var limit = rlimit()
            getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
            XCTAssertGreaterThanOrEqual(limit.rlim_cur, min(limit.rlim_max, 8192), "the daemon raises its descriptor limit")
            let path = daemon.socketPath
            let held = try await offPool { () -> [RawControlConnection] in
                try (0..<500).map { index in
                    let connection = try RawControlConnection(path)
                    if index.isMultiple(of: 2) { connection.send("POST /vms HTTP/1.1\r\nContent-Length: 50\r\n\r\n{") }
                    return connection
                }
            }
            var descriptors = 0
            for _ in 0..<100 where descriptors < 1000 { // until the daemon has accepted them all
                try await Task.sleep(nanoseconds: 20_000_000)
                descriptors = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? 0
            }
            XCTAssertGreaterThanOrEqual(descriptors, 1000, "both ends of the 500 connections are open")
            let start = Date()
            let vms = try await daemon.client.listVMs()
            XCTAssertEqual(vms, [])
            XCTAssertLessThan(Date().timeIntervalSince(start), 2, "GET /vms waited behind the held connections")
            let (status, _) = try await daemon.client.send(.GET, "/metrics")
            XCTAssertEqual(status, 200)
            withExtendedLifetime(held) {}
        }
    }

    /// One connection more than the limit is answered 503 at once; once one closes, there is room again.
    func testConnectionLimit() async throws {
        var limits = ControlLimits()
        limits.connections = 4
        try await withDaemon(controlLimits: limits) { daemon in
            let path = daemon.socketPath
            var held = try await offPool { try (0..<4).map { _ in try RawControlConnection(path) } }
            let refused = try await offPool { () -> RawControlConnection.Response? in
                usleep(100_000) // the four are accepted and counted
                let connection = try RawControlConnection(path)
                connection.send("GET /vms HTTP/1.1\r\n\r\n")
                return connection.response()
            }
            XCTAssertEqual(refused?.status, 503)
            XCTAssertEqual(try refused.map { try APIJSON.decode(APIError.self, from: $0.body).error }, "too_many_connections")
            held.removeFirst()
            var answered: Int?
            for _ in 0..<40 where answered != 200 {
                answered = try await offPool { () -> Int? in
                    usleep(50_000)
                    let connection = try RawControlConnection(path)
                    connection.send("GET /vms HTTP/1.1\r\nConnection: close\r\n\r\n")
                    return connection.response()?.status
                }
            }
            XCTAssertEqual(answered, 200)
            withExtendedLifetime(held) {}
        }
    }

    /// 2000 malformed requests, big ones among them, on four connections at a time: the daemon's memory (this
    /// process's, as it runs here) ends within 64 MiB of where it was after the first 200. Each connection may
    /// hold a 1 MiB body and 24 KiB of head at most, so growth past that would be a leak.
    func testMemoryStaysBoundedUnderMalformedRequests() async throws {
        try await withDaemon { daemon in
            let path = daemon.socketPath
            let requests = Self.malformed.map(\.request) + [Array(Self.post("/vms", "{" + String(repeating: " ", count: 900_000)).utf8)]
            let run: @Sendable (Int) -> Int = { count in
                let answered = ManagedAtomicCounter()
                DispatchQueue.concurrentPerform(iterations: 4) { lane in
                    for index in stride(from: lane, to: count, by: 4) {
                        guard let connection = try? RawControlConnection(path) else { continue }
                        connection.send(requests[index % requests.count])
                        if connection.response() != nil { answered.increment() }
                    }
                }
                return answered.value
            }
            let warm = try await offPool { run(200) }
            XCTAssertEqual(warm, 200)
            let before = residentBytes()
            let answered = try await offPool { run(2000) }
            let after = residentBytes()
            XCTAssertEqual(answered, 2000, "every malformed request is answered")
            XCTAssertLessThan(after - before, 64 << 20, "RSS grew from \(before >> 20) MiB to \(after >> 20) MiB")
            let vms = try await daemon.client.listVMs()
            XCTAssertEqual(vms, [])
        }
    }
}

/// Runs blocking socket work on a Dispatch thread, so the daemon's tasks keep Swift concurrency's few threads.
private func offPool<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        DispatchQueue.global().async { continuation.resume(with: Result { try work() }) }
    }
}

private final class ManagedAtomicCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    var value: Int { lock.withLock { count } }
    func increment() { lock.withLock { count += 1 } }
}
