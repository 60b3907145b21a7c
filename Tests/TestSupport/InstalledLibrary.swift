import Foundation
import XCTest

/// libmigrated as `scripts/install` lays it out under a prefix, for the tests that build C programs against it the
/// way a VMM would: with the installed header and library and pkg-config alone. `scripts/test` installs the debug
/// build into a temporary prefix and names it in MIGRATED_TEST_PREFIX; without it those tests skip and say why.
public enum InstalledLibrary {
    public static func prefix() throws -> String {
        guard let prefix = ProcessInfo.processInfo.environment["MIGRATED_TEST_PREFIX"], !prefix.isEmpty else {
            throw XCTSkip("MIGRATED_TEST_PREFIX is not set: run `scripts/install --debug DIR` and set it to DIR (scripts/test does)")
        }
        guard FileManager.default.fileExists(atPath: "\(prefix)/lib/pkgconfig/migrated.pc") else {
            throw XCTSkip("no migrated.pc under MIGRATED_TEST_PREFIX=\(prefix)")
        }
        return prefix
    }

    /// The environment in which pkg-config finds the installed migrated.pc.
    public static func environment() throws -> [String: String] {
        var environment = ProcessInfo.processInfo.environment
        environment["PKG_CONFIG_PATH"] = "\(try prefix())/lib/pkgconfig"
        return environment
    }

    /// Runs a shell command line in that environment; fails with what it printed if it fails.
    @discardableResult
    public static func shell(_ command: String, in directory: String? = nil, file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let output = try runProgram("/bin/sh", ["-c", command], environment: try environment(), directory: directory)
        if output.status != 0 {
            XCTFail("`\(command)` exited with \(output.status):\n\(output.text)", file: file, line: line)
            throw NSError(domain: "InstalledLibrary", code: Int(output.status))
        }
        return output.text
    }

    /// The compiler flags every C test and the C VMM are built with.
    public static let warningFlags = "-std=c11 -Wall -Wextra -Werror"
    public static let sanitizerFlags = "-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
}
