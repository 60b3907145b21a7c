import Foundation
import KVMMigration
import MicroVM
import MigrationEngine
import MigrationWire
import TestSupport
import Threads
import XCTest

/// Every way a migration can fail before the switchover must leave the source running, intact, untrottled,
/// and no destination guest running.
final class MigrationFaultKVMTests: MigrationTestCase {
    /// 64 MiB of incompressible pages, sent raw on two channels: pass 0 carries about 32 MiB per channel once the
    /// guest has written all of them (it fills them at 50 MiB/s, then rewrites them at that rate).
    let guest = "workload=memstress size_mib=64 rate_mib=50 pattern=random"
    let workingSetPages = 16384
    let passZeroBytesPerChannel = 32 << 20

    var plainOptions: MigrationOptions {
        var options = MigrationOptions()
        options.channels = 2
        options.compression = .none
        return options
    }

    func testConnectionCutAt10_50_90PercentOfPassZero() throws {
        for fraction in [0.1, 0.5, 0.9] {
            let (source, console) = try bootSource(guest, writtenPages: workingSetPages)
            let outcome = migrate(source, options: plainOptions) { _, channels in
                channels[0].cutAfter = Int(Double(self.passZeroBytesPerChannel) * fraction)
            }
            XCTAssertTrue(outcome.report.error?.contains("channel failed") ?? false, "\(fraction): \(outcome.report.error ?? "")")
            XCTAssertEqual(outcome.report.passes.count, 0, "\(fraction): the cut falls inside pass 0")
            XCTAssertNotNil(outcome.receiverError)
            assertSourceIntact(source, console, outcome)
        }
    }

    func testConnectionCutDuringSwitchover() throws {
        let (source, console) = try bootSource(guest)
        let outcome = migrate(source, options: plainOptions) { sender, channels in
            sender.onProgress = { progress in
                if progress.phase == .switchover, channels[0].cutAfter == nil { channels[0].cutAfter = channels[0].sent + 4096 }
            }
        }
        XCTAssertNotNil(outcome.report.passes.last, "pre-copy ran")
        assertSourceIntact(source, console, outcome)
    }

    func testReceiverDyingMidStream() throws {
        let (source, console) = try bootSource(guest)
        let pairs = (0 ..< 2).map { _ in SocketPairChannel.pair() }
        // On the main channel: a secondary one would be lost alone, and the migration go on (ChannelLossKVMTests).
        pairs[0].1.dieAfterReceiving = 8 << 20
        let sink = MicroVMGuestSink(console: SerialConsole(output: nil))
        let receiver = MigrationReceiver(sink: sink, channels: pairs.map(\.1))
        let done = DispatchSemaphore(value: 0)
        Thread {
            _ = try? receiver.run()
            done.signal()
        }.start()
        let report = MigrationSender(source: MicroVMGuestSource(machine: source), channels: pairs.map(\.0), options: plainOptions).run()
        done.wait()
        XCTAssertNil(sink.machine)
        assertSourceIntact(source, console, Outcome(report: report, receiverError: nil, destination: sink.machine,
                                                    destinationConsole: SerialConsole(output: nil)))
    }

    func testForcedDigestMismatchIsRefused() throws {
        let (source, console) = try bootSource(guest)
        let outcome = migrate(source, options: plainOptions) { sender, _ in sender.corruptDigestForTesting = true }
        XCTAssertTrue("\(outcome.receiverError.map { "\($0)" } ?? "")".contains("digest mismatch"), "\(String(describing: outcome.receiverError))")
        XCTAssertTrue(outcome.report.error?.contains("digest mismatch") ?? false, outcome.report.error ?? "")
        assertSourceIntact(source, console, outcome)
    }

    /// A sender that declares a page unchanged (stream.md §6.4.1) whose content did change, as one that misjudged what
    /// the receiver holds would: the receiver keeps the stale page, its digest differs from the sender's, and the
    /// switchover is refused; the source runs on.
    func testWrongUnchangedPageIsRefusedByTheDigest() throws {
        let (source, console) = try bootSource(guest, writtenPages: workingSetPages)
        let outcome = migrate(source, options: plainOptions) { sender, _ in sender.claimWrongUnchangedForTesting = true }
        XCTAssertGreaterThan(outcome.report.passes.dropFirst().reduce(0) { $0 + $1.unchangedPages }, 0, "the false claims were made")
        XCTAssertTrue("\(outcome.receiverError.map { "\($0)" } ?? "")".contains("digest mismatch"), "\(String(describing: outcome.receiverError))")
        XCTAssertTrue(outcome.report.error?.contains("digest mismatch") ?? false, outcome.report.error ?? "")
        assertSourceIntact(source, console, outcome)
    }

    /// A page corrupted on the wire: with checksums over descriptors only (the default, so that pages leave from
    /// guest memory), its batch passes and the memory digest refuses the switchover; with checksums over whole
    /// batches (a receiver that does not take the option), its batch is refused. Either way the source runs on.
    /// The guest's working set stands still, so no later pass sends the page again and heals it.
    func testPageCorruptedInTransitIsCaughtByTheDigestOrByItsBatch() throws {
        let checksumOverWholeBatches = Capabilities(codecs: .all, maxChannels: 2, flags: [.wholeBatchCompression, .passAcknowledgement])
        for (capabilities, expected) in [(nil, "digest mismatch"), (checksumOverWholeBatches, "checksumMismatch")] {
            let (source, console) = try bootSource("workload=memstress size_mib=64 rate_mib=0 pattern=random")
            // 16 MiB into channel 0: in the payload of a batch of pass 0 (1 MiB of pages after 4 KiB of descriptors).
            let outcome = migrate(source, options: plainOptions, receiverCapabilities: capabilities) { _, channels in
                channels[0].corruptByteAt = 16 << 20
            }
            let receiverError = outcome.receiverError.map { "\($0)" } ?? ""
            XCTAssertTrue(receiverError.contains(expected), "expected \(expected): \(receiverError)")
            XCTAssertTrue(outcome.report.error?.contains(expected) ?? false, outcome.report.error ?? "")
            assertSourceIntact(source, console, outcome)
        }
    }

    /// Pages received straight into the memory of a huge-page destination: a page corrupted in transit is caught
    /// by the digest, a connection cut inside a batch's payload fails the channel; the destination is discarded
    /// and the source runs on.
    func testFaultsWhilePagesArriveInPlace() throws {
        try requireFreeHugePages(128)
        for fault in ["corrupt", "cut"] {
            let (source, console) = try bootSource(guest)
            let outcome = migrate(source, options: plainOptions, destinationBacking: .hugePages) { _, channels in
                // Both on the main channel: a secondary one would be lost alone, and the migration go on (ChannelLossKVMTests).
                if fault == "corrupt" { channels[0].corruptByteAt = 16 << 20 } else { channels[0].cutAfter = (16 << 20) + 1000 }
            }
            let expected = fault == "corrupt" ? "digest mismatch" : "channel failed"
            XCTAssertTrue(outcome.report.error?.contains(expected) ?? false, "\(fault): \(outcome.report.error ?? "")")
            assertSourceIntact(source, console, outcome)
        }
    }

    func testCancelDuringPreCopy() throws {
        let (source, console) = try bootSource(guest)
        let outcome = migrate(source, options: plainOptions) { sender, channels in
            channels[0].whenSent = (bytes: 4 << 20, action: { sender.cancel() })
        }
        XCTAssertEqual(outcome.report.error, "migration cancelled")
        assertSourceIntact(source, console, outcome)
    }

    /// A cancel, or a time budget that runs out, while a channel is still opening: the watchdog finds nothing yet to
    /// close, so the channel that opens afterwards must be closed at once. Else the sender would wait for ever for
    /// the answer of a peer that never gives one (here: a socket pair whose other end nobody reads).
    func testCancelOrTimeLimitWhileAChannelOpensEndsTheMigration() throws {
        let (source, console) = try bootSource(guest)
        var last: MigrationReport?
        for cancels in [true, false] {
            let (ours, silent) = SocketPairChannel.pair()
            var options = plainOptions
            options.channels = 1
            if !cancels { options.timeLimit = 0.05 }
            let sender = Locked<MigrationSender?>(nil)
            let made = MigrationSender(source: MicroVMGuestSource(machine: source), options: options) { _ in
                if cancels { sender.withLock { $0 }?.cancel() }
                Thread.sleep(forTimeInterval: 0.3) // long enough for the watchdog to act on the cancel or the budget
                return ours
            }
            sender.withLock { $0 = made }
            let finished = ReceiverResult()
            let reports = Locked<MigrationReport?>(nil)
            startThread(named: "sender-under-test") {
                let report = made.run()
                reports.withLock { $0 = report }
                finished.done.signal()
            }
            guard finished.done.wait(timeout: .now() + 30 * sanitizerSlowdown) == .success else {
                return XCTFail("\(cancels ? "cancelled" : "timed out"): the sender still waits on a channel nobody closed")
            }
            let report = try XCTUnwrap(reports.withLock { $0 })
            XCTAssertEqual(report.error, cancels ? "migration cancelled" : "did not converge: the time budget of 0.05 s ran out")
            withExtendedLifetime(silent) {}
            last = report
        }
        assertSourceIntact(source, console, Outcome(report: try XCTUnwrap(last), receiverError: nil, destination: nil,
                                                    destinationConsole: SerialConsole(output: nil)))
    }

    func testSenderFacingAPeerThatSpeaksGarbage() throws {
        let (source, console) = try bootSource(guest)
        let (ours, theirs) = SocketPairChannel.pair()
        let garbage = (0 ..< 65536).map { _ in UInt8.random(in: 0 ... 255) }
        try garbage.withUnsafeBytes { try theirs.send([$0]) }
        var options = plainOptions
        options.channels = 1
        let report = MigrationSender(source: MicroVMGuestSource(machine: source), channels: [ours], options: options).run()
        XCTAssertTrue(report.error?.contains("malformed stream") ?? false, report.error ?? "")
        assertSourceIntact(source, console, Outcome(report: report, receiverError: nil, destination: nil, destinationConsole: SerialConsole(output: nil)))
    }

    func testReceiverFacingGarbageDiscardsEverything() throws {
        for garbage in [
            (0 ..< 65536).map { _ in UInt8.random(in: 0 ... 255) },
            WireFormat.magic + [UInt8](repeating: 0xFF, count: 4096), // right magic, nonsense after it
        ] {
            let (ours, theirs) = SocketPairChannel.pair()
            let sink = MicroVMGuestSink(console: SerialConsole(output: nil))
            try garbage.withUnsafeBytes { try theirs.send([$0]) }
            theirs.close()
            XCTAssertThrowsError(try MigrationReceiver(sink: sink, channels: [ours]).run()) { error in
                XCTAssertTrue("\(error)".contains("malformed stream"), "\(error)")
            }
            XCTAssertNil(sink.machine)
        }
    }
}

/// A guest that dirties memory faster than the link carries it.
final class ConvergenceKVMTests: MigrationTestCase {
    let guest = "workload=memstress size_mib=16 rate_mib=100 pattern=random"

    func testThrottlingMakesAFastWriterConverge() throws {
        let (source, _) = try bootSource(guest)
        var options = MigrationOptions()
        options.compression = .none
        options.bandwidthLimit = 25e6
        options.autoConverge = true
        let outcome = migrate(source, options: options)
        XCTAssertTrue(outcome.report.succeeded, outcome.report.error ?? "")
        let throttles = outcome.report.passes.map(\.throttle)
        XCTAssertGreaterThan(throttles.max() ?? 0, 0, "converging needed the throttle: \(throttles)")
        let destination = try XCTUnwrap(outcome.destination)
        XCTAssertEqual(destination.throttle, 0, "the destination runs at full speed")
        XCTAssertEqual(statuses(outcome.destinationConsole, after: 0, count: 1).count, 1)
        destination.stop()
        source.stop()
    }

    func testWithoutAutoConvergeItGivesUpAndTheSourceRuns() throws {
        let (source, console) = try bootSource(guest)
        var options = MigrationOptions()
        options.compression = .none
        options.bandwidthLimit = 25e6
        options.autoConverge = false
        options.maxPasses = 5
        let outcome = migrate(source, options: options)
        XCTAssertTrue(outcome.report.error?.hasPrefix("did not converge") ?? false, outcome.report.error ?? "")
        XCTAssertTrue(outcome.receiverError.map { "\($0)".contains("did not converge") } ?? false, "the receiver learns why")
        XCTAssertNil(outcome.destination)
        XCTAssertNil(source.stopped)
        XCTAssertEqual(statuses(console, after: console.lineCount, count: 1).count, 1)
        source.stop()
    }
}
