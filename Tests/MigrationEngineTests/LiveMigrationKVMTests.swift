import Foundation
import KVMMigration
import MicroVM
import MigrationEngine
import MigrationWire
import TestSupport
import XCTest

/// Live migrations between two MicroVMs in this process: the guest keeps writing while it moves, and checks
/// from inside that nothing was lost.
final class LiveMigrationKVMTests: MigrationTestCase {
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

    /// Uncompressed pages leave straight from the memory of a guest that rewrites them all the time: a page the
    /// guest changes while it is sent arrives torn and goes again in a later pass, and the digests agree, and the
    /// destination starts, only if every page's last version arrived whole.
    func testUncompressedPagesLeaveFromTheMemoryOfAWritingGuest() throws {
        let (source, _) = try bootSource("workload=memstress size_mib=32 rate_mib=400 pattern=random")
        var options = MigrationOptions()
        options.channels = 2
        options.compression = .none
        options.unchangedPages = false // with it, pages leave from copies (stream.md §6.4.1)
        let (outcome, destination) = try migrateSuccessfully(source, options: options, lines: 2)
        XCTAssertGreaterThan(outcome.report.passes.count, 1, "the guest dirtied pages during pass 0")
        destination.stop()
    }

    /// A guest that rewrites 90 % of the pages it writes with the bytes they hold (stream.md §6.4.1): pass 0 sends
    /// every page, later passes send most dirty pages as unchanged descriptors, the receiver leaves them alone, the
    /// digests agree and the guest verifies all its memory at the destination. Then on to a receiver that does not
    /// offer the option, as an older one would not: no unchanged pages, and the guest moves all the same.
    func testIdenticalRewritesTravelAsUnchangedPages() throws {
        let (source, _) = try bootSource("workload=memstress size_mib=64 rate_mib=200 pattern=random same_pct=90", writtenPages: 16384)
        var options = MigrationOptions()
        options.channels = 2
        options.compression = .none
        let (outcome, middle) = try migrateSuccessfully(source, options: options, lines: 2)
        let passes = outcome.report.passes
        XCTAssertGreaterThan(passes.count, 1, "the guest dirtied pages during pass 0")
        XCTAssertEqual(passes[0].unchangedPages, 0, "nothing is unchanged in pass 0")
        let later = passes.dropFirst()
        let unchanged = later.reduce(0) { $0 + $1.unchangedPages }
        let withContent = later.reduce(0) { $0 + $1.pagesSent - $1.zeroPages }
        XCTAssertGreaterThan(Double(unchanged), 0.5 * Double(withContent),
                             "\(unchanged) of \(withContent) pages of later passes unchanged; the guest rewrites 90 % identically")
        XCTAssertEqual(outcome.receiverReport?.pagesUnchanged, unchanged, "the receiver counts what the sender declared")
        print("unchanged pages per pass: \(passes.map(\.unchangedPages)), wire bytes per pass: \(passes.map(\.wireBytes))")

        let withoutOption = Capabilities(codecs: .all, maxChannels: 2, flags: [.wholeBatchCompression, .passAcknowledgement, .descriptorChecksum])
        let (older, last) = try migrateSuccessfully(middle, options: options, receiverCapabilities: withoutOption, lines: 2)
        XCTAssertEqual(older.report.passes.reduce(0) { $0 + $1.unchangedPages }, 0, "not agreed, not used")
        XCTAssertEqual(older.receiverReport?.pagesUnchanged, 0)
        last.stop()
    }

    /// Onto huge pages, where pages are received straight into guest memory, unchanged pages are left in place.
    func testUnchangedPagesOntoHugePages() throws {
        let size: UInt64 = 128 << 20
        try requireFreeHugePages(size / GuestMemory.hugePageSize)
        let (source, _) = try bootSource("workload=memstress size_mib=64 rate_mib=200 pattern=random same_pct=90", memory: size,
                                         writtenPages: 16384)
        var options = MigrationOptions()
        options.channels = 2
        options.compression = .none
        let (outcome, destination) = try migrateSuccessfully(source, options: options, destinationBacking: .hugePages, lines: 2)
        XCTAssertGreaterThan(outcome.receiverReport?.pagesUnchanged ?? 0, 0)
        XCTAssertGreaterThan(outcome.receiverReport?.pagesReceivedInPlace ?? 0, 16384 - 1)
        destination.stop()
    }

    /// Onto huge pages, uncompressed pages are received straight into guest memory; batches compressed as a
    /// whole by adaptive compression, written by the channel's writer thread, mix with them; for a receiver that
    /// does not take whole-batch compression, pages compressed one by one are expanded into place. The guest
    /// writes throughout and verifies after each move. Onto shared memory pages go through the memfd instead.
    func testPagesArriveInPlaceOnHugePages() throws {
        let size: UInt64 = 128 << 20
        try requireFreeHugePages(3 * (size / GuestMemory.hugePageSize)) // three guests on huge pages at most
        let (source, _) = try bootSource("workload=memstress size_mib=64 rate_mib=100 pattern=mixed", memory: size)
        var options = MigrationOptions()
        options.channels = 2
        options.compression = .none
        let (plain, middle) = try migrateSuccessfully(source, options: options, destinationBacking: .hugePages, lines: 2)
        let written = try XCTUnwrap(plain.receiverReport)
        XCTAssertGreaterThan(written.pagesReceivedInPlace, 16384, "64 MiB of raw pages in place")

        options.compression = .adaptive
        let (adaptive, second) = try migrateSuccessfully(middle, options: options, destinationBacking: .hugePages, lines: 2)
        XCTAssertGreaterThan(adaptive.receiverReport?.pagesWritten ?? 0, 16384)

        options.compression = .lz4
        let pageByPage = Capabilities(codecs: .all, maxChannels: 2, flags: [.descriptorChecksum, .passAcknowledgement])
        let (perPage, third) = try migrateSuccessfully(second, options: options, receiverCapabilities: pageByPage,
                                                       destinationBacking: .hugePages, lines: 2)
        let compressedPages = perPage.report.passes[0].compressedPages
        XCTAssertGreaterThan(compressedPages, 4096, "mixed pages compress one by one")
        XCTAssertGreaterThan(perPage.receiverReport?.pagesReceivedInPlace ?? 0, compressedPages, "all in place, raw ones too")

        options.compression = .none
        let (toShared, home) = try migrateSuccessfully(third, options: options, lines: 2)
        XCTAssertEqual(home.memory.backing, .sharedMemory)
        XCTAssertEqual(toShared.receiverReport?.pagesReceivedInPlace, 0, "shared memory takes pages through the memfd")
        home.stop()
    }

    /// The destination holds memory for the non-zero pages only: pass 0 leaves out the populated pages of zeros it
    /// finds (the destination's memory starts as holes), and the receiver writes through the memfd, which touches
    /// nothing else. (Pages that become zero in a later pass are punched out: PageWriterTests.)
    func testDestinationHoldsMemoryOnlyForNonZeroPages() throws {
        let (source, _) = try bootSource("workload=memstress size_mib=32 rate_mib=0 pattern=text")
        let (outcome, destination) = try migrateSuccessfully(source, options: MigrationOptions())
        defer { destination.stop() }
        func pages(_ memory: GuestMemory) throws -> Int { try memory.dataRanges().reduce(0) { $0 + $1.count } / 4096 }
        let populatedAtSource = try pages(source.memory)
        let zeroPagesFound = outcome.report.passes.reduce(0) { $0 + $1.zeroPages }
        XCTAssertGreaterThan(zeroPagesFound, 64, "the guest has populated pages of zeros")
        // The running guest may touch a few pages of its own after the start (stack, status line).
        let slack = 32
        let atDestination = try pages(destination.memory)
        XCTAssertLessThanOrEqual(atDestination, populatedAtSource - zeroPagesFound + slack,
                                 "source \(populatedAtSource) populated, \(zeroPagesFound) of them zero; destination \(atDestination)")
    }

    /// A guest on 2 MiB pages moves, while writing, to a destination on 2 MiB pages, and from there to one on
    /// shared memory: each end's memory is its own choice, and the guest verifies after both moves. The first
    /// move tracks dirty pages with the bitmap, the second (from the middle VM) with the dirty ring.
    func testGuestMovesOntoHugePagesAndOffThemAgain() throws {
        let size: UInt64 = 256 << 20
        let pages = size / GuestMemory.hugePageSize
        try requireFreeHugePages(2 * pages)
        let (source, sourceConsole) = try bootSource("workload=memstress size_mib=64 rate_mib=100 pattern=mixed",
                                                     memory: size, backing: .hugePages)
        let before = MemstressStatus(sourceConsole.receivedLines.last { $0.contains("verify=ok") }!)!
        var options = MigrationOptions()
        options.channels = 2
        options.compression = .lz4
        let (there, middle) = try migrateSuccessfully(source, options: options, destinationBacking: .hugePages,
                                                      destinationTracking: .defaultRing, lines: 2)
        XCTAssertEqual(middle.memory.backing, .hugePages)
        XCTAssertEqual(middle.dirtyTracker.method, .defaultRing)
        let atMiddle = statuses(there.destinationConsole, after: 0, count: 1)
        XCTAssertGreaterThan(atMiddle.last?.ticks ?? 0, before.ticks, "ticks carry on on huge pages")
        // Only the pages written hold memory: the guest's 64 MiB working set and its boot pages, not all 256 MiB.
        let resident = try middle.memory.dataRanges().reduce(0) { $0 + $1.count }
        XCTAssertLessThan(resident, Int(size) / 2, "\(resident) bytes of huge pages hold data")
        let (_, back) = try migrateSuccessfully(middle, options: options, destinationBacking: .sharedMemory, lines: 2)
        XCTAssertEqual(back.memory.backing, .sharedMemory)
        back.stop()
    }

    /// There with zstd, back with adaptive compression: the guest moves twice and still verifies.
    func testThereWithZstdAndBackWithAdaptiveCompression() throws {
        let (source, _) = try bootSource("workload=memstress size_mib=32 rate_mib=100 pattern=text")
        var options = MigrationOptions()
        options.compression = .zstd
        let there = migrate(source, options: options)
        XCTAssertTrue(there.report.succeeded, there.report.error ?? "")
        source.stop()
        let middle = try XCTUnwrap(there.destination)
        let atMiddle = statuses(there.destinationConsole, after: 0, count: 1)
        XCTAssertGreaterThan(there.report.passes[0].compressedPages, 0, "text pages compress with zstd")

        options.compression = .adaptive
        options.channels = 2
        let back = migrate(middle, options: options)
        XCTAssertTrue(back.report.succeeded, back.report.error ?? "")
        middle.stop()
        let home = try XCTUnwrap(back.destination)
        let atHome = statuses(back.destinationConsole, after: 0, count: 2)
        XCTAssertEqual(atHome.count, 2)
        XCTAssertGreaterThan(atHome.last!.ticks, atMiddle.last!.ticks)
        home.stop()
    }

    /// Text compresses far better as whole batches than page by page (pages share their words); a receiver that
    /// does not take whole-batch compression still gets compressed pages, one by one.
    func testBatchesCompressAsAWholeUnlessTheReceiverDeclines() throws {
        let (source, _) = try bootSource("workload=memstress size_mib=32 rate_mib=0 pattern=text")
        var options = MigrationOptions()
        options.compression = .zstd
        let (perPage, middle) = try migrateSuccessfully(source, options: options,
                                                        receiverCapabilities: Capabilities(codecs: .all, maxChannels: 1))
        let (wholeBatches, home) = try migrateSuccessfully(middle, options: options, lines: 2)
        home.stop()

        let (pagesA, pagesB) = (perPage.report.passes[0], wholeBatches.report.passes[0])
        XCTAssertGreaterThan(pagesA.compressedPages, 8000, "32 MiB of text compresses page by page")
        XCTAssertGreaterThan(pagesB.compressedPages, 8000, "and as whole batches")
        XCTAssertLessThan(pagesB.wireBytes * 3, pagesA.wireBytes,
                          "whole batches: \(pagesB.wireBytes) bytes on the wire, page by page: \(pagesA.wireBytes)")
    }

    /// Under a bandwidth cap the link is what the cap allows, however fast the socket: adaptive compression
    /// then compresses text rather than sending it raw at the capped rate.
    func testAdaptiveCompressionCompressesUnderABandwidthCap() throws {
        let (source, _) = try bootSource("workload=memstress size_mib=32 rate_mib=0 pattern=text")
        var options = MigrationOptions()
        options.compression = .adaptive
        options.bandwidthLimit = 100e6
        let (outcome, destination) = try migrateSuccessfully(source, options: options)
        destination.stop()
        let passZero = outcome.report.passes[0]
        XCTAssertGreaterThan(passZero.compressedPages, (passZero.pagesSent - passZero.zeroPages) / 2,
                             "pass 0: \(passZero.compressedPages) of \(passZero.pagesSent - passZero.zeroPages) pages compressed")
    }

    /// Connections of one migration reach a listener in any order; their stream headers put them in place.
    func testChannelsArrivingOutOfOrderAreSortedByTheirHeaders() throws {
        let (source, _) = try bootSource("workload=memstress size_mib=16 rate_mib=50")
        var options = MigrationOptions()
        options.channels = 3
        let pairs = (0 ..< 3).map { _ in SocketPairChannel.pair() }
        let sender = MigrationSender(source: MicroVMGuestSource(machine: source), channels: pairs.map(\.0), options: options)
        let reportBox = ReportBox()
        Thread { reportBox.report = sender.run(); reportBox.done.signal() }.start()
        var arrivals: [MigrationChannel] = [pairs[2].1, pairs[0].1, pairs[1].1]
        let channels = try IncomingChannels.collect { arrivals.removeFirst() }
        XCTAssertTrue(channels.count == 3 && arrivals.isEmpty)
        let sink = MicroVMGuestSink(console: SerialConsole(output: nil))
        _ = try MigrationReceiver(sink: sink, channels: channels).run()
        reportBox.done.wait()
        XCTAssertEqual(reportBox.report?.succeeded, true, reportBox.report?.error ?? "")
        XCTAssertNotNil(sink.machine)
        sink.machine?.stop()
        source.stop()
    }
}

final class ReportBox: @unchecked Sendable {
    var report: MigrationReport?
    let done = DispatchSemaphore(value: 0)
}

/// A receiver slower than the link: the sender must not pause the guest while the receiver still works through
/// what it was sent. With pass acknowledgements (stream.md §6.12) it waits for them; without, the backlog lands
/// in the downtime.
final class ReceiverBacklogKVMTests: MigrationTestCase {
    /// MicroVM memory behind a sink that takes `delay` for every page it is asked to write.
    final class SlowSink: GuestSink {
        let base: MicroVMGuestSink
        let delay: useconds_t
        init(_ base: MicroVMGuestSink, microsecondsPerPage delay: useconds_t) { self.base = base; self.delay = delay }
        func prepare(layout: GuestMemoryLayout) throws { try base.prepare(layout: layout) }
        func page(frame: UInt64) -> UnsafeMutableRawPointer { usleep(delay); return base.page(frame: frame) }
        func write(frames first: UInt64, pages: UnsafeBufferPointer<UnsafeRawPointer>) throws {
            usleep(delay * useconds_t(pages.count))
            try base.write(frames: first, pages: pages)
        }
        func zero(frames first: UInt64, count: Int) throws {
            usleep(delay * useconds_t(count))
            try base.zero(frames: first, count: count)
        }
        func restore(deviceState: [DeviceState]) throws { try base.restore(deviceState: deviceState) }
        func start() throws { try base.start() }
        func discard() { base.discard() }
    }

    /// Migrates a static text guest with zstd to a receiver that takes `microsecondsPerPage` per page;
    /// `whileRunning` gets the sender once the migration has started.
    func migrateToSlowReceiver(mebibytes: Int, acknowledged: Bool, microsecondsPerPage: useconds_t,
                               whileRunning: @escaping @Sendable (MigrationSender) -> Void = { _ in }) throws -> (MigrationReport, MicroVM, SerialConsole) {
        let (source, console) = try bootSource("workload=memstress size_mib=\(mebibytes) rate_mib=0 pattern=text")
        var options = MigrationOptions()
        options.compression = .zstd
        let (ours, theirs) = SocketPairChannel.pair()
        let sink = SlowSink(MicroVMGuestSink(console: SerialConsole(output: nil)), microsecondsPerPage: microsecondsPerPage)
        let flags: CapabilityFlags = acknowledged ? [.wholeBatchCompression, .passAcknowledgement] : [.wholeBatchCompression]
        let receiver = MigrationReceiver(sink: sink, channels: [theirs], capabilities: Capabilities(codecs: .all, maxChannels: 1, flags: flags))
        let result = ReceiverResult()
        Thread {
            do { _ = try receiver.run() } catch { result.error = error }
            result.done.signal()
        }.start()
        let sender = MigrationSender(source: MicroVMGuestSource(machine: source), channels: [ours], options: options)
        Thread { whileRunning(sender) }.start()
        let report = sender.run()
        result.done.wait()
        if report.succeeded { XCTAssertNil(result.error) } else { XCTAssertNil(sink.base.machine, "nothing runs at the receiver") }
        sink.base.machine?.stop()
        return (report, source, console)
    }

    func downtime(acknowledged: Bool) throws -> Double {
        let (report, source, _) = try migrateToSlowReceiver(mebibytes: 48, acknowledged: acknowledged, microsecondsPerPage: 100)
        source.stop()
        XCTAssertTrue(report.succeeded, report.error ?? "")
        return try XCTUnwrap(report.downtimeSeconds)
    }

    /// A receiver far behind: 8 MiB of text fit in the socket and its queue at once (zstd), and take it 4 s to
    /// write at 2 ms a page. The sender has sent everything and waits for the acknowledgement when it is
    /// cancelled after 1 s: the cancel ends the wait at once, and the source runs on.
    func testCancelWhileWaitingForASlowReceiver() throws {
        let (report, source, console) = try migrateToSlowReceiver(mebibytes: 8, acknowledged: true, microsecondsPerPage: 2_000) { sender in
            Thread.sleep(forTimeInterval: 1)
            sender.cancel()
        }
        XCTAssertEqual(report.error, "migration cancelled")
        XCTAssertLessThan(report.totalSeconds, 2.5, "the cancel ended the sender's wait (the receiver needed 4 s more)")
        let line = console.lineCount
        XCTAssertNotNil(console.waitForLine(after: line, timeout: 5) { $0.contains("verify=ok") }, "the source runs on")
        XCTAssertNil(source.stopped)
        source.stop()
    }

    func testTheSwitchoverWaitsForTheReceiverToCatchUp() throws {
        let without = try downtime(acknowledged: false)
        let with = try downtime(acknowledged: true)
        print("downtime behind a slow receiver: \(without) s without pass acknowledgements, \(with) s with them")
        // 48 MiB of text is about 2 MiB in zstd: the socket and the receiver's queue hold megabytes of pages,
        // at 100 µs each. That backlog is in the downtime only without the acknowledgements.
        XCTAssertGreaterThan(without, 0.15, "the setup must leave the receiver behind (downtime without acknowledgements)")
        XCTAssertLessThan(with, 0.1, "downtime with acknowledgements: \(with) s, without: \(without) s")
    }
}
