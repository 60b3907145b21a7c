import Foundation
import Glibc
import TestSupport
import Threads
import Transport
import XCTest

/// Runs `body` on its own thread, as the engine's receive side would, and hands back its outcome.
///
/// Sendable because `outcome` is written by the thread before it signals `done` and read only after `done`.
final class Background<T>: @unchecked Sendable {
    private var outcome: Result<T, any Error>?
    private let done = DispatchSemaphore(value: 0)

    init(_ body: sending @escaping () throws -> T) {
        startThread(named: "test-background") { [self] in
            do { outcome = .success(try body()) } catch { outcome = .failure(error) }
            done.signal()
        }
    }

    /// The outcome, or a test failure if the thread has not finished within 10 s: no test may hang.
    func result(file: StaticString = #filePath, line: UInt = #line) -> Result<T, any Error> {
        guard done.wait(timeout: .now() + 10) == .success, let outcome else {
            XCTFail("background thread did not finish", file: file, line: line)
            return .failure(TransportError.timedOut(operation: "test thread"))
        }
        return outcome
    }
}

extension Result {
    /// The transport error this outcome failed with, if any.
    var error: TransportError? { if case .failure(let error) = self { error as? TransportError } else { nil } }
}

func randomBytes(_ count: Int) -> [UInt8] {
    var generator = SystemRandomNumberGenerator()
    var bytes = [UInt8](repeating: 0, count: count)
    bytes.withUnsafeMutableBytes { raw in
        for index in stride(from: 0, to: raw.count - 7, by: 8) { raw.storeBytes(of: generator.next() as UInt64, toByteOffset: index, as: UInt64.self) }
    }
    return bytes
}

final class TransportTests: XCTestCase {
    let loopback = Endpoint.tcp(host: "127.0.0.1", port: 0)

    var quick: ChannelOptions {
        var options = ChannelOptions()
        options.connectTimeout = .seconds(2)
        options.handshakeTimeout = .seconds(2)
        options.ioTimeout = .seconds(5)
        return options
    }

    /// Sends a header and a payload with the vectored send, then the payload alone, and checks that the
    /// receiver got every byte in order; then the sender ends the stream and the receiver sees the end.
    func roundTrip(listener: Listener, client: Security, payloadSize: Int) throws -> (server: any Channel, client: any Channel) {
        let payload = randomBytes(payloadSize)
        let header = randomBytes(24)
        let receiver = Background { () throws -> (any Channel, [UInt8]) in
            let channel = try listener.accept()
            var received = [UInt8](repeating: 0, count: header.count + 2 * payload.count)
            try received.withUnsafeMutableBytes { buffer in try channel.receive(exactly: buffer) }
            var end = [UInt8](repeating: 0, count: 1)
            let after = try end.withUnsafeMutableBytes { buffer in try channel.receive(into: buffer) }
            XCTAssertEqual(after, 0, "the stream ends after the shutdown")
            return (channel, received)
        }
        let channel = try connect(to: listener.endpoint, security: client, options: quick)
        try header.withUnsafeBytes { h in
            try payload.withUnsafeBytes { p in
                try channel.send([h, p])
                try channel.send(p)
            }
        }
        try channel.shutdown()
        let (serverChannel, received) = try receiver.result().get()
        XCTAssert(received == header + payload + payload, "the receiver got other bytes than were sent")
        return (serverChannel, channel)
    }

    func testMutualTLSRoundTripOfSeveralMiB() throws {
        let listener = try Listener(endpoint: loopback, security: TestCertificates.server, options: quick)
        let (server, client) = try roundTrip(listener: listener, client: TestCertificates.client(), payloadSize: 3 << 20)
        XCTAssertEqual(server.peerName, "client.migrated.test")
        XCTAssertEqual(client.peerName, "server.migrated.test")
        XCTAssert(server.peerAddress.hasPrefix("127.0.0.1:"))
    }

    /// A certificate without subjectAltName is matched by its CN.
    func testCertificateWithoutSubjectAltNameIsMatchedByCommonName() throws {
        let listener = try Listener(endpoint: loopback, security: TestCertificates.server, options: quick)
        let (server, _) = try roundTrip(listener: listener, client: TestCertificates.client("cn-only"), payloadSize: 4096)
        XCTAssertEqual(server.peerName, "cnonly.migrated.test")
    }

    func testPlainTCPRoundTrip() throws {
        let listener = try Listener(endpoint: loopback, security: .plaintext, options: quick)
        let (server, client) = try roundTrip(listener: listener, client: .plaintext, payloadSize: 2 << 20)
        XCTAssertNil(server.peerName)
        XCTAssertNil(client.peerName)
    }

    func testIPv6RoundTrip() throws {
        let listener: Listener
        do { listener = try Listener(endpoint: .tcp(host: "::1", port: 0), security: .plaintext, options: quick) }
        catch { throw XCTSkip("no IPv6 loopback here: \(error)") }
        _ = try roundTrip(listener: listener, client: .plaintext, payloadSize: 64 << 10)
    }

    func testUnixSocketRoundTrip() throws {
        let path = NSTemporaryDirectory() + "transport-\(getpid()).sock"
        do {
            let listener = try Listener(endpoint: .unix(path: path), security: .plaintext, options: quick)
            _ = try roundTrip(listener: listener, client: .plaintext, payloadSize: 2 << 20)
            XCTAssert(FileManager.default.fileExists(atPath: path))
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: path), "the listener removes its socket file")
    }

    func testTLSOverUnixSocket() throws {
        let path = NSTemporaryDirectory() + "transport-tls-\(getpid()).sock"
        let listener = try Listener(endpoint: .unix(path: path), security: TestCertificates.server, options: quick)
        let (server, _) = try roundTrip(listener: listener, client: TestCertificates.client(), payloadSize: 1 << 20)
        XCTAssertEqual(server.peerName, "client.migrated.test")
    }

    /// Vectored sends of many small and odd-sized pieces arrive intact over TLS, where they are regrouped
    /// into records, and over plain TCP, where they go out with sendmsg.
    func testVectoredSendOfManyPieces() throws {
        let sizes = (0 ..< 700).map { [24, 4096, 1, 0, 16384, 16383, 70000][$0 % 7] }
        let source = randomBytes(80_000)
        let pieces = sizes.enumerated().map { index, size in Array(source[index % 7 ..< index % 7 + size]) }
        let total = sizes.reduce(0, +)
        for (server, client) in [(TestCertificates.server, TestCertificates.client()), (Security.plaintext, Security.plaintext)] {
            let listener = try Listener(endpoint: loopback, security: server, options: quick)
            let receiver = Background { () throws -> [UInt8] in
                let channel = try listener.accept()
                var received = [UInt8](repeating: 0, count: total)
                try received.withUnsafeMutableBytes { buffer in try channel.receive(exactly: buffer) }
                return received
            }
            let channel = try connect(to: listener.endpoint, security: client, options: quick)
            let pointers = pieces.map { piece in
                let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: piece.count, alignment: 8)
                copy.copyBytes(from: piece)
                return UnsafeRawBufferPointer(copy)
            }
            defer { pointers.forEach { $0.deallocate() } }
            try channel.send(pointers)
            XCTAssert(try receiver.result().get() == pieces.flatMap { $0 })
        }
    }

    // MARK: refusals

    /// Connects `client` to a TLS listener and returns what each side saw.
    func refusal(server: Security = TestCertificates.server, client: Security) throws -> (server: TransportError?, client: TransportError?) {
        let listener = try Listener(endpoint: loopback, security: server, options: quick)
        let accepting = Background { _ = try listener.accept() }
        let started = ContinuousClock.now
        var clientError: TransportError?
        do { _ = try connect(to: listener.endpoint, security: client, options: quick) } catch { clientError = error }
        let serverError = accepting.result().error
        XCTAssertLessThan(ContinuousClock.now - started, .seconds(2), "a refusal is prompt, not a timeout")
        return (serverError, clientError)
    }

    func testClientFromUntrustedCAIsRefused() throws {
        let (server, client) = try refusal(client: TestCertificates.tls("rogue", allowed: TestCertificates.serverNames))
        guard case .untrustedCertificate(let reason) = server else { return XCTFail("server saw \(String(describing: server))") }
        XCTAssert(reason.contains("unable to get local issuer certificate"), reason)
        guard case .untrustedCertificate(let peerReason) = client else { return XCTFail("client saw \(String(describing: client))") }
        XCTAssert(peerReason.contains("the peer does not trust our certificate"), peerReason)
    }

    func testServerFromUntrustedCAIsRefused() throws {
        let server = TestCertificates.tls("rogue", ca: "rogue-ca", allowed: TestCertificates.clientNames)
        let (_, client) = try refusal(server: server, client: TestCertificates.client())
        guard case .untrustedCertificate = client else { return XCTFail("client saw \(String(describing: client))") }
    }

    func testExpiredClientCertificateIsRefused() throws {
        let (server, client) = try refusal(client: TestCertificates.client("expired"))
        guard case .expiredCertificate(let reason) = server else { return XCTFail("server saw \(String(describing: server))") }
        XCTAssert(reason.contains("certificate has expired"), reason)
        guard case .expiredCertificate = client else { return XCTFail("client saw \(String(describing: client))") }
    }

    func testClientNameNotOnAllowListIsRefused() throws {
        let (server, client) = try refusal(client: TestCertificates.client("stranger"))
        XCTAssertEqual(server, .peerNameNotAllowed(names: ["stranger.migrated.test", "other.migrated.test"], allowed: TestCertificates.clientNames))
        guard case .handshakeFailed(let reason) = client else { return XCTFail("client saw \(String(describing: client))") }
        XCTAssert(reason.contains("the peer refused our certificate"), reason)
    }

    func testServerNameNotOnClientsAllowListIsRefused() throws {
        let client = TestCertificates.tls("client", allowed: ["elsewhere.migrated.test"])
        let (_, clientError) = try refusal(client: client)
        XCTAssertEqual(clientError, .peerNameNotAllowed(names: ["server.migrated.test", "localhost"], allowed: ["elsewhere.migrated.test"]))
    }

    func testClientWithoutCertificateIsRefused() throws {
        let listener = try Listener(endpoint: loopback, security: TestCertificates.server, options: quick)
        let accepting = Background { _ = try listener.accept() }
        guard case .tcp(_, let port) = listener.endpoint else { return XCTFail() }
        // openssl s_client, given no -cert, offers no certificate: a TLS 1.3 client we did not write.
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        process.arguments = ["s_client", "-connect", "127.0.0.1:\(port)", "-tls1_3", "-CAfile", TestCertificates.directory + "/ca.pem"]
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        let error = accepting.result().error
        process.waitUntilExit()
        guard case .handshakeFailed(let reason) = error else { return XCTFail("server saw \(String(describing: error))") }
        XCTAssert(reason.contains("peer did not return a certificate"), reason)
    }

    /// A plaintext connect succeeds (there is no handshake); the refusal shows at the first exchange.
    func testPlaintextClientIsRefusedByTLSServer() throws {
        let listener = try Listener(endpoint: loopback, security: TestCertificates.server, options: quick)
        let accepting = Background { _ = try listener.accept() }
        let channel = try connect(to: listener.endpoint, security: .plaintext, options: quick)
        let request = Array("GET / HTTP/1.0\r\n\r\n".utf8)
        try request.withUnsafeBytes { buffer in try channel.send(buffer) }
        XCTAssertEqual(accepting.result().error, .plaintextRefused)
        var reply = [UInt8](repeating: 0, count: 16)
        do {
            try reply.withUnsafeMutableBytes { buffer in try channel.receive(exactly: buffer) }
            XCTFail("the refused client received a reply")
        } catch {
            switch error as? TransportError {
            case .connectionClosed(16, 0)?, .connectionReset?: break
            default: XCTFail("client saw \(error)")
            }
        }
    }

    func testTLSClientAgainstPlaintextServerFailsTheHandshake() throws {
        let listener = try Listener(endpoint: loopback, security: .plaintext, options: quick)
        let server = Background {
            let channel = try listener.accept()
            let reply = Array("HTTP/1.0 400 Bad Request\r\n\r\n".utf8)
            try reply.withUnsafeBytes { buffer in try channel.send(buffer) }
            try channel.shutdown()
        }
        XCTAssertThrowsError(try connect(to: listener.endpoint, security: TestCertificates.client(), options: quick)) { error in
            guard case .handshakeFailed = error as? TransportError else { return XCTFail("client saw \(error)") }
        }
        _ = server.result()
    }

    // MARK: broken connections and time limits

    func testPeerClosingMidTransferSaysHowManyBytesWereExpected() throws {
        for (server, client) in [(TestCertificates.server, TestCertificates.client()), (Security.plaintext, Security.plaintext)] {
            let listener = try Listener(endpoint: loopback, security: server, options: quick)
            let receiver = Background {
                let channel = try listener.accept()
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 8)
                defer { buffer.deallocate() }
                try channel.receive(exactly: buffer)
            }
            do {
                let channel = try connect(to: listener.endpoint, security: client, options: quick)
                let part = randomBytes(1000)
                try part.withUnsafeBytes { buffer in try channel.send(buffer) }
                channel.close() // abrupt: no close_notify
            }
            XCTAssertEqual(receiver.result().error, .connectionClosed(expectedBytes: 1 << 20, receivedBytes: 1000))
        }
    }

    func testCleanTLSEndMidTransferAlsoCountsBytes() throws {
        let listener = try Listener(endpoint: loopback, security: TestCertificates.server, options: quick)
        let receiver = Background {
            let channel = try listener.accept()
            var buffer = [UInt8](repeating: 0, count: 5000)
            try buffer.withUnsafeMutableBytes { buffer in try channel.receive(exactly: buffer) }
        }
        let channel = try connect(to: listener.endpoint, security: TestCertificates.client(), options: quick)
        try randomBytes(1000).withUnsafeBytes { buffer in try channel.send(buffer) }
        try channel.shutdown()
        XCTAssertEqual(receiver.result().error, .connectionClosed(expectedBytes: 5000, receivedBytes: 1000))
    }

    func testConnectionRefused() throws {
        let port: UInt16
        do { // a port that was just free
            let listener = try Listener(endpoint: loopback, security: .plaintext)
            guard case .tcp(_, let p) = listener.endpoint else { return XCTFail() }
            port = p
            listener.close()
        }
        XCTAssertThrowsError(try connect(to: .tcp(host: "127.0.0.1", port: port), security: .plaintext, options: quick)) { error in
            XCTAssertEqual(error as? TransportError, .connectionRefused(endpoint: "127.0.0.1:\(port)"))
        }
    }

    func testReceiveTimesOut() throws {
        var options = quick
        options.ioTimeout = .milliseconds(200)
        for (server, client) in [(TestCertificates.server, TestCertificates.client()), (Security.plaintext, Security.plaintext)] {
            let listener = try Listener(endpoint: loopback, security: server, options: options)
            let accepting = Background { try listener.accept() }
            let channel = try connect(to: listener.endpoint, security: client, options: options)
            let idle = try accepting.result().get() // holds the connection open, sending nothing
            var byte: UInt8 = 0
            let started = ContinuousClock.now
            XCTAssertThrowsError(try withUnsafeMutableBytes(of: &byte) { buffer in try channel.receive(exactly: buffer) }) { error in
                XCTAssertEqual(error as? TransportError, .timedOut(operation: "receive"))
            }
            XCTAssertLessThan(ContinuousClock.now - started, .seconds(2))
            idle.close()
        }
    }

    /// A receiver that stops reading makes the sender's send time out once the socket buffers are full.
    func testSendTimesOutWhenThePeerStopsReading() throws {
        var options = quick
        options.ioTimeout = .milliseconds(200)
        options.sendBufferSize = 256 << 10
        options.receiveBufferSize = 256 << 10
        let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 4 << 20, alignment: 4096)
        defer { chunk.deallocate() }
        chunk.initializeMemory(as: UInt8.self, repeating: 7)
        for (server, client) in [(TestCertificates.server, TestCertificates.client()), (Security.plaintext, Security.plaintext)] {
            let listener = try Listener(endpoint: loopback, security: server, options: options)
            let accepting = Background { try listener.accept() }
            let channel = try connect(to: listener.endpoint, security: client, options: options)
            let stalled = try accepting.result().get() // never reads
            let started = ContinuousClock.now
            XCTAssertThrowsError(try (0 ..< 16).forEach { _ in try channel.send(UnsafeRawBufferPointer(chunk)) }) { error in
                XCTAssertEqual(error as? TransportError, .timedOut(operation: "send"))
            }
            XCTAssertLessThan(ContinuousClock.now - started, .seconds(3))
            stalled.close()
        }
    }

    /// Cancelling a migration closes its channels from another thread; a receiver blocked on one must wake.
    func testCloseWakesABlockedReceiver() throws {
        for (server, client) in [(TestCertificates.server, TestCertificates.client()), (Security.plaintext, Security.plaintext)] {
            let listener = try Listener(endpoint: loopback, security: server, options: quick)
            let accepting = Background { try listener.accept() }
            let channel = try connect(to: listener.endpoint, security: client, options: quick)
            let peer = try accepting.result().get() // stays open and silent
            let receiver = Background {
                var buffer = [UInt8](repeating: 0, count: 100)
                try buffer.withUnsafeMutableBytes { buffer in try channel.receive(exactly: buffer) }
            }
            Thread.sleep(forTimeInterval: 0.1)
            channel.close()
            XCTAssertEqual(receiver.result().error, .connectionClosed(expectedBytes: 100, receivedBytes: 0))
            peer.close()
        }
    }

    func testSilentClientTimesOutTheHandshake() throws {
        var options = quick
        options.handshakeTimeout = .milliseconds(300)
        let listener = try Listener(endpoint: loopback, security: TestCertificates.server, options: options)
        let accepting = Background { _ = try listener.accept() }
        let silent = try connect(to: listener.endpoint, security: .plaintext, options: quick)
        XCTAssertEqual(accepting.result().error, .timedOut(operation: "TLS handshake"))
        silent.close()
    }

    func testConfigurationErrorsAreReportedBeforeListening() {
        let missingKey = TestCertificates.tls("server", allowed: ["x"])
        guard case .tls(var configuration) = missingKey else { return XCTFail() }
        configuration.keyFile = "/nonexistent/key.pem"
        XCTAssertThrowsError(try Listener(endpoint: loopback, security: .tls(configuration))) { error in
            guard case .configuration(let message) = error as? TransportError else { return XCTFail("\(error)") }
            XCTAssert(message.contains("/nonexistent/key.pem"), message)
        }
        configuration = TLSConfiguration(caFile: configuration.caFile, certificateFile: configuration.certificateFile,
                                         keyFile: TestCertificates.directory + "/server.key", allowedPeerNames: [])
        XCTAssertThrowsError(try Listener(endpoint: loopback, security: .tls(configuration)))
    }

    func testKernelTLSProbeAnswers() {
        // Either answer is fine; the probe must give one without hanging or crashing.
        if let refusal = KernelTLS.probe() { print("kTLS not available: \(refusal)") } else { print("kTLS available") }
    }
}
