import Foundation
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

/// Runs a program to completion, its standard output and error read together.
public func runProgram(_ path: String, _ arguments: [String], environment: [String: String]? = nil,
                       directory: String? = nil) throws -> ToolOutput {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    if let environment { process.environment = environment }
    if let directory { process.currentDirectoryURL = URL(fileURLWithPath: directory) }
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    try process.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return ToolOutput(status: process.terminationStatus, text: String(decoding: data, as: UTF8.self))
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
