import Foundation
import KVMBackend
import XCTest

/// The guest kit's ELF, built with the project's own build step (make -C guest) on first use.
public enum TestGuest {
    public static let repositoryRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    nonisolated(unsafe) private static var built: Result<[UInt8], Error>?
    private static let lock = NSLock()

    /// The bytes of guest/build/guest.elf, after making sure it is up to date.
    public static func image() throws -> [UInt8] {
        lock.lock()
        defer { lock.unlock() }
        if built == nil { built = Result { try buildAndRead() } }
        return try built!.get()
    }

    public static var path: String { repositoryRoot.appendingPathComponent("guest/build/guest.elf").path }

    private static func buildAndRead() throws -> [UInt8] {
        let make = Process()
        make.executableURL = URL(fileURLWithPath: "/usr/bin/make")
        make.arguments = ["-s", "-C", repositoryRoot.appendingPathComponent("guest").path]
        try make.run()
        make.waitUntilExit()
        guard make.terminationStatus == 0 else {
            throw NSError(domain: "TestGuest", code: Int(make.terminationStatus),
                          userInfo: [NSLocalizedDescriptionKey: "make -C guest failed; is gcc installed?"])
        }
        return Array(try Data(contentsOf: URL(fileURLWithPath: path)))
    }
}

/// Test cases that need /dev/kvm derive from this; on a host without KVM they are skipped, and XCTest counts
/// them as skipped. Their class names end in "KVMTests", which is how .ci/run counts them.
open class KVMTestCase: XCTestCase {
    override open func setUpWithError() throws {
        try XCTSkipUnless(KVMSystem.isAvailable, "needs /dev/kvm (read-write)")
    }
}

/// One memstress status line: `memstress t=12 gen=340 pages=65536 ticks=1200 verify=ok`.
public struct MemstressStatus: Equatable {
    public let seconds: UInt64
    public let generation: UInt64
    public let pages: UInt64
    public let ticks: UInt64
    public let verified: Bool

    public init?(_ line: String) {
        guard line.hasPrefix("memstress t=") else { return nil }
        var fields: [String: String] = [:]
        for part in line.split(separator: " ").dropFirst() {
            let pair = part.split(separator: "=", maxSplits: 1)
            if pair.count == 2 { fields[String(pair[0])] = String(pair[1]) }
        }
        guard let t = fields["t"].flatMap(UInt64.init), let gen = fields["gen"].flatMap(UInt64.init),
              let pages = fields["pages"].flatMap(UInt64.init), let ticks = fields["ticks"].flatMap(UInt64.init),
              let verify = fields["verify"] else { return nil }
        seconds = t
        generation = gen
        self.pages = pages
        self.ticks = ticks
        verified = verify == "ok"
    }
}
