import Foundation
import Glibc
import MigratedAPI
import XCTest

/// A `migrated` daemon as a process of its own, with mutual TLS from the test certificates, driven with the
/// `migratectl` and `vmsnap` beside it: the installed ones (`installed`) for the C library's tests, the ones built
/// beside the tests (`besideTests`) where a daemon must be killed (`kill9`) and started again on the same socket
/// and port (`restart`).
public final class DaemonProcess {
    public let directory: String
    public let socket: String
    public let incomingPort: UInt16
    private let bin: String
    private let arguments: [String]
    private var process: Process

    /// Where `swift build` put the tools the test bundle depends on.
    public static var besideTests: String { URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().path }

    /// The installed daemon (`MIGRATED_TEST_PREFIX`) as `server.migrated.test`, accepting `allowedPeers`.
    public convenience init(allowedPeers: [String] = ["client.migrated.test"]) throws {
        try self.init(bin: "\(try InstalledLibrary.prefix())/bin", allowedPeers: allowedPeers)
    }

    /// A daemon from `bin` with the test certificate `certificate`, accepting migrations from `allowedPeers` on a free
    /// loopback port; `environment` is added to this process's (a test hook such as MIGRATED_FAULT_INJECT).
    public init(bin: String, certificate: String = "server", allowedPeers: [String] = ["client.migrated.test"],
                environment: [String: String] = [:], logLevel: String = "warning") throws {
        self.bin = bin
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("daemon-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        socket = "\(directory)/control.sock"
        incomingPort = try freeLoopbackPort()
        let certificates = TestCertificates.directory
        arguments = ["--socket", socket, "--log-level", logLevel, "--memory-budget", "4G",
                     "--tls-certificate", "\(certificates)/\(certificate).pem", "--tls-key", "\(certificates)/\(certificate).key",
                     "--tls-ca", "\(certificates)/ca.pem", "--incoming-listen", "127.0.0.1:\(incomingPort)",
                     "--in-doubt-dir", "\(directory)/in-doubt"]
            + allowedPeers.flatMap { ["--allow-peer", $0] }
        _ = FileManager.default.createFile(atPath: "\(directory)/daemon.log", contents: nil)
        process = Process()
        try launch(environment: environment)
    }

    /// Everything each run of the daemon wrote, in order.
    public var log: String { (try? String(contentsOfFile: "\(directory)/daemon.log", encoding: .utf8)) ?? "" }

    public var pid: Int32 { process.processIdentifier }
    public var isRunning: Bool { process.isRunning }

    /// Starts the daemon and waits until it answers; its output is appended to the log.
    private func launch(environment: [String: String]) throws {
        process = Process()
        process.executableURL = URL(fileURLWithPath: "\(bin)/migrated")
        process.arguments = arguments
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: "\(directory)/daemon.log"))
        log.seekToEndOfFile()
        process.standardOutput = log
        process.standardError = log
        try process.run()
        let deadline = Date(timeIntervalSinceNow: 15)
        while (try? ctl(["vm", "list"]))?.status != 0 {
            guard Date() < deadline, process.isRunning else {
                throw DaemonProcessError(description: "the daemon \(bin)/migrated did not come up: \(self.log)")
            }
            Thread.sleep(forTimeInterval: 0.05)
        }
    }

    /// SIGKILL, as an operator's `kill -9` or the OOM killer would: no shutdown, the kernel closes the sockets.
    /// Returns once the process is gone.
    public func kill9() {
        guard process.isRunning else { return }
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    /// SIGSTOP or SIGCONT: the daemon stops answering, or answers again, its connections open.
    public func signal(_ number: Int32) { kill(process.processIdentifier, number) }

    /// Waits until the process ends by itself (a test hook's exit), at most `timeout`; its exit status, or nil.
    public func waitForExit(timeout: TimeInterval) -> Int32? {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while process.isRunning {
            guard Date() < deadline else { return nil }
            Thread.sleep(forTimeInterval: 0.05)
        }
        return process.terminationStatus
    }

    /// Starts the daemon again after it died, on the same socket (the stale one is taken over) and port.
    public func restart(environment: [String: String] = [:]) throws {
        precondition(!process.isRunning, "restart a daemon that is gone")
        try launch(environment: environment)
    }

    /// Runs migratectl (or another tool beside it) against this daemon.
    public func ctl(_ arguments: [String], tool: String = "migratectl") throws -> ToolOutput {
        try runProgram("\(bin)/\(tool)", arguments + ["--socket", socket])
    }

    /// A VM's status document, or nil when the daemon does not know the VM.
    public func vm(_ id: String) throws -> VMInfo? {
        let output = try ctl(["vm", "show", id, "--json"])
        guard output.status == 0 else { return nil }
        return try? APIJSON.decode(VMInfo.self, from: Data(output.text.utf8))
    }

    /// Polls until VM `id` prints a memstress status line after `ticks`; returns it.
    public func memstress(of id: String, after ticks: UInt64, timeout: TimeInterval = 30) throws -> MemstressStatus? {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while Date() < deadline {
            if let line = try vm(id)?.lastConsoleLine, let status = MemstressStatus(line), status.ticks > ticks { return status }
            Thread.sleep(forTimeInterval: 0.1)
        }
        return nil
    }

    /// Ends the daemon as its service manager would (SIGTERM: it stops its VMs) and removes its directory.
    public func stop() {
        if process.isRunning {
            process.terminate()
            process.waitUntilExit()
        }
        try? FileManager.default.removeItem(atPath: directory)
    }

    deinit { stop() }
}

public struct DaemonProcessError: Error, CustomStringConvertible {
    public let description: String
}

/// A TCP port on loopback that nothing listens on now.
public func freeLoopbackPort() throws -> UInt16 {
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
