import Foundation
import KVMMigration
import MicroVM
import MigrationEngine
import MigrationWire
import TestSupport
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

    /// A link cut during post-copy, with no resume (not built yet): the destination's guest cannot go on without the
    /// pages it lacks, so the destination stops it and says why; the source, paused since the commit with all of the
    /// guest's memory, reports the failure in doubt, and an operator who knows the destination's guest is gone may
    /// resume it, intact.
    func testALinkCutDuringPostCopyStopsTheDestinationAndLeavesTheSourceIntact() throws {
        let (source, console) = try bootSource(guest)
        let outcome = migrate(source, options: postCopyOptions(channels: 2)) { sender, channels in
            sender.onProgress = { progress in
                if progress.phase == .postcopy, channels[1].cutAfter == nil { channels[1].cutAfter = channels[1].sent + (1 << 20) }
            }
        }
        XCTAssertFalse(outcome.report.succeeded)
        XCTAssertTrue(outcome.report.committed, "the cut came after the destination started")
        XCTAssertNotNil(outcome.receiverError)
        XCTAssertNil(outcome.destination, "the destination guest was stopped and discarded")
        XCTAssertNil(source.stopped)
        let before = console.lineCount
        source.resume()
        XCTAssertEqual(statuses(console, after: before, count: 2).count, 2, "the source's memory is whole: it verifies")
        source.stop()
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
