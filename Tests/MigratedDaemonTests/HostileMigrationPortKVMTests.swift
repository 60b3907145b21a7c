import Foundation
import Glibc
import MigratedAPI
import TestSupport
import Transport
import XCTest

/// Strangers at a daemon's migration port: a flood of connections that never speak, a client whose certificate
/// no trusted CA signed, one whose certificate is valid but not on the allow-list, and one that completes the
/// handshake and then sends garbage. Each is refused quickly, and a real migration started meanwhile lands.
extension TwoDaemonMigrationKVMTests {
    func testStrangersAtTheMigrationPortAreRefusedWhileAMigrationLands() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        raiseDescriptorLimit(to: 4096)
        try await withTwoDaemons { a, _, b, bListener in
            _ = try await a.client.createVM(VMCreateRequest(id: "mover", image: image, memoryMib: 256,
                                                             cmdline: "workload=memstress size_mib=64 rate_mib=100"))
            let before = try XCTUnwrapAsync(await a.memstressStatus(after: 0, of: "mover"), "the guest runs on A")
            guard case .tcp(_, let port)? = bListener.address else { return XCTFail("B listens on TCP") }
            let endpoint = Endpoint.tcp(host: "127.0.0.1", port: port)

            // 500 connections from another loopback address that never say a word: past the per-source limit of
            // opening connections they are closed at once; the rest wait out the handshake timeout.
            let flood = (0 ..< 500).compactMap { _ in silentConnection(from: "127.0.0.2", to: port) }
            XCTAssertEqual(flood.count, 500, "the flood connects")
            try await Task.sleep(nanoseconds: 500_000_000)
            let closedAtOnce = flood.filter { isClosed($0) }.count
            XCTAssertGreaterThanOrEqual(closedAtOnce, 400, "connections beyond the per-source limit are closed at once")

            // Bad certificates fail in the handshake, quickly.
            for (certificate, reason) in [("rogue", "signed by an untrusted CA"), ("stranger", "not on the allow-list")] {
                let started = Date()
                XCTAssertThrowsError(try Transport.connect(to: endpoint, security: TestCertificates.client(certificate)), reason)
                XCTAssertLessThan(Date().timeIntervalSince(started), 2, "\(certificate): refused quickly")
            }
            // A valid peer that speaks garbage after the handshake is hung up on.
            let garbage = try Transport.connect(to: endpoint, security: TestCertificates.client())
            let noise = [UInt8](repeating: 0xA5, count: 4096)
            try noise.withUnsafeBytes { try garbage.send([$0]) }
            let started = Date()
            var buffer = [UInt8](repeating: 0, count: 64)
            let answer = try? buffer.withUnsafeMutableBytes { try garbage.receive(into: $0) }
            XCTAssertTrue(answer == nil || answer == 0, "the daemon closes a channel that sends no stream header")
            XCTAssertLessThan(Date().timeIntervalSince(started), 2 * sanitizerSlowdown, "garbage: refused quickly")
            garbage.close()

            // Meanwhile, with the admitted part of the flood still holding its slots, a real migration lands.
            let output = try await runMigratectl(socket: a.socketPath, ["migrate", "mover", "--to", "127.0.0.1:\(port)", "--interval", "0.1"])
            XCTAssertEqual(output.status, 0, output.text)
            let report = try await a.client.migration("mover").report
            XCTAssertEqual(report?.succeeded, true, report?.error ?? "")
            XCTAssertLessThan(report?.totalSeconds ?? 99, 5 * sanitizerSlowdown, "the migration is not held up by the flood")
            let arrived = try await b.memstressStatus(after: before.ticks, of: "mover")
            XCTAssertNotNil(arrived, "the guest carries on at B")
            for fd in flood { close(fd) }
        }
    }
}

/// A TCP connection from `source` (a loopback address) to 127.0.0.1:`port` that sends nothing; its descriptor.
private func silentConnection(from source: String, to port: UInt16) -> Int32? {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    func address(_ host: String, _ port: UInt16) -> sockaddr_in {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        inet_pton(AF_INET, host, &address.sin_addr)
        return address
    }
    var local = address(source, 0), remote = address("127.0.0.1", port)
    let connected = withUnsafePointer(to: &local) { l in
        withUnsafePointer(to: &remote) { r in
            l.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } == 0
                && r.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } == 0
        }
    }
    guard fd >= 0, connected else {
        if fd >= 0 { close(fd) }
        return nil
    }
    return fd
}

/// Whether the peer has closed `fd`.
private func isClosed(_ fd: Int32) -> Bool {
    var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    guard poll(&entry, 1, 0) == 1 else { return false }
    var byte: UInt8 = 0
    return recv(fd, &byte, 1, Int32(MSG_DONTWAIT)) <= 0
}

private func raiseDescriptorLimit(to count: rlim_t) {
    var limit = rlimit()
    getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
    if limit.rlim_cur < count {
        limit.rlim_cur = min(count, limit.rlim_max)
        setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
    }
}
