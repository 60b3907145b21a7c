import Foundation
import KVMMigration
import MicroVM
import MigrationEngine
import MigrationWire
import TestSupport
import XCTest

/// A pre-copy whose link breaks leaves its memory at the destination for a while (stream.md §6.15); a migration that
/// resumes it sends only what the destination lacks or holds in an older version, and every page the destination kept
/// must still be the guest's, which the guest checks itself.
final class ResumablePreCopyKVMTests: MigrationTestCase {
    var plainOptions: MigrationOptions {
        var options = MigrationOptions()
        options.channels = 2
        options.compression = .none
        return options
    }

    /// Cuts channel 0 after `bytes`, with the receiver keeping what it got on `shelf`; the source must run on.
    func breakMigration(of source: MicroVM, afterBytes bytes: Int, shelf: PreCopyLeftoverShelf,
                        file: StaticString = #filePath, line: UInt = #line) throws -> ResumeTicket {
        var receiver: MigrationReceiver?
        let outcome = migrate(source, options: plainOptions, leftoverShelf: shelf, prepare: { _, channels in channels[0].cutAfter = bytes },
                              configureReceiver: { receiver = $0 })
        XCTAssertFalse(outcome.report.succeeded, file: file, line: line)
        XCTAssertEqual(outcome.report.passes.count, 0, "the cut falls inside pass 0", file: file, line: line)
        XCTAssertNil(outcome.destination, file: file, line: line)
        XCTAssertNil(source.stopped, "the source runs on", file: file, line: line)
        XCTAssertEqual(receiver?.keptForResume, true, "\(String(describing: outcome.receiverError))", file: file, line: line)
        return try XCTUnwrap(outcome.report.resumeTicket, file: file, line: line)
    }

    /// The case: a 1 GiB guest with 512 MiB written at 50 MiB/s, the link cut at 90 % of pass 0, then resumed.
    func testResumeAfterACutAt90PercentOfPassZeroSendsAFifthOfAFreshMigration() throws {
        let (source, _) = try bootSource("workload=memstress size_mib=512 rate_mib=50 pattern=random", memory: 1 << 30,
                                               writtenPages: 131_072, timeout: 30)
        // The yardstick: a fresh migration of the same guest, whose destination is then let go; the source runs on.
        let fresh = migrate(source, options: plainOptions)
        XCTAssertTrue(fresh.report.succeeded, fresh.report.error ?? "")
        fresh.destination?.stop()
        source.resume()
        let passZeroPerChannel = try XCTUnwrap(fresh.report.passes.first).wireBytes / 2

        let shelf = PreCopyLeftoverShelf(gracePeriod: 60)
        let ticket = try breakMigration(of: source, afterBytes: passZeroPerChannel * 9 / 10, shelf: shelf)
        let kept = try XCTUnwrap(shelf.contents.first)
        XCTAssertEqual(kept.ticket, ticket)
        XCTAssertGreaterThan(kept.heldPages, 100_000, "about 90 % of the 131072 pages written")

        var options = plainOptions
        options.resumeTicket = ticket
        let resumed = migrate(source, options: options, leftoverShelf: shelf)
        XCTAssertTrue(resumed.report.succeeded, resumed.report.error ?? "")
        XCTAssertEqual(resumed.report.resumedPreCopy?.resumed, true, "\(String(describing: resumed.report.resumedPreCopy))")
        XCTAssertEqual(resumed.report.resumedPreCopy?.heldPages, kept.heldPages)
        XCTAssertGreaterThan(try XCTUnwrap(resumed.report.passes.first).unchangedPages, kept.heldPages / 2, "kept pages are not sent again")
        // What the resume sends is the tenth of pass 0 that never went, plus every page the guest rewrote (at 50 MiB/s)
        // between its copy in the broken pass and its hash in the resumed one: a window that this unoptimized build
        // stretches. The release benchmark (`migration-bench --resume`) holds the bound of 20 %; a test allows 30 %.
        XCTAssertLessThanOrEqual(Double(resumed.report.wireBytes), 0.3 * Double(fresh.report.wireBytes),
                                 "resumed \(resumed.report.wireBytes) bytes, fresh \(fresh.report.wireBytes)")
        XCTAssertTrue(shelf.contents.isEmpty, "the resume took the kept memory")
        source.stop()
        let destination = try XCTUnwrap(resumed.destination)
        XCTAssertEqual(statuses(resumed.destinationConsole, after: 0, count: 2).count, 2, "the guest verifies its memory at the destination")
        destination.stop()
    }

    /// Kept memory that is gone (its grace period ended) cannot be resumed: the migration sends all of memory and says why.
    func testResumeAfterTheGracePeriodFallsBackToAFullMigration() throws {
        let (source, _) = try bootSource("workload=memstress size_mib=64 rate_mib=50 pattern=random", writtenPages: 16384)
        let shelf = PreCopyLeftoverShelf(gracePeriod: 0.3)
        let ticket = try breakMigration(of: source, afterBytes: 16 << 20, shelf: shelf)
        XCTAssertEqual(shelf.contents.count, 1)
        Thread.sleep(forTimeInterval: 1)
        XCTAssertTrue(shelf.contents.isEmpty, "the grace period ended")

        var options = plainOptions
        options.resumeTicket = ticket
        let (outcome, destination) = try migrateSuccessfully(source, options: options, leftoverShelf: shelf, lines: 2)
        XCTAssertEqual(outcome.report.resumedPreCopy?.resumed, false)
        XCTAssertTrue(outcome.report.resumedPreCopy?.reason?.contains("keeps nothing") ?? false, "\(String(describing: outcome.report.resumedPreCopy))")
        XCTAssertEqual(outcome.report.passes.first?.unchangedPages, 0)
        XCTAssertGreaterThan(outcome.report.passes.first?.wireBytes ?? 0, 64 << 20, "all of memory went")
        destination.stop()
    }

    /// A resume that names another guest's kept memory (a caller that mixed up its tickets) cannot put that guest's
    /// pages into this one: only pages equal to this guest's, byte for byte, stay, and this guest verifies every page.
    /// A migration that is not a resume drops what its peer left.
    func testAResumeAgainstAnotherGuestsLeftoversKeepsNoneOfItsPages() throws {
        let shelf = PreCopyLeftoverShelf(gracePeriod: 60)
        let (other, _) = try bootSource("workload=memstress size_mib=64 rate_mib=50 pattern=random seed=1", writtenPages: 16384)
        let othersTicket = try breakMigration(of: other, afterBytes: 30 << 20, shelf: shelf)
        other.stop()
        let heldOfOther = try XCTUnwrap(shelf.contents.first).heldPages

        let (source, _) = try bootSource("workload=memstress size_mib=64 rate_mib=50 pattern=random seed=2", writtenPages: 16384)
        var options = plainOptions
        options.resumeTicket = othersTicket
        let (outcome, destination) = try migrateSuccessfully(source, options: options, leftoverShelf: shelf, lines: 2)
        XCTAssertEqual(outcome.report.resumedPreCopy?.resumed, true, "the ticket and layout match: the pages decide")
        let reused = try XCTUnwrap(outcome.report.passes.first).unchangedPages
        XCTAssertLessThan(reused, heldOfOther / 10, "only pages both guests hold alike (code, page tables) are kept; of \(heldOfOther)")
        XCTAssertGreaterThan(outcome.report.passes.first?.wireBytes ?? 0, 60 << 20, "the working set went again")
        destination.stop()

        // What a guest leaves is dropped when another migration from the same peer starts.
        let (third, _) = try bootSource("workload=memstress size_mib=64 rate_mib=50 pattern=random seed=3", writtenPages: 16384)
        _ = try breakMigration(of: third, afterBytes: 16 << 20, shelf: shelf)
        XCTAssertEqual(shelf.contents.count, 1)
        let (next, nextDestination) = try migrateSuccessfully(third, options: plainOptions, leftoverShelf: shelf)
        XCTAssertNil(next.report.resumedPreCopy)
        XCTAssertTrue(shelf.contents.isEmpty, "a migration that does not resume drops what its peer left")
        nextDestination.stop()
    }
}

extension ResumablePreCopyKVMTests {
    /// A source that will not resume says so, and the destination drops what it kept at once: a resume after that finds
    /// nothing and sends all of memory.
    func testTheSourceCanTellTheDestinationToDropWhatItKept() throws {
        let (source, _) = try bootSource("workload=memstress size_mib=64 rate_mib=50 pattern=random", writtenPages: 16384)
        let shelf = PreCopyLeftoverShelf(gracePeriod: 60)
        let ticket = try breakMigration(of: source, afterBytes: 16 << 20, shelf: shelf)
        XCTAssertEqual(shelf.contents.count, 1)

        let (near, far) = SocketPairChannel.pair()
        let receiver = MigrationReceiver(sink: MicroVMGuestSink(console: SerialConsole(output: nil)), channels: [far],
                                         leftoverShelf: shelf, peer: "the test's source")
        let result = ReceiverResult()
        Thread {
            do { result.report = try receiver.run() } catch { result.error = error }
            result.done.signal()
        }.start()
        XCTAssertTrue(try MigrationSender.discardKeptMemory(under: ticket, layout: MicroVMGuestSource(machine: source).layout) { _ in near })
        result.done.wait()
        XCTAssertNil(result.error)
        XCTAssertEqual(result.report?.droppedKeptMemory, true)
        XCTAssertTrue(shelf.contents.isEmpty, "the kept memory is gone")

        var options = plainOptions
        options.resumeTicket = ticket
        let (outcome, destination) = try migrateSuccessfully(source, options: options, leftoverShelf: shelf)
        XCTAssertEqual(outcome.report.resumedPreCopy?.resumed, false)
        destination.stop()
    }
}
