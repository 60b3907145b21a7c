import Foundation

/// What one of the project's command-line tools printed (standard output and error together) and how it exited.
public struct ToolOutput: Sendable {
    public var status: Int32
    public var text: String
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
