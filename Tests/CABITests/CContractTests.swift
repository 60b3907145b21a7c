import Foundation
import TestSupport
import XCTest

/// Tests/c/contract.c, built against the installed library with pkg-config alone, run plain and under
/// AddressSanitizer (with its leak checker and UBSan): the C interface's contract without KVM.
final class CContractTests: XCTestCase {
    private func buildAndRun(sanitized: Bool) throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("c-contract-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let source = TestGuest.repositoryRoot.appendingPathComponent("Tests/c/contract.c").path
        let flags = "\(InstalledLibrary.warningFlags) -O1 -g -pthread" + (sanitized ? " \(InstalledLibrary.sanitizerFlags)" : "")
        try InstalledLibrary.shell("cc \(flags) '\(source)' -o contract $(pkg-config --cflags --libs migrated)", in: directory)
        let output = try InstalledLibrary.shell("./contract '\(directory)'", in: directory)
        XCTAssertTrue(output.hasSuffix("ok all\n"), output)
    }

    func testContract() throws { try buildAndRun(sanitized: false) }

    func testContractUnderAddressSanitizer() throws { try buildAndRun(sanitized: true) }
}
