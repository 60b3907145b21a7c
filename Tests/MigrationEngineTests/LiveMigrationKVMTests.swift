import Foundation
import MigrationEngine
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
}
