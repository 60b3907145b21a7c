import Foundation
import TestSupport
import XCTest

/// examples/c-vmm, built against the installed library with `-Wall -Wextra -Werror` (once per test run, plain and
/// with AddressSanitizer), and one running c-vmm process driven through its stdin commands: each command gets one
/// line on stdout starting with `ok` or `error`, and the guest's console goes to a file.
final class CVMMProcess: @unchecked Sendable {
    enum Build: String { case plain = "build", sanitized = "build-asan" }

    private static let lock = NSLock()
    nonisolated(unsafe) private static var built: [Build: String] = [:]
    static let buildDirectory = FileManager.default.temporaryDirectory.appendingPathComponent("c-vmm-\(getpid())").path

    /// The c-vmm binary of `build`, made on first use with the example's own Makefile.
    static func binary(_ build: Build = .plain) throws -> String {
        try lock.withLock {
            if let path = built[build] { return path }
            let source = TestGuest.repositoryRoot.appendingPathComponent("examples/c-vmm").path
            let output = "\(buildDirectory)/\(build.rawValue)"
            let sanitize = build == .plain ? "" : "SANITIZE=address,undefined"
            try InstalledLibrary.shell("make -s -C '\(source)' \(sanitize) BUILD='\(output)'")
            let path = "\(output)/c-vmm"
            guard FileManager.default.isExecutableFile(atPath: path) else { throw XCTSkip("make built no \(path)") }
            built[build] = path
            return path
        }
    }

    let process = Process()
    let console: String
    private let input = Pipe()
    private let output = Pipe()
    private let lines = LineQueue()
    private let errors = LineQueue()

    /// Starts `c-vmm arguments...`, its console appended to `console`.
    init(_ arguments: [String], console: String, build: Build = .plain) throws {
        self.console = console
        // A c-vmm that has exited (its guest moved away) must fail a write to its stdin, not kill the tests.
        signal(SIGPIPE, SIG_IGN)
        process.executableURL = URL(fileURLWithPath: try Self.binary(build))
        process.arguments = [arguments[0], "--console", console] + arguments.dropFirst()
        // No leak check at exit: LeakSanitizer stops every thread of the process with ptrace, KVM's own
        // "kvm-nx-lpage-recovery" task among them (a thread of ours since Linux 6.13), and a thread still tearing the VM
        // down then waits for that stopped task for ever (seen in CI: one thread in vhost_task_stop, the tracer in
        // do_wait). Memory errors are still caught; leaks are checked by the contract test, which needs no KVM.
        process.environment = ProcessInfo.processInfo.environment.merging(["ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0"]) { $1 }
        process.standardInput = input
        process.standardOutput = output
        let standardError = Pipe()
        process.standardError = standardError
        try process.run()
        lines.follow(output.fileHandleForReading)
        errors.follow(standardError.fileHandleForReading)
    }

    deinit { stop() }

    /// The next line on stdout, within `timeout` seconds.
    func nextLine(timeout: TimeInterval = 30) -> String? { lines.next(timeout: timeout) }

    /// Reads stdout until a line starting with `prefix`; fails the test on an `error` line or a timeout.
    @discardableResult
    func expect(_ prefix: String, timeout: TimeInterval = 60, file: StaticString = #filePath, line: UInt = #line) -> String? {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while let text = nextLine(timeout: max(0, deadline.timeIntervalSinceNow)) {
            if text.hasPrefix(prefix) { return text }
            if text.hasPrefix("error") {
                XCTFail("c-vmm answered \(text) while \(prefix) was expected; stderr: \(stderr)", file: file, line: line)
                return nil
            }
        }
        XCTFail("c-vmm printed no line starting with \(prefix) in \(timeout) s; stderr: \(stderr)", file: file, line: line)
        return nil
    }

    /// Sends one command and returns its answer line.
    func command(_ text: String, timeout: TimeInterval = 60) -> String? {
        guard (try? input.fileHandleForWriting.write(contentsOf: Data((text + "\n").utf8))) != nil else { return nil }
        return nextLine(timeout: timeout)
    }

    /// What c-vmm printed on stderr so far.
    var stderr: String { errors.all.joined(separator: "\n") }

    /// Waits until the guest has printed a memstress status line with more than `ticks` ticks and returns it.
    func memstress(after ticks: UInt64 = 0, pages: UInt64 = 0, timeout: TimeInterval = 60) -> MemstressStatus? {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while Date() < deadline {
            if let text = try? String(contentsOfFile: console, encoding: .utf8),
               let status = text.split(separator: "\n").reversed().lazy.compactMap({ MemstressStatus(String($0)) }).first,
               status.ticks > ticks, status.pages >= pages {
                return status
            }
            Thread.sleep(forTimeInterval: 0.05)
        }
        return nil
    }

    /// Every memstress status line the console holds says verify=ok.
    var consoleVerified: Bool {
        guard let text = try? String(contentsOfFile: console, encoding: .utf8) else { return false }
        let statuses = text.split(separator: "\n").compactMap { MemstressStatus(String($0)) }
        return !statuses.isEmpty && statuses.allSatisfy(\.verified)
    }

    func waitForExit(timeout: TimeInterval = 30) -> Int32? {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while process.isRunning, Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
        return process.isRunning ? nil : process.terminationStatus
    }

    /// Asks c-vmm to quit, then terminates it, then kills it with whatever it started (a process stuck in a
    /// tracing stop ignores SIGTERM), so that a test never waits for ever on it.
    func stop() {
        if process.isRunning {
            try? input.fileHandleForWriting.write(contentsOf: Data("quit\n".utf8))
            if waitForExit(timeout: 5) == nil { process.terminate() }
            if waitForExit(timeout: 5) == nil {
                _ = runCommand(["/usr/bin/pkill", "-KILL", "-P", "\(process.processIdentifier)"])
                kill(process.processIdentifier, SIGKILL)
            }
            process.waitUntilExit()
        }
    }
}

/// Lines read from a pipe on a thread of their own, handed out in order.
private final class LineQueue: @unchecked Sendable {
    private let condition = NSCondition()
    private var queue: [String] = []
    private var seen: [String] = []

    func follow(_ handle: FileHandle) {
        Thread.detachNewThread { [self] in
            var pending = Data()
            while true {
                let chunk = handle.availableData
                if chunk.isEmpty { break }
                pending.append(chunk)
                while let newline = pending.firstIndex(of: 10) {
                    let line = String(decoding: pending[pending.startIndex ..< newline], as: UTF8.self)
                    pending.removeSubrange(pending.startIndex ... newline)
                    condition.withLock {
                        queue.append(line)
                        seen.append(line)
                        condition.broadcast()
                    }
                }
            }
        }
    }

    func next(timeout: TimeInterval) -> String? {
        let deadline = Date(timeIntervalSinceNow: timeout)
        return condition.withLock {
            while queue.isEmpty { if !condition.wait(until: deadline) { return nil } }
            return queue.removeFirst()
        }
    }

    var all: [String] { condition.withLock { seen } }
}
