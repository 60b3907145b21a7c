import Foundation
import KVMMigration
import MicroVM
import MigrationEngine
import MigrationWire
import TestSupport
import Threads
import XCTest

/// Migrations that finish in post-copy: the destination runs before its memory is complete, the pages it lacks come
/// on request or in the background, and the source stays paused until the last one is verified.
final class PostCopyKVMTests: MigrationTestCase {
    /// A guest rewriting its 128 MiB of random data at 800 MiB/s.
    let guest = "workload=memstress size_mib=128 rate_mib=800 pattern=random"

    func postCopyOptions(channels: Int) -> MigrationOptions {
        var options = MigrationOptions()
        options.channels = channels
        options.compression = .none
        options.postCopy = true
        options.postCopyAfterPasses = 1
        // Pre-copy alone would need a pause of tens of milliseconds: post-copy it is, after one pass.
        options.downtimeLimit = 0.001
        return options
    }

    func testAFastWriterFinishesInPostCopyAndVerifiesThroughout() throws {
        for channels in [1, 3] {
            let (source, _) = try bootSource(guest)
            let outcome = migrate(source, options: postCopyOptions(channels: channels))
            XCTAssertTrue(outcome.report.succeeded, "\(channels) channels: \(outcome.report.error ?? "")")
            XCTAssertNil(outcome.receiverError)
            // The sender returned only after the destination verified the last page; until then the source was paused.
            XCTAssertNil(source.stopped, "the source is left paused for its owner to stop")
            let postCopy = try XCTUnwrap(outcome.report.postCopy, "\(channels) channels: the migration finished in post-copy")
            XCTAssertGreaterThan(postCopy.missingPages, 0)
            XCTAssertEqual(outcome.receiverReport?.postCopyPages, postCopy.missingPages)
            XCTAssertEqual(outcome.receiverReport?.postCopyRequests, postCopy.requests, "one frame per request")
            XCTAssertLessThanOrEqual(postCopy.requestedPages, postCopy.requests, "a page asked for after it was pushed goes once")
            XCTAssertEqual(outcome.report.passes.count, 1, "one pre-copy pass, then post-copy")
            source.stop()
            let destination = try XCTUnwrap(outcome.destination)
            // Every status line the guest printed, during post-copy and after it, verified its memory.
            let printed = outcome.destinationConsole.receivedLines.filter { $0.hasPrefix("memstress") }.count
            XCTAssertEqual(statuses(outcome.destinationConsole, after: 0, count: printed + 2).count, printed + 2)
            destination.stop()
            let waits = outcome.receiverReport?.postCopyFaultWaits
            XCTAssertEqual(waits?.count ?? 0, outcome.receiverReport?.postCopyRequests, "every page asked for came")
            print("post-copy over \(channels) channel(s): \(postCopy.missingPages) pages missing at the start, \(postCopy.requestedPages) "
                  + "asked for in \(postCopy.requests) requests, \(String(format: "%.3f", postCopy.seconds)) s; downtime "
                  + String(format: "%.1f ms", (outcome.report.downtimeSeconds ?? 0) * 1000)
                  + (waits.map { String(format: "; faults waited p50 %.0f µs, p99 %.0f µs, max %.0f µs", $0.p50 * 1e6, $0.p99 * 1e6, $0.max * 1e6) } ?? ""))
        }
    }

    /// A digest that does not match once every page has come: the destination guest, already running, is stopped
    /// with the reason; the source, paused since the commit, stays paused and in doubt.
    func testADigestMismatchAfterPostCopyStopsTheDestinationGuest() throws {
        let (source, _) = try bootSource(guest)
        let outcome = migrate(source, options: postCopyOptions(channels: 2)) { sender, _ in sender.corruptDigestForTesting = true }
        XCTAssertFalse(outcome.report.succeeded)
        XCTAssertTrue(outcome.report.committed, "the destination had started")
        XCTAssertTrue(outcome.report.error?.contains("reason 5") ?? false, outcome.report.error ?? "")
        XCTAssertTrue("\(outcome.receiverError.map { "\($0)" } ?? "")".contains("digest mismatch"), "\(String(describing: outcome.receiverError))")
        XCTAssertNil(outcome.destination, "the destination guest was stopped and discarded")
        XCTAssertNil(source.stopped, "the source is paused, not stopped")
        source.stop()
    }

    /// A link cut during post-copy and no resume in time: the destination's guest cannot go on without the pages it
    /// lacks, so once its wait is over the destination stops it and says why; the source, paused since the commit
    /// with all of the guest's memory, reports the failure in doubt, and an operator who knows the destination's guest
    /// is gone may resume it, intact.
    func testALinkCutDuringPostCopyWithoutResumeStopsTheDestinationAndLeavesTheSourceIntact() throws {
        let (source, console) = try bootSource(guest)
        var options = postCopyOptions(channels: 2)
        options.postCopyRecoveryTimeout = 1
        let waited = Locked<[Double]>([])
        let outcome = migrate(source, options: options, prepare: { sender, channels in
            sender.onProgress = { progress in
                if progress.phase == .postcopy, channels[1].cutAfter == nil { channels[1].cutAfter = channels[1].sent + (1 << 20) }
            }
        }, configureReceiver: { receiver in
            receiver.postCopyRecoveryTimeout = 1
            receiver.onPostCopyPaused = { _, seconds in waited.withLock { $0.append(seconds) } }
        })
        XCTAssertFalse(outcome.report.succeeded)
        XCTAssertTrue(outcome.report.committed, "the cut came after the destination started")
        XCTAssertTrue(outcome.report.error?.contains("no resume came within 1.0 s") ?? false, outcome.report.error ?? "")
        XCTAssertTrue("\(outcome.receiverError.map { "\($0)" } ?? "")".contains("no resume came within 1.0 s"), "\(String(describing: outcome.receiverError))")
        let said = waited.withLock { $0 }
        XCTAssertEqual(said.count, 1, "the receiver said once how long it would wait")
        XCTAssertTrue(said.allSatisfy { $0 > 0.5 && $0 <= 1 }, "it waits what is left of its second: \(said)")
        XCTAssertNil(outcome.destination, "the destination guest was stopped and discarded")
        XCTAssertNil(source.stopped)
        let before = console.lineCount
        source.resume()
        XCTAssertEqual(statuses(console, after: before, count: 2).count, 2, "the source's memory is whole: it verifies")
        source.stop()
    }

    /// Post-copy recovery: the link cut at 10 %, 50 % and 90 % of what post-copy pushes, then resumed over new
    /// connections: the sides agree on what is still missing, and the guest carries on and verifies, nothing lost.
    /// At 50 % the first resume goes over a link that is down again: the sender waits anew, and the next one lands.
    func testALinkCutDuringPostCopyIsResumed() throws {
        for fraction in [0.1, 0.5, 0.9] {
            let (source, _) = try bootSource(guest)
            let pairs = (0 ..< 2).map { _ in SocketPairChannel.pair() }
            let console = SerialConsole(output: nil)
            let sink = MicroVMGuestSink(console: console)
            let receiver = MigrationReceiver(sink: sink, channels: pairs.map(\.1))
            let paused = Locked<[String]>([])
            receiver.onPostCopyPaused = { reason, _ in paused.withLock { $0.append(reason) } }
            let sender = MigrationSender(source: MicroVMGuestSource(machine: source), channels: pairs.map(\.0),
                                         options: postCopyOptions(channels: 2))
            let pauses = Locked(0)
            let failedFirst = fraction == 0.5
            sender.onProgress = { progress in
                if progress.phase == .postcopy, pairs[1].0.cutAfter == nil {
                    pairs[1].0.cutAfter = pairs[1].0.sent + Int(Double(progress.pagesTotal * 4096) * fraction)
                }
                guard progress.phase == .postcopyPaused else { return }
                let pause = pauses.withLock { count -> Int in
                    count += 1
                    return count
                }
                if failedFirst && pause == 1 {
                    let dead = (0 ..< 2).map { _ in SocketPairChannel.pair() }
                    for pair in dead { pair.1.close() }
                    XCTAssertTrue(sender.resume(with: dead.map(\.0)))
                    return
                }
                guard pause == (failedFirst ? 2 : 1) else { return }
                // Both ends wait for new connections; hand each its side as soon as it waits.
                let fresh = (0 ..< 2).map { _ in SocketPairChannel.pair() }
                startThread(named: "test-resume") {
                    while !receiver.resume(with: fresh.map(\.1)) { usleep(10_000) }
                }
                XCTAssertTrue(sender.resume(with: fresh.map(\.0)), "the sender waits for a resume as it says so")
            }
            let result = ReceiverResult()
            startThread(named: "test-receiver") {
                do { result.report = try receiver.run() } catch { result.error = error }
                result.done.signal()
            }
            let report = sender.run()
            result.done.wait()
            XCTAssertTrue(report.succeeded, "\(fraction): \(report.error ?? "")")
            XCTAssertNil(result.error, "\(fraction)")
            XCTAssertEqual(pauses.withLock { $0 }, failedFirst ? 2 : 1, "\(fraction): the link was cut during post-copy")
            XCTAssertEqual(paused.withLock { $0.count }, 1, "\(fraction): the receiver waited once")
            XCTAssertEqual(result.report?.postCopyPages, report.postCopy?.missingPages)
            source.stop()
            let destination = try XCTUnwrap(sink.machine)
            let printed = console.receivedLines.filter { $0.hasPrefix("memstress") }.count
            XCTAssertEqual(statuses(console, after: 0, count: printed + 2).count, printed + 2, "\(fraction): the guest verifies")
            destination.stop()
        }
    }

    /// A destination that does not offer post-copy (here: one on huge pages, which userfaultfd cannot fill 4 KiB at a
    /// time) is refused at negotiation, and the source runs on.
    func testADestinationWithoutPostCopyIsRefusedClearly() throws {
        let (source, console) = try bootSource(guest)
        let outcome = migrate(source, options: postCopyOptions(channels: 1),
                              receiverCapabilities: Capabilities(codecs: .all, maxChannels: 1, flags: [.passAcknowledgement, .descriptorChecksum]))
        XCTAssertFalse(outcome.report.succeeded)
        XCTAssertFalse(outcome.report.committed)
        XCTAssertTrue(outcome.report.error?.contains("cannot finish in post-copy") ?? false, outcome.report.error ?? "")
        XCTAssertNil(outcome.destination)
        XCTAssertEqual(statuses(console, after: console.lineCount, count: 1).count, 1, "the source runs on and verifies")
        source.stop()
    }
}
