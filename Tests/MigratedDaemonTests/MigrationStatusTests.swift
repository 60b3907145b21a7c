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
}
