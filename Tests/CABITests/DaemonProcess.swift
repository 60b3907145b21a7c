import Foundation
import Glibc
import MigratedAPI
import TestSupport
import XCTest

/// The installed `migrated` daemon as a process of its own, with mutual TLS as `server.migrated.test` (the test
/// certificates), driven with the installed `migratectl` and `vmsnap`.
final class DaemonProcess {
    let directory: String
    let socket: String
    let incomingPort: UInt16
    private let process = Process()
    private let bin: String

    /// A daemon that accepts migrations from `allowedPeers` on a free loopback port.
    init(allowedPeers: [String] = ["client.migrated.test"]) throws {
        bin = "\(try InstalledLibrary.prefix())/bin"
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("daemon-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        socket = "\(directory)/control.sock"
        incomingPort = try freeLoopbackPort()
        let certificates = TestCertificates.directory
        process.executableURL = URL(fileURLWithPath: "\(bin)/migrated")
        process.arguments = ["--socket", socket, "--log-level", "warning", "--memory-budget", "4G",
                             "--tls-certificate", "\(certificates)/server.pem", "--tls-key", "\(certificates)/server.key",
                             "--tls-ca", "\(certificates)/ca.pem", "--incoming-listen", "127.0.0.1:\(incomingPort)"]
            + allowedPeers.flatMap { ["--allow-peer", $0] }
        _ = FileManager.default.createFile(atPath: "\(directory)/daemon.log", contents: nil)
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: "\(directory)/daemon.log"))
        process.standardOutput = log
        process.standardError = log
        try process.run()
        let deadline = Date(timeIntervalSinceNow: 15)
        while (try? ctl(["vm", "list"]))?.status != 0 {
            guard Date() < deadline, process.isRunning else { throw XCTSkip("the installed daemon did not come up: \(self.log)") }
            Thread.sleep(forTimeInterval: 0.05)
        }
    }

    var log: String { (try? String(contentsOfFile: "\(directory)/daemon.log", encoding: .utf8)) ?? "" }

    /// Runs migratectl (or another installed tool) against this daemon.
    func ctl(_ arguments: [String], tool: String = "migratectl") throws -> ToolOutput {
        try runProgram("\(bin)/\(tool)", arguments + ["--socket", socket])
    }

    /// A VM's status document.
    func vm(_ id: String) throws -> VMInfo? {
        let output = try ctl(["vm", "show", id, "--json"])
        guard output.status == 0 else { return nil }
        return try? APIJSON.decode(VMInfo.self, from: Data(output.text.utf8))
    }

    /// Polls until VM `id` prints a memstress status line after `ticks`; returns it.
    func memstress(of id: String, after ticks: UInt64, timeout: TimeInterval = 30) throws -> MemstressStatus? {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while Date() < deadline {
            if let line = try vm(id)?.lastConsoleLine, let status = MemstressStatus(line), status.ticks > ticks { return status }
            Thread.sleep(forTimeInterval: 0.1)
        }
        return nil
    }

    func stop() {
        guard process.isRunning else { return }
        process.terminate()
        process.waitUntilExit()
        try? FileManager.default.removeItem(atPath: directory)
    }

    deinit { stop() }
}

/// A TCP port on loopback that nothing listens on now.
func freeLoopbackPort() throws -> UInt16 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let ok = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
    }
    guard ok else { throw POSIXError(.EADDRNOTAVAIL) }
    return UInt16(bigEndian: address.sin_port)
}
