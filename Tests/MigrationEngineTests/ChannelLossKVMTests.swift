import Foundation
import KVMMigration
import MicroVM
import MigrationEngine
import MigrationWire
import TestSupport
import XCTest

/// A migration over four channels that loses a secondary one during pre-copy (stream.md §6.16): the others take over
/// its pages, the migration completes on three, the digests agree and the guest verifies all its memory at the
/// destination. A channel that may not be lost (channel 0, one in the final pass, any without the receiver's
/// agreement) fails the migration, and the source runs on.
final class ChannelLossKVMTests: MigrationTestCase {
    /// 64 MiB of incompressible pages, written in full before the migration and rewritten at 50 MiB/s: sent raw, pass 0
    /// carries about 16 MiB on each channel.
    let guest = "workload=memstress size_mib=64 rate_mib=50 pattern=random"
    let workingSetPages = 16384

    var fourChannels: MigrationOptions {
        var options = MigrationOptions()
        options.channels = 4
        options.compression = .none
        return options
    }

    /// The migration lost `channel` alone, both sides say so, a pre-copy pass after the loss sent its pages again, and
    /// the guest runs at the destination and verifies all its memory there. Stops both guests.
    func assertCompleted(_ outcome: Outcome, from source: MicroVM, losing channel: Int, file: StaticString = #filePath,
                         line: UInt = #line) throws {
        XCTAssertTrue(outcome.report.succeeded, outcome.report.error ?? "", file: file, line: line)
        XCTAssertNil(outcome.receiverError, file: file, line: line)
        XCTAssertEqual(outcome.report.channels, 4, file: file, line: line)
        XCTAssertEqual(outcome.report.lostChannels.map(\.channel), [channel], "the sender's report", file: file, line: line)
        XCTAssertEqual(outcome.receiverReport?.lostChannels.map(\.channel), [channel], "the receiver's report", file: file, line: line)
        let lostIn = try XCTUnwrap(outcome.report.lostChannels.first?.pass, file: file, line: line)
        let passes = outcome.report.passes
        // The pass of the loss, the pass that took over, the final one.
        XCTAssertGreaterThanOrEqual(passes.count, lostIn + 3, file: file, line: line)
        if passes.count > lostIn + 1 {
            XCTAssertGreaterThanOrEqual(passes[lostIn + 1].pagesSent, workingSetPages / 4, "the lost channel's quarter of the working set went again",
                                        file: file, line: line)
        }
        source.stop()
        let destination = try XCTUnwrap(outcome.destination, file: file, line: line)
        XCTAssertEqual(statuses(outcome.destinationConsole, after: 0, count: 2).count, 2, file: file, line: line)
        destination.stop()
        print("lost \(outcome.report.lostChannels), pages per pass \(passes.map(\.pagesSent))")
    }

    func testAChannelCutDuringPassZeroIsTakenOverByTheOthers() throws {
        let (source, _) = try bootSource(guest, writtenPages: workingSetPages)
        let outcome = migrate(source, options: fourChannels) { _, channels in channels[2].cutAfter = 8 << 20 }
        let lost = try XCTUnwrap(outcome.report.lostChannels.first)
        XCTAssertEqual(lost.pass, 0)
        XCTAssertTrue(lost.reason.contains("connection cut"), lost.reason)
        try assertCompleted(outcome, from: source, losing: 2)
    }

    /// Onto huge pages, pages are received straight into guest memory: the cut tears a batch's payload there, and the
    /// pages it left half written come again with the rest of the lost channel's.
    func testAChannelCutInsideAPayloadReceivedInPlaceIsTakenOverByTheOthers() throws {
        try requireFreeHugePages(128)
        let (source, _) = try bootSource(guest, writtenPages: workingSetPages)
        let outcome = migrate(source, options: fourChannels, destinationBacking: .hugePages) { _, channels in
            channels[2].cutAfter = (8 << 20) + 1000 // 1000 bytes into a batch's payload
        }
        XCTAssertGreaterThan(outcome.receiverReport?.pagesReceivedInPlace ?? 0, workingSetPages / 2)
        try assertCompleted(outcome, from: source, losing: 2)
    }

    /// The guest keeps dirtying its memory; the cut comes 64 KiB into pass 1 on channel 2, which the bandwidth cap makes
    /// long enough to be sure it falls inside that pass.
    func testAChannelCutDuringALaterPassIsTakenOverByTheOthers() throws {
        let (source, _) = try bootSource(guest, writtenPages: workingSetPages)
        var options = fourChannels
        options.bandwidthLimit = 100e6
        let outcome = migrate(source, options: options) { sender, channels in
            sender.onProgress = { progress in
                if progress.phase == .precopy, progress.pass == 1, channels[2].cutAfter == nil {
                    channels[2].cutAfter = channels[2].sent + (64 << 10)
                }
            }
        }
        let lost = try XCTUnwrap(outcome.report.lostChannels.first)
        XCTAssertEqual(lost.pass, 1)
        try assertCompleted(outcome, from: source, losing: 2)
    }

    /// The receiver notices first: it stops reading channel 2 and says so. Either its close reaches the sender too (the
    /// receiver died), or the link was cut only on its way to the receiver and the sender's writes there go on
    /// succeeding: then the sender learns of the loss from the reply stream alone, before its next pass.
    func testAChannelTheReceiverStopsReadingIsTakenOverByTheOthers() throws {
        for oneWay in [false, true] {
            let (source, _) = try bootSource(guest, writtenPages: workingSetPages)
            let outcome = migrate(source, options: fourChannels, configureReceiver: { receiver in
                let channel = receiver.channels[2] as? SocketPairChannel
                if oneWay { channel?.deafAfterReceiving = 8 << 20 } else { channel?.dieAfterReceiving = 8 << 20 }
            })
            XCTAssertEqual(outcome.report.lostChannels.first?.pass, 0)
            let atReceiver = outcome.receiverReport?.lostChannels ?? []
            XCTAssertTrue(atReceiver.first?.reason.contains("after 8") ?? false, "\(atReceiver)")
            if oneWay { XCTAssertEqual(outcome.report.lostChannels.first?.reason, "the destination lost it") }
            try assertCompleted(outcome, from: source, losing: 2)
        }
    }

    /// A migration that lost a channel and finishes in post-copy: pages asked for and pushed go on the channels left.
    func testAMigrationThatLostAChannelFinishesInPostCopy() throws {
        let (source, _) = try bootSource("workload=memstress size_mib=128 rate_mib=800 pattern=random")
        var options = fourChannels
        options.channels = 3
        options.postCopy = true
        options.postCopyAfterPasses = 1
        options.downtimeLimit = 0.001
        let outcome = migrate(source, options: options) { _, channels in channels[2].cutAfter = 16 << 20 }
        XCTAssertTrue(outcome.report.succeeded, outcome.report.error ?? "")
        XCTAssertNil(outcome.receiverError)
        XCTAssertEqual(outcome.report.lostChannels.map(\.channel), [2])
        XCTAssertGreaterThan(outcome.report.postCopy?.missingPages ?? 0, 0, "finished in post-copy")
        XCTAssertEqual(outcome.report.passes.count, 2, "pass 0, which lost the channel, and the pass that took over; then post-copy")
        source.stop()
        let destination = try XCTUnwrap(outcome.destination)
        XCTAssertEqual(statuses(outcome.destinationConsole, after: 0, count: 2).count, 2)
        destination.stop()
    }

    /// A pre-copy that lost a channel in pass 0 and then broke in pass 1, while the others took over its pages
    /// (stream.md §6.15): the destination keeps what it holds, the lost channel's pages out of it until they came again,
    /// and a resume sends what it lacks; the guest verifies all its memory.
    func testAPreCopyThatLostAChannelAndThenBrokeIsResumed() throws {
        let (source, _) = try bootSource(guest, writtenPages: workingSetPages)
        let shelf = PreCopyLeftoverShelf(gracePeriod: 60)
        let broken = migrate(source, options: fourChannels, leftoverShelf: shelf) { sender, channels in
            channels[2].cutAfter = 4 << 20
            sender.onProgress = { progress in
                if progress.phase == .precopy, progress.pass == 1, channels[0].cutAfter == nil { channels[0].cutAfter = channels[0].sent + (1 << 20) }
            }
        }
        XCTAssertFalse(broken.report.succeeded)
        XCTAssertEqual(broken.report.lostChannels.map(\.channel), [2])
        XCTAssertEqual(broken.report.passes.count, 1, "the break came in pass 1")
        XCTAssertNil(source.stopped, "the source runs on")
        let kept = try XCTUnwrap(shelf.contents.first)
        var options = fourChannels
        options.resumeTicket = try XCTUnwrap(broken.report.resumeTicket)
        let (resumed, destination) = try migrateSuccessfully(source, options: options, leftoverShelf: shelf, lines: 2)
        XCTAssertEqual(resumed.report.resumedPreCopy?.heldPages, kept.heldPages)
        XCTAssertGreaterThan(resumed.report.passes.first?.unchangedPages ?? 0, 0, "kept pages are not sent again")
        destination.stop()
    }

    func testWithoutTheReceiversAgreementALostChannelFailsTheMigration() throws {
        let (source, console) = try bootSource(guest, writtenPages: workingSetPages)
        let older = Capabilities(codecs: .all, maxChannels: 4, flags: [.wholeBatchCompression, .passAcknowledgement, .descriptorChecksum])
        let outcome = migrate(source, options: fourChannels, receiverCapabilities: older) { _, channels in channels[2].cutAfter = 8 << 20 }
        XCTAssertTrue(outcome.report.error?.contains("channel failed") ?? false, outcome.report.error ?? "")
        XCTAssertEqual(outcome.report.lostChannels, [])
        XCTAssertNotNil(outcome.receiverError)
        assertSourceIntact(source, console, outcome)
    }

    func testLosingChannelZeroFailsTheMigration() throws {
        let (source, console) = try bootSource(guest, writtenPages: workingSetPages)
        let outcome = migrate(source, options: fourChannels) { _, channels in channels[0].cutAfter = 8 << 20 }
        XCTAssertTrue(outcome.report.error?.contains("channel failed") ?? false, outcome.report.error ?? "")
        XCTAssertEqual(outcome.report.lostChannels, [])
        XCTAssertEqual(outcome.report.passes.count, 0, "the cut falls inside pass 0")
        XCTAssertNotNil(outcome.receiverError)
        assertSourceIntact(source, console, outcome)
    }

    /// The final pass needs every channel it runs on: a channel cut once the source is paused fails the migration.
    func testLosingAChannelInTheFinalPassFailsTheMigration() throws {
        let (source, console) = try bootSource(guest)
        let outcome = migrate(source, options: fourChannels) { sender, channels in
            sender.onProgress = { progress in
                if progress.phase == .switchover, channels[2].cutAfter == nil { channels[2].cutAfter = channels[2].sent }
            }
        }
        XCTAssertNotNil(outcome.report.passes.last, "pre-copy ran")
        XCTAssertEqual(outcome.report.lostChannels, [])
        assertSourceIntact(source, console, outcome)
    }
}
