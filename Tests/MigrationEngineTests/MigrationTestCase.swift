import Foundation
import KVMBackend
import KVMMigration
import MicroVM
import MigrationEngine
import MigrationWire
import TestSupport
import XCTest

/// Migrations between two MicroVMs in this process, over real Unix sockets: helpers for the test classes.
class MigrationTestCase: KVMTestCase {
    struct Outcome {
        var report: MigrationReport
        var receiverError: Error?
        var receiverReport: MigrationReceiver.Report? = nil
        var destination: MicroVM?
        var destinationConsole: SerialConsole
    }

    /// Boots memstress and waits until it has written some of its working set, or, with `writtenPages`, that many
    /// pages of it (a guest writing at `rate_mib` fills its working set at that rate).
    func bootSource(_ commandLine: String, memory: UInt64 = 256 << 20, backing: GuestMemory.Backing = .sharedMemory,
                    writtenPages: Int? = nil, timeout: TimeInterval = 10) throws -> (MicroVM, SerialConsole) {
        let console = SerialConsole(output: nil)
        let machine = try MicroVM(booting: try TestGuest.image(), commandLine: commandLine,
                                  configuration: MicroVMConfiguration(memorySize: memory, console: console, memoryBacking: backing))
        machine.start()
        XCTAssertNotNil(console.waitForLine(timeout: timeout) { line in
            line.contains("verify=ok") && (writtenPages.map { line.contains("pages=\($0) ") } ?? !line.contains("pages=0 "))
        })
        return (machine, console)
    }

    /// With `leftoverShelf`, the receiver keeps the memory of a broken pre-copy there, and resumes from it.
    func migrate(_ source: MicroVM, options: MigrationOptions, receiverCapabilities: Capabilities? = nil,
                 destinationBacking: GuestMemory.Backing = .sharedMemory, destinationTracking: DirtyTrackingMethod = .bitmap,
                 leftoverShelf: PreCopyLeftoverShelf? = nil,
                 prepare: (MigrationSender, [SocketPairChannel]) -> Void = { _, _ in },
                 configureReceiver: (MigrationReceiver) -> Void = { _ in }) -> Outcome {
        let pairs = (0 ..< options.channels).map { _ in SocketPairChannel.pair() }
        let console = SerialConsole(output: nil)
        let sink = MicroVMGuestSink(console: console, dirtyTracking: destinationTracking, memoryBacking: destinationBacking)
        let receiver = MigrationReceiver(sink: sink, channels: pairs.map(\.1), capabilities: receiverCapabilities,
                                         leftoverShelf: leftoverShelf, peer: "the test's source")
        configureReceiver(receiver)
        let sender = MigrationSender(source: MicroVMGuestSource(machine: source), channels: pairs.map(\.0), options: options)
        prepare(sender, pairs.map(\.0))
        let receiverResult = ReceiverResult()
        Thread {
            do { receiverResult.report = try receiver.run() } catch { receiverResult.error = error }
            receiverResult.done.signal()
        }.start()
        let report = sender.run()
        receiverResult.done.wait()
        // A resumed pre-copy rebuilds the guest in the sink the broken one left, with its console.
        let used = receiver.sink as? MicroVMGuestSink ?? sink
        return Outcome(report: report, receiverError: receiverResult.error, receiverReport: receiverResult.report,
                       destination: used.machine, destinationConsole: used.machine?.console ?? console)
    }

    /// Migrates `source`, which must succeed; stops the source and waits for `lines` verified status lines at the
    /// destination, which is returned running.
    func migrateSuccessfully(_ source: MicroVM, options: MigrationOptions, receiverCapabilities: Capabilities? = nil,
                             destinationBacking: GuestMemory.Backing = .sharedMemory,
                             destinationTracking: DirtyTrackingMethod = .bitmap, leftoverShelf: PreCopyLeftoverShelf? = nil, lines: Int = 1,
                             file: StaticString = #filePath, line: UInt = #line) throws -> (Outcome, MicroVM) {
        let outcome = migrate(source, options: options, receiverCapabilities: receiverCapabilities,
                              destinationBacking: destinationBacking, destinationTracking: destinationTracking, leftoverShelf: leftoverShelf)
        XCTAssertTrue(outcome.report.succeeded, outcome.report.error ?? "", file: file, line: line)
        source.stop()
        let destination = try XCTUnwrap(outcome.destination, file: file, line: line)
        XCTAssertEqual(statuses(outcome.destinationConsole, after: 0, count: lines).count, lines, file: file, line: line)
        return (outcome, destination)
    }

    /// After a failed migration, the source carries on: running, not throttled, and verifying its memory with rising
    /// ticks; no destination guest exists. Stops the source.
    func assertSourceIntact(_ source: MicroVM, _ console: SerialConsole, _ outcome: Outcome, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertFalse(outcome.report.succeeded, file: file, line: line)
        XCTAssertNil(outcome.destination, "no destination guest may exist", file: file, line: line)
        XCTAssertNil(source.stopped, file: file, line: line)
        XCTAssertEqual(source.throttle, 0, file: file, line: line)
        let seen = statuses(console, after: console.lineCount, count: 2)
        XCTAssertEqual(seen.count, 2, "the source must keep running and verifying", file: file, line: line)
        if seen.count == 2 { XCTAssertGreaterThan(seen[1].ticks, seen[0].ticks, file: file, line: line) }
        source.stop()
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
}

/// How the receiver's thread ended; read only after `done` is signalled.
final class ReceiverResult: @unchecked Sendable {
    var report: MigrationReceiver.Report?
    var error: Error?
    let done = DispatchSemaphore(value: 0)
}
