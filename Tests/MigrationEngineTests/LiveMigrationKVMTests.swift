import Foundation
import KVMBackend
import KVMMigration
import MicroVM
import MigrationEngine
import TestSupport
import XCTest

/// Live migrations between two MicroVMs in this process, over real Unix sockets: the guest keeps writing
/// while it moves, and checks from inside that nothing was lost.
final class LiveMigrationKVMTests: KVMTestCase {
    struct Outcome {
        var report: MigrationReport
        var receiverError: Error?
        var destination: MicroVM?
        var destinationConsole: SerialConsole
    }

    func bootSource(_ commandLine: String, memory: UInt64 = 256 << 20) throws -> (MicroVM, SerialConsole) {
        let console = SerialConsole(output: nil)
        let machine = try MicroVM(booting: try TestGuest.image(), commandLine: commandLine,
                                  configuration: MicroVMConfiguration(memorySize: memory, console: console))
        machine.start()
        XCTAssertNotNil(console.waitForLine(timeout: 10) { $0.contains("verify=ok") && !$0.contains("pages=0 ") })
        return (machine, console)
    }

    func migrate(_ source: MicroVM, options: MigrationOptions,
                 prepare: (MigrationSender, [SocketPairChannel]) -> Void = { _, _ in }) -> Outcome {
        let pairs = (0 ..< options.channels).map { _ in SocketPairChannel.pair() }
        let console = SerialConsole(output: nil)
        let sink = MicroVMGuestSink(console: console)
        let receiver = MigrationReceiver(sink: sink, channels: pairs.map(\.1))
        let sender = MigrationSender(source: MicroVMGuestSource(machine: source), channels: pairs.map(\.0), options: options)
        prepare(sender, pairs.map(\.0))
        var receiverError: Error?
        let done = DispatchSemaphore(value: 0)
        Thread {
            do { _ = try receiver.run() } catch { receiverError = error }
            done.signal()
        }.start()
        let report = sender.run()
        done.wait()
        return Outcome(report: report, receiverError: receiverError, destination: sink.machine, destinationConsole: console)
    }

    /// Status lines after `line`, waiting up to `timeout` for `count` of them; all must verify.
    func statuses(_ console: SerialConsole, after line: Int, count: Int, timeout: TimeInterval = 10) -> [MemstressStatus] {
        var found: [MemstressStatus] = []
        var next = line
        while found.count < count, let text = console.waitForLine(after: next, timeout: timeout, where: { $0.hasPrefix("memstress") }) {
            next = max(next, console.lineCount - 1)
            if let status = MemstressStatus(text) { found.append(status) } else { XCTFail(text) }
            next += 1
        }
        XCTAssertTrue(found.allSatisfy(\.verified), "\(console.receivedLines.suffix(5))")
        return found
    }

    func testGuestWriting100MiBpsMovesWithLz4OnTwoChannels() throws {
        let (source, sourceConsole) = try bootSource("workload=memstress size_mib=64 rate_mib=100 pattern=mixed")
        let before = MemstressStatus(sourceConsole.receivedLines.last { $0.contains("verify=ok") }!)!
        var options = MigrationOptions()
        options.channels = 2
        options.compression = .lz4
        let outcome = migrate(source, options: options)
        XCTAssertTrue(outcome.report.succeeded, outcome.report.error ?? "")
        XCTAssertNil(outcome.receiverError)
        let destination = try XCTUnwrap(outcome.destination)
        let after = statuses(outcome.destinationConsole, after: 0, count: 2)
        XCTAssertEqual(after.count, 2)
        XCTAssertGreaterThan(after.last!.ticks, before.ticks, "ticks carry on at the destination")
        XCTAssertGreaterThanOrEqual(after.first!.generation, before.generation)
        XCTAssertNil(destination.stopped)
        print("migration report: \(String(decoding: try JSONEncoder().encode(outcome.report), as: UTF8.self))")
        source.stop()
        destination.stop()
    }
}
