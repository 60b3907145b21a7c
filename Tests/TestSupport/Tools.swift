import Foundation
import Threads
import XCTest

/// What one of the project's command-line tools printed (standard output and error together) and how it exited.
public struct ToolOutput: Sendable {
    public var status: Int32
    public var text: String

    public init(status: Int32, text: String) {
        self.status = status
        self.text = text
    }
}

/// Runs a tool built beside the tests (migratectl, vmsnap) to completion.
public func runTool(_ tool: String, _ arguments: [String]) async throws -> ToolOutput {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent(tool)
    process.arguments = arguments
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    try process.run()
    // Read on a Dispatch thread: a daemon answering the tool may run on this process's cooperative pool.
    let data = await withCheckedContinuation { continuation in
        DispatchQueue.global().async {
            let data = pipe.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            continuation.resume(returning: data)
        }
    }
    return ToolOutput(status: process.terminationStatus, text: String(decoding: data, as: UTF8.self))
}

/// Runs a program to completion, its standard output and error read together. A program still running after
/// `timeLimit` seconds has its threads' stacks printed (with gdb, where installed) and is killed with every process
/// it started, so that a hang fails its test with a diagnosis instead of stalling the whole run.
public func runProgram(_ path: String, _ arguments: [String], environment: [String: String]? = nil,
                       directory: String? = nil, timeLimit: TimeInterval = 300) throws -> ToolOutput {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    if let environment { process.environment = environment }
    if let directory { process.currentDirectoryURL = URL(fileURLWithPath: directory) }
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    try process.run()
    let collected = Locked(Data())
    let finished = DispatchSemaphore(value: 0)
    let reader = pipe.fileHandleForReading
    DispatchQueue.global().async {
        let data = reader.readDataToEndOfFile()
        collected.withLock { $0 = data }
        finished.signal()
    }
    var diagnosis = ""
    if finished.wait(timeout: .now() + timeLimit) == .timedOut {
        let processes = processTree(rootedAt: process.processIdentifier)
        diagnosis = "\n[\(path) still running after \(Int(timeLimit)) s; its stacks, then killed]\n" + processes.map(stacks(of:)).joined()
        for pid in processes { kill(pid, SIGKILL) }
        finished.wait()
    }
    process.waitUntilExit()
    let text = String(decoding: collected.withLock { $0 }, as: UTF8.self) + diagnosis
    return ToolOutput(status: process.terminationStatus, text: text)
}

/// `root` and its descendants, parents first, from the parent links in /proc.
private func processTree(rootedAt root: pid_t) -> [pid_t] {
    var children: [pid_t: [pid_t]] = [:]
    for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
        guard let pid = pid_t(entry), let stat = try? String(contentsOfFile: "/proc/\(entry)/stat", encoding: .utf8),
              let nameEnd = stat.lastIndex(of: ")") else { continue }
        // After the command name in parentheses: state, then the parent's pid.
        let fields = stat[stat.index(after: nameEnd)...].split(separator: " ")
        if fields.count > 1, let parent = pid_t(fields[1]) { children[parent, default: []].append(pid) }
    }
    var tree = [root], next = 0
    while next < tree.count {
        tree += children[tree[next]] ?? []
        next += 1
    }
    return tree
}

/// Every thread's stack of process `pid` as gdb prints it, or why there is none.
private func stacks(of pid: pid_t) -> String {
    let command = (try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8))?
        .replacingOccurrences(of: "\0", with: " ") ?? "?"
    guard FileManager.default.isExecutableFile(atPath: "/usr/bin/gdb") else { return "-- \(pid) \(command): no gdb for its stacks\n" }
    let output = try? runProgram("/usr/bin/gdb", ["-p", "\(pid)", "-batch", "-nx", "-ex", "thread apply all bt"], timeLimit: 60)
    return "-- \(pid) \(command)\n" + (output?.text ?? "gdb did not run\n")
}

/// Runs a system command quietly to completion; its exit status, or -1 when it cannot be started.
public func runCommand(_ command: [String]) -> Int32 {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: command[0])
    process.arguments = Array(command.dropFirst())
    process.standardError = FileHandle.nullDevice
    guard (try? process.run()) != nil else { return -1 }
    process.waitUntilExit()
    return process.terminationStatus
}

/// A tmpfs of a few MiB mounted at `path`, for the tests of a disk that fills up; skips the test where mounting
/// is not allowed (not root).
public struct SmallDisk {
    public let path: String

    public init(at path: String, size: String) throws {
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        guard runCommand(["/bin/mount", "-t", "tmpfs", "-o", "size=\(size)", "tmpfs", path]) == 0 else {
            throw XCTSkip("cannot mount a small tmpfs at \(path) (needs root)")
        }
        self.path = path
    }

    public func unmount() { _ = runCommand(["/bin/umount", path]) }
}
