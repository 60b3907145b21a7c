import Foundation
import MicroVM
import TestSupport
import XCTest

/// The whole state and memory of a running guest move into a new VM in a new process, 20 times in a row,
/// while the guest writes 100 MiB/s; the guest itself checks that no write was lost.
final class SaveRestoreKVMTests: KVMTestCase {
    var directory: URL!

    override func setUpWithError() throws {
        try super.setUpWithError()
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("microvm-save-\(getpid())-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        if let directory { try? FileManager.default.removeItem(at: directory) }
    }

    /// The `microvm` executable built beside this test bundle.
    var microvm: String {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("microvm").path
    }

    /// Runs microvm, returns its exit status and the memstress status lines it printed.
    func microvm(_ arguments: [String]) throws -> (Int32, [MemstressStatus], String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: microvm)
        process.arguments = arguments
        let output = Pipe(), errors = Pipe()
        process.standardOutput = output
        process.standardError = errors
        try process.run()
        let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let diagnostics = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        XCTAssertFalse(text.contains("FAIL"), text)
        return (process.terminationStatus, text.split(separator: "\n").compactMap { MemstressStatus(String($0)) }, diagnostics + text)
    }

    func testTwentySaveRestoreCyclesInNewProcessesWhileWriting100MiBps() throws {
        let command = "workload=memstress size_mib=64 rate_mib=100 pattern=mixed"
        var file = directory.appendingPathComponent("save-0").path
        var (status, lines, log) = try microvm(["run", "--kernel", TestGuest.path, "--memory", "256M", "--cmdline", command,
                                                "--save-after", "1.6", "--save-to", file])
        XCTAssertEqual(status, 0, log)
        var last = try XCTUnwrap(lines.last, "no status line before the first save: \(log)")
        for cycle in 1 ... 20 {
            let next = directory.appendingPathComponent("save-\(cycle)").path
            (status, lines, log) = try microvm(["restore", file, "--save-after", "1.3", "--save-to", next])
            XCTAssertEqual(status, 0, "cycle \(cycle): \(log)")
            let first = try XCTUnwrap(lines.first, "cycle \(cycle): no status line after restoring: \(log)")
            XCTAssertTrue(lines.allSatisfy(\.verified), "cycle \(cycle): \(log)")
            XCTAssertGreaterThan(first.ticks, last.ticks, "cycle \(cycle): ticks must carry on")
            XCTAssertGreaterThanOrEqual(first.generation, last.generation, "cycle \(cycle): generation must carry on")
            XCTAssertGreaterThanOrEqual(first.seconds, last.seconds, "cycle \(cycle)")
            last = lines.last!
            try FileManager.default.removeItem(atPath: file)
            file = next
        }
        XCTAssertGreaterThanOrEqual(last.seconds, 20, "twenty cycles of at least a second each")
    }

    func testRestoreRefusesADamagedFile() throws {
        let file = directory.appendingPathComponent("save").path
        let (status, _, log) = try microvm(["run", "--kernel", TestGuest.path, "--memory", "64M",
                                            "--cmdline", "workload=memstress size_mib=8", "--save-after", "0.5", "--save-to", file])
        XCTAssertEqual(status, 0, log)
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: file))
        try handle.seek(toOffset: 100) // inside the machine state
        try handle.write(contentsOf: Data([0xFF]))
        try handle.close()
        let (damaged, _, message) = try microvm(["restore", file, "--duration", "0.1"])
        XCTAssertNotEqual(damaged, 0)
        XCTAssertTrue(message.contains("checksum mismatch"), message)
        XCTAssertFalse(FileManager.default.fileExists(atPath: file + ".partial"))
    }
}
