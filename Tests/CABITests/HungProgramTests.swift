import Foundation
import TestSupport
import XCTest

/// The bound that keeps a hung C program from stalling the run: it is killed, with every process it started, and
/// the test gets what it printed and its stacks.
final class HungProgramTests: XCTestCase {
    func testAHungProgramIsKilledWithItsChildrenAndItsStacksAreShown() throws {
        let started = Date()
        let output = try runProgram("/bin/sh", ["-c", "echo before; sleep 600 & wait"], timeLimit: 1)
        XCTAssertLessThan(Date().timeIntervalSince(started), 120, "the program and its child are killed, so the pipe closes")
        XCTAssertNotEqual(output.status, 0)
        XCTAssertTrue(output.text.hasPrefix("before\n"), output.text)
        XCTAssertTrue(output.text.contains("still running after 1 s"), output.text)
        XCTAssertTrue(output.text.contains("sleep 600"), "the child is listed with its command line: \(output.text)")
    }
}
