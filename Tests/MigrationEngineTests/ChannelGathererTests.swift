import Foundation
import MigrationEngine
import MigrationWire
import XCTest

/// Concurrent incoming migrations over real Unix sockets, without KVM: connections are grouped by peer and
/// migration ID, and neither a silent connection nor a half-open migration holds the others up.
final class ChannelGathererTests: XCTestCase {
    /// What the gatherer reported, in order. Sendable: the reports are guarded by `lock`, since the gatherer's
    /// threads may add one while a test reads them.
    final class Events: @unchecked Sendable {
        private let lock = NSLock()
        private let arrived = DispatchSemaphore(value: 0)
        private var readyReports: [(peer: String, headers: [StreamHeader])] = []
        private var refusedReports: [(peer: String, reason: String)] = []
        var ready: [(peer: String, headers: [StreamHeader])] { lock.withLock { readyReports } }
        var refused: [(peer: String, reason: String)] { lock.withLock { refusedReports } }

        func gatherer(maximumOpening: Int = 256, maximumOpeningPerSource: Int = 32, headerTimeout: Double = 10,
                      gatherTimeout: Double = 30) -> ChannelGatherer {
            ChannelGatherer(maximumOpening: maximumOpening, maximumOpeningPerSource: maximumOpeningPerSource,
                            headerTimeout: headerTimeout, gatherTimeout: gatherTimeout,
                            ready: { [self] channels, peer in
                let headers = channels.map { channel in
                    let decoder = StreamDecoder()
                    var bytes = [UInt8](repeating: 0, count: WireFormat.headerLength)
                    let count = bytes.withUnsafeMutableBytes { (try? channel.receive(into: $0)) ?? 0 }
                    decoder.feed(Array(bytes[..<count]))
                    guard case .header(let header)? = try? decoder.next() else { return StreamHeader(channel: 9999) }
                    return header
                }
                lock.withLock { readyReports.append((peer, headers)) }
                arrived.signal()
            }, refused: { [self] peer, reason in
                lock.withLock { refusedReports.append((peer, "\(reason)")) }
                arrived.signal()
            })
        }

        /// Waits for `count` more reports; false on timeout.
        func wait(for count: Int, timeout: Double = 5) -> Bool {
            (0 ..< count).allSatisfy { _ in arrived.wait(timeout: .now() + timeout) == .success }
        }
    }

    /// A connection whose peer has sent `header` (or nothing); returns the gatherer's end and the peer's.
    func connection(_ header: StreamHeader?) throws -> (ours: SocketPairChannel, theirs: SocketPairChannel) {
        let (theirs, ours) = SocketPairChannel.pair()
        if let header {
            var bytes: [UInt8] = []
            StreamEncoder(header: header).encodeHeader(into: &bytes)
            try bytes.withUnsafeBytes { try theirs.send([$0]) }
        }
        return (ours, theirs)
    }

    func header(_ channel: UInt16, of count: UInt16, id: UInt32) -> StreamHeader {
        StreamHeader(features: .liveMigration, channel: channel, channelCount: count, migrationID: id)
    }

    func testInterleavedMigrationsAreGatheredApartAndInOrder() throws {
        let events = Events()
        let gatherer = events.gatherer()
        let arrivals = [header(1, of: 2, id: 7), header(0, of: 3, id: 9), header(0, of: 2, id: 7),
                        header(2, of: 3, id: 9), header(1, of: 3, id: 9)]
        let peers = try arrivals.map { try connection($0) } // kept open until the end
        for (ours, _) in peers { gatherer.add(ours, peer: "host-a") }
        XCTAssertTrue(events.wait(for: 2))
        XCTAssertEqual(events.refused.count, 0, "\(events.refused)")
        let byID = Dictionary(uniqueKeysWithValues: events.ready.map { ($0.headers.first?.migrationID ?? 0, $0.headers) })
        XCTAssertEqual(byID[7]?.map(\.channel), [0, 1])
        XCTAssertEqual(byID[9]?.map(\.channel), [0, 1, 2])
        XCTAssertTrue(byID.values.allSatisfy { headers in Set(headers.map(\.migrationID)).count == 1 })
        XCTAssertEqual(gatherer.pendingCount, 0)
    }

    func testTheSameIDFromTwoPeersIsTwoMigrations() throws {
        let events = Events()
        let gatherer = events.gatherer()
        let x = try connection(header(0, of: 2, id: 5)), y = try connection(header(1, of: 2, id: 5))
        gatherer.add(x.ours, peer: "host-x")
        gatherer.add(y.ours, peer: "host-y")
        Thread.sleep(forTimeInterval: 0.3)
        XCTAssertEqual(events.ready.count, 0)
        XCTAssertEqual(gatherer.pendingCount, 2)
    }

    func testASilentConnectionIsClosedAndHoldsNobodyUp() throws {
        let events = Events()
        let gatherer = events.gatherer(headerTimeout: 0.3)
        let silent = try connection(nil)
        gatherer.add(silent.ours, peer: "host-a")
        let other = try connection(header(0, of: 1, id: 3))
        gatherer.add(other.ours, peer: "host-a")
        XCTAssertTrue(events.wait(for: 1))
        XCTAssertEqual(events.ready.first?.headers.map(\.migrationID), [3], "the other migration is not held up")
        XCTAssertTrue(events.wait(for: 1))
        XCTAssertEqual(events.refused.count, 1)
        XCTAssertTrue(events.refused.first?.reason.contains("stream header") ?? false, "\(events.refused)")
        var byte: UInt8 = 0
        XCTAssertEqual(try withUnsafeMutableBytes(of: &byte) { try silent.theirs.receive(into: $0) }, 0, "closed")
    }

    func testConnectionsBeyondTheOpeningLimitAreClosedAtOnce() throws {
        let events = Events()
        let gatherer = events.gatherer(maximumOpening: 2, headerTimeout: 0.5)
        let silent = try (0 ..< 3).map { _ in try connection(nil) }
        for (ours, _) in silent { gatherer.add(ours, peer: "host-a") }
        XCTAssertTrue(events.wait(for: 1))
        XCTAssertTrue(events.refused.first?.reason.contains("2 connections are already opening") ?? false, "\(events.refused)")
        var byte: UInt8 = 0
        XCTAssertEqual(try withUnsafeMutableBytes(of: &byte) { try silent[2].theirs.receive(into: $0) }, 0, "closed at once")
        XCTAssertTrue(events.wait(for: 2), "the two admitted ones time out")
        // Their places are free again: a migration gets in.
        let late = try connection(header(0, of: 1, id: 4))
        gatherer.add(late.ours, peer: "host-a")
        XCTAssertTrue(events.wait(for: 1))
        XCTAssertEqual(events.ready.map(\.headers.first?.migrationID), [4])
    }

    /// A host that floods the port with silent connections uses up its own share of opening slots, not everyone's.
    func testOneSourceCannotTakeTheSlotsOfAnother() throws {
        let events = Events()
        let gatherer = events.gatherer(maximumOpening: 8, maximumOpeningPerSource: 2, headerTimeout: 0.5)
        let silent = try (0 ..< 3).map { _ in try connection(nil) }
        for (ours, _) in silent { gatherer.add(ours, peer: "flooder") }
        XCTAssertTrue(events.wait(for: 1))
        XCTAssertTrue(events.refused.first?.reason.contains("2 connections from flooder are already opening") ?? false, "\(events.refused)")
        let migration = try connection(header(0, of: 1, id: 5))
        gatherer.add(migration.ours, peer: "host-a")
        XCTAssertTrue(events.wait(for: 1))
        XCTAssertEqual(events.ready.map(\.headers.first?.migrationID), [5], "another host's migration gets in meanwhile")
    }

    func testAHalfOpenMigrationExpiresAndARepeatedChannelIsRefusedAlone() throws {
        let events = Events()
        let gatherer = events.gatherer(gatherTimeout: 0.5)
        let first = try connection(header(0, of: 2, id: 11)), repeated = try connection(header(0, of: 2, id: 11))
        gatherer.add(first.ours, peer: "host-a")
        Thread.sleep(forTimeInterval: 0.1)
        gatherer.add(repeated.ours, peer: "host-a")
        XCTAssertTrue(events.wait(for: 1))
        XCTAssertTrue(events.refused.first?.reason.contains("which this migration already has") ?? false, "\(events.refused)")
        XCTAssertEqual(gatherer.pendingCount, 1, "the first channel still waits for its partner")
        XCTAssertTrue(events.wait(for: 1))
        XCTAssertTrue(events.refused.last?.reason.contains("did not open all its channels") ?? false, "\(events.refused)")
        XCTAssertEqual(gatherer.pendingCount, 0)
        XCTAssertEqual(events.ready.count, 0)
        var byte: UInt8 = 0
        XCTAssertEqual(try withUnsafeMutableBytes(of: &byte) { try first.theirs.receive(into: $0) }, 0, "closed")
    }
}
