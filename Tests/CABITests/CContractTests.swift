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

    /// What a VMM gets from `scripts/install`: a library that carries its Swift runtime inside (it needs only
    /// system libraries), exports nothing but the header's functions, is found through the rpath pkg-config adds,
    /// and whose soname carries the ABI's major version.
    func testTheInstalledLibraryStandsAlone() throws {
        let prefix = try InstalledLibrary.prefix()
        let library = "\(prefix)/lib/libmigrated.so.1"
        let dynamic = try InstalledLibrary.shell("readelf -d '\(library)'")
        XCTAssertTrue(dynamic.contains("Library soname: [libmigrated.so.1]"), dynamic)
        let needed = dynamic.split(separator: "\n").filter { $0.contains("(NEEDED)") }
        XCTAssertFalse(needed.isEmpty)
        for line in needed {
            XCTAssertFalse(line.contains("swift") || line.contains("Foundation") || line.contains("dispatch") || line.contains("icu"),
                           "the Swift runtime is linked in, not needed at run time: \(line)")
        }
        let functions = try InstalledLibrary.shell("nm -D --defined-only '\(library)' | awk '$2 == \"T\" { sub(/@.*/, \"\", $3); print $3 }'")
            .split(separator: "\n").map(String.init)
        XCTAssertFalse(functions.isEmpty)
        XCTAssertEqual(functions.filter { !$0.hasPrefix("migrated_") }, [], "only the header's functions are exported")
        let header = try String(contentsOfFile: "\(prefix)/include/migrated.h", encoding: .utf8)
        for function in functions { XCTAssertTrue(header.contains("\(function)("), "\(function) is declared in migrated.h") }

        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("c-standalone-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try #"""
        #include <migrated.h>
        #include <stdio.h>
        int main(void) { printf("abi %u %d\n", migrated_abi_version(), migrated_abi_check(MIGRATED_ABI_VERSION)); return 0; }
        """#.write(toFile: "\(directory)/abi.c", atomically: true, encoding: .utf8)
        try InstalledLibrary.shell("cc \(InstalledLibrary.warningFlags) abi.c -o abi $(pkg-config --cflags --libs migrated)", in: directory)
        let resolved = try InstalledLibrary.shell("ldd ./abi", in: directory)
        XCTAssertTrue(resolved.contains("libmigrated.so.1 => \(prefix)/lib/libmigrated.so.1"), resolved)
        XCTAssertFalse(resolved.contains("not found") || resolved.contains("swift"), resolved)
        // Run with a bare environment: no LD_LIBRARY_PATH, no toolchain on PATH.
        let output = try InstalledLibrary.shell("env -i ./abi", in: directory)
        XCTAssertEqual(output, "abi 1 0\n")
    }

    func testContractUnderAddressSanitizer() throws { try buildAndRun(sanitized: true) }

    /// The header from C++ (compiled pedantically) and its functions from Rust (declared in an extern "C" block),
    /// linked against the installed library. Rust is skipped where no rustc is installed.
    func testTheHeaderServesCPlusPlusAndRust() throws {
        let prefix = try InstalledLibrary.prefix()
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("c-languages-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let sources = TestGuest.repositoryRoot.appendingPathComponent("Tests/c").path
        try InstalledLibrary.shell("c++ -std=c++17 -Wall -Wextra -Werror -pedantic '\(sources)/abi.cpp' -o abi-cpp $(pkg-config --cflags --libs migrated)",
                                   in: directory)
        XCTAssertEqual(try InstalledLibrary.shell("./abi-cpp", in: directory), "abi 1 MIGRATED_OK MIGRATED_ERR_ABI_MISMATCH\n")
        guard runCommand(["/bin/sh", "-c", "command -v rustc"]) == 0 else { throw XCTSkip("no rustc on this host") }
        try InstalledLibrary.shell("rustc -O '\(sources)/abi.rs' -o abi-rs -L '\(prefix)/lib' -l migrated -C link-arg=-Wl,-rpath,'\(prefix)/lib'",
                                   in: directory)
        XCTAssertEqual(try InstalledLibrary.shell("./abi-rs", in: directory), "abi 1 MIGRATED_ERR_ABI_MISMATCH true\n")
    }
}
