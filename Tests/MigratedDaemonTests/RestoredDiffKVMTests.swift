import Foundation
import MigratedAPI
import MigratedDaemon
import TestSupport
import XCTest

/// A VM restored from a snapshot can be saved next as a diff of that snapshot, by a daemon that did not take it:
/// the base is found from the file, not from the memory of the daemon that saved it (issue 17, item 4).
extension SnapshotDaemonKVMTests {
    func testAVMRestoredByAnotherDaemonIsSavedNextAsADiffOfItsFile() async throws {
        let image = TestGuest.path
        _ = try TestGuest.image()
        let directory = NSTemporaryDirectory() + "restored-diff-" + String(UUID().uuidString.prefix(8))
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let full = directory + "/full.snap", diff = directory + "/diff.snap"

        // The first daemon saves the VM, then goes away (as a crashed or restarted daemon does).
        try await withDaemon(memoryBudgetMiB: 1024) { daemon in
            _ = try await daemon.client.createVM(VMCreateRequest(id: "phoenix", image: image, memoryMib: 128, cmdline: Self.guest))
            _ = try XCTUnwrapAsync(await daemon.memstressStatus(after: 0, of: "phoenix"), "the guest runs")
            let saved = try await vmsnap(daemon, ["save", "phoenix", full])
            XCTAssertEqual(saved.status, 0, saved.text)
        }

        // A new daemon restores it and saves a diff of the file it came from.
        try await withDaemon(memoryBudgetMiB: 1024) { daemon in
            let restored = try await vmsnap(daemon, ["restore", full, "--into-daemon", "--id", "phoenix"])
            XCTAssertEqual(restored.status, 0, restored.text)
            let running = try XCTUnwrapAsync(await daemon.memstressStatus(after: 0, of: "phoenix"), "the restored guest runs")
            var diffSaved = try await vmsnap(daemon, ["save", "phoenix", diff, "--diff"])
            // The base is read from the file while the guest runs; a diff asked for before that is refused.
            for _ in 0 ..< 50 where diffSaved.status != 0 && diffSaved.text.contains("no_parent") {
                try await Task.sleep(nanoseconds: 100_000_000)
                diffSaved = try await vmsnap(daemon, ["save", "phoenix", diff, "--diff"])
            }
            XCTAssertEqual(diffSaved.status, 0, diffSaved.text)
            XCTAssertTrue(diffSaved.text.contains("diff"), diffSaved.text)
            _ = try XCTUnwrapAsync(await daemon.memstressStatus(after: running.ticks, of: "phoenix"), "the guest runs on")
        }

        // The diff is the file's child, and the chain restores a guest that verifies its memory.
        let verified = try await vmsnap(nil, ["verify", diff])
        XCTAssertEqual(verified.status, 0, verified.text)
        XCTAssertEqual(verified.text.components(separatedBy: "\n").filter { $0.hasPrefix("ok ") }.count, 2, verified.text)
        let ran = try await vmsnap(nil, ["restore", diff, "--seconds", "3"])
        XCTAssertEqual(ran.status, 0, ran.text)
        let lines = ran.text.components(separatedBy: "\n").compactMap(MemstressStatus.init)
        XCTAssertFalse(lines.isEmpty, ran.text)
        XCTAssertTrue(lines.allSatisfy(\.verified), ran.text)
    }
}
