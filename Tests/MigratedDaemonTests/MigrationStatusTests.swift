import Foundation
import MigratedAPI
import MigrationEngine
import XCTest
@testable import MigratedDaemon

/// How the daemon's migration status takes in the engine's progress.
final class MigrationStatusTests: XCTestCase {
    private func progress(_ phase: MigrationProgress.Phase) -> MigrationProgress {
        MigrationProgress(phase: phase, pass: 1, pagesDone: 10, pagesTotal: 20, bytesOnWire: 40960, bandwidth: 1e9, dirtyRate: 0,
                          expectedDowntime: 0.01, throttle: 0, elapsed: 0.5, passSecondsLeft: nil)
    }

    /// The engine reports "completed" a moment before its report is in: a client polling in between must not see
    /// a finished migration without its report, so only `finish` makes the status final.
    func testOnlyTheReportMakesAMigrationFinal() {
        var status = MigrationStatus(vm: "vm", peer: "peer", phase: .setup)
        status.apply(progress(.precopy))
        XCTAssertEqual(status.phase, .precopy)
        XCTAssertEqual(status.percent, 50)
        for final in [MigrationProgress.Phase.completed, .failed, .cancelled] {
            status.apply(progress(final))
            XCTAssertEqual(status.phase, .precopy, "\(final) without a report")
            XCTAssertNil(status.report)
        }
        status.apply(progress(.switchover))
        XCTAssertEqual(status.phase, .switchover)
    }

    /// A migration that finishes in post-copy shows the phase while the destination fills in its pages (the percent
    /// is of the pages it lacked), and its report carries the engine's post-copy figures.
    func testPostCopyShowsAsAPhaseAndInTheReport() throws {
        var status = MigrationStatus(vm: "vm", peer: "peer", phase: .precopy)
        status.apply(progress(.postcopy))
        XCTAssertEqual(status.phase, .postcopy)
        XCTAssertFalse(status.phase.isFinal)
        XCTAssertEqual(status.percent, 50)
        let line = Formatting.progressLine(status)
        XCTAssertTrue(line.hasPrefix("postcopy  pass 1   50.0%  rate "), line)
        XCTAssertFalse(line.contains("dirty") || line.contains("downtime"), "stale pre-copy figures: \(line)")
        let report = try JSONDecoder().decode(MigrationReport.self, from: Data(#"""
            {"succeeded": true, "committed": true, "totalSeconds": 2, "setupSeconds": 0.1, "downtimeSeconds": 0.004, "passes": [],
             "wireBytes": 1000, "pagesSent": 10, "compression": "lz4", "channels": 1, "lostChannels": [], "harvests": 1, "harvestSeconds": 0,
             "predictions": [],
             "postCopy": {"missingPages": 5210, "requestedPages": 312, "requests": 312, "wireBytes": 21000000, "seconds": 0.085}}
            """#.utf8))
        status.finish(report, compression: .lz4)
        XCTAssertEqual(status.phase, .completed)
        XCTAssertEqual(status.report?.postCopy, MigrationReportDocument.PostCopy(missingPages: 5210, requestedPages: 312, requests: 312,
                                                                               wireBytes: 21_000_000, seconds: 0.085))
        let json = String(decoding: try APIJSON.encode(status), as: UTF8.self)
        XCTAssertTrue(json.contains(#""post_copy" : {"#) && json.contains(#""missing_pages" : 5210"#), json)
        XCTAssertTrue(Formatting.report(status.report!, vm: "vm", peer: "peer")
            .contains("post-copy: 5210 pages missing at the start, 312 asked for by the destination in 312 requests"))
    }

    /// A channel lost during pre-copy shows in the report, in the JSON as `lost_channels`; a report without one leaves
    /// the field out.
    func testALostChannelShowsInTheReport() throws {
        let report = try JSONDecoder().decode(MigrationReport.self, from: Data(#"""
            {"succeeded": true, "committed": true, "totalSeconds": 2, "setupSeconds": 0.1, "downtimeSeconds": 0.004, "passes": [],
             "wireBytes": 1000, "pagesSent": 10, "compression": "none", "channels": 4, "harvests": 1, "harvestSeconds": 0, "predictions": [],
             "lostChannels": [{"channel": 2, "pass": 0, "reason": "channel failed: connection reset"}]}
            """#.utf8))
        var status = MigrationStatus(vm: "vm", peer: "peer", phase: .precopy)
        status.finish(report, compression: .none)
        XCTAssertEqual(status.report?.lostChannels,
                       [MigrationReportDocument.LostChannel(channel: 2, pass: 0, reason: "channel failed: connection reset")])
        let json = String(decoding: try APIJSON.encode(status), as: UTF8.self)
        XCTAssertTrue(json.contains(#""lost_channels" : ["#) && json.contains(#""channel" : 2"#), json)
        XCTAssertTrue(Formatting.report(status.report!, vm: "vm", peer: "peer")
            .contains("channel 2 lost in pass 0, its pages taken over by the others: channel failed: connection reset"))
        var without = report
        without.lostChannels = []
        var plain = MigrationStatus(vm: "vm", peer: "peer", phase: .precopy)
        plain.finish(without, compression: .none)
        XCTAssertFalse(String(decoding: try APIJSON.encode(plain), as: UTF8.self).contains("lost_channels"))
    }

    /// A post-copy whose link broke keeps the percent it had reached, and its line says how long the source waits and
    /// what resumes it; the pause is in the JSON as `postcopy_pause`.
    func testAPausedPostCopyKeepsItsPercentAndSaysHowToResume() throws {
        var status = MigrationStatus(vm: "vm", peer: "peer", phase: .precopy)
        status.apply(progress(.postcopy))
        var paused = progress(.postcopyPaused)
        paused.pagesDone = paused.pagesTotal
        status.apply(paused)
        XCTAssertEqual(status.phase, .postcopyPaused)
        XCTAssertFalse(status.phase.isFinal)
        XCTAssertEqual(status.percent, 50)
        status.postcopyPause = PostCopyPause(reason: nil, waitSecondsLeft: 42)
        let line = Formatting.progressLine(status)
        XCTAssertTrue(line.hasPrefix("postcopy-paused  pass 1   50.0%"), line)
        XCTAssertTrue(line.contains("waits 42.0 s more for `migratectl migrate vm --resume`"), line)
        let json = String(decoding: try APIJSON.encode(status), as: UTF8.self)
        XCTAssertTrue(json.contains(#""phase" : "postcopy-paused""#) && json.contains(#""wait_seconds_left" : 42"#), json)
    }
}
