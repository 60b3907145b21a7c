@testable import MigratedDaemon
import XCTest

/// Refused connections are logged once per source and window, then counted.
final class RefusalLogTests: XCTestCase {
    final class Clock: @unchecked Sendable {
        var time = 100.0
    }

    func testOneLinePerSourceAndWindowThenTheCount() {
        let clock = Clock()
        let log = RefusalLog(window: 10) { clock.time }
        XCTAssertEqual(log.verdict(for: "10.0.0.9"), .log(suppressed: 0))
        for _ in 0 ..< 499 { XCTAssertEqual(log.verdict(for: "10.0.0.9"), .quiet) }
        XCTAssertEqual(log.verdict(for: "10.0.0.7"), .log(suppressed: 0), "another source is logged meanwhile")
        clock.time += 10
        XCTAssertEqual(log.verdict(for: "10.0.0.9"), .log(suppressed: 499), "the next window says how many went unlogged")
        XCTAssertEqual(log.verdict(for: "10.0.0.9"), .quiet)
    }

    func testItRemembersABoundedNumberOfSources() {
        let clock = Clock()
        let log = RefusalLog(window: 10) { clock.time }
        for index in 0 ..< RefusalLog.maximumSources * 3 {
            XCTAssertEqual(log.verdict(for: "source-\(index)"), .log(suppressed: 0))
        }
        // Forgotten sources are logged again rather than kept without bound.
        XCTAssertEqual(log.verdict(for: "source-0"), .log(suppressed: 0))
    }
}
