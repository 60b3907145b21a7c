import Foundation
import MigratedAPI
import MigratedDaemon
import TestSupport
import XCTest

/// Snapshots through the daemon and `vmsnap`, as an operator takes them: save a running VM, full and diff;
/// verify, inspect, compare and merge the files; restore them in a new process and into the daemon; and
/// the ways it must fail cleanly.
final class SnapshotDaemonKVMTests: KVMTestCase {
    static let guest = "workload=memstress size_mib=32 rate_mib=100 pattern=mixed"

    func vmsnap(_ daemon: TestDaemon?, _ arguments: [String]) async throws -> ToolOutput {
        try await runTool("vmsnap", arguments + (daemon.map { ["--socket", $0.socketPath] } ?? []))
    }

    func testSaveVerifyInspectRestoreThroughTheDaemonAndVmsnap() async throws {
        try await withDaemon(memoryBudgetMiB: 2048) { daemon in
            let image = TestGuest.path
            _ = try TestGuest.image()
            _ = try await daemon.client.createVM(VMCreateRequest(id: "snappy", image: image, memoryMib: 128, cmdline: Self.guest))
            let before = try XCTUnwrapAsync(await daemon.memstressStatus(after: 0, of: "snappy"), "the guest runs")
            let full = daemon.directory + "/full.snap", diff = daemon.directory + "/diff.snap"

            let saved = try await vmsnap(daemon, ["save", "snappy", full])
            XCTAssertEqual(saved.status, 0, saved.text)
            XCTAssertTrue(saved.text.contains("saved \(full): full snapshot"), saved.text)
            let refused = try await vmsnap(daemon, ["save", "snappy", full])
            XCTAssertEqual(refused.status, 2, "an existing file is not overwritten: \(refused.text)")
            try await Task.sleep(nanoseconds: 200_000_000)
            let diffSaved = try await vmsnap(daemon, ["save", "snappy", diff, "--diff", "--compressed", "--json"])
            XCTAssertEqual(diffSaved.status, 0, diffSaved.text)
            let status = try APIJSON.decode(SnapshotStatus.self, from: Data(diffSaved.text.utf8))
            XCTAssertEqual(status.kind, .diff)
            XCTAssertNotNil(status.parentId)
            _ = try XCTUnwrapAsync(await daemon.memstressStatus(after: before.ticks, of: "snappy"), "the guest runs on after its snapshots")

            let verified = try await vmsnap(nil, ["verify", diff])
            XCTAssertEqual(verified.status, 0, verified.text)
            XCTAssertEqual(verified.text.components(separatedBy: "\n").filter { $0.hasPrefix("ok ") }.count, 2, verified.text)
            let inspected = try await vmsnap(nil, ["inspect", diff])
            XCTAssertTrue(inspected.text.contains("kind            diff of"), inspected.text)
            XCTAssertTrue(inspected.text.contains("memory format   compressed"), inspected.text)
            XCTAssertTrue(inspected.text.contains("0x10000001"), "the daemon's VM configuration is a device component: \(inspected.text)")
            let compared = try await vmsnap(nil, ["diff", full, diff])
            XCTAssertEqual(compared.status, 1, "the guest wrote between the snapshots: \(compared.text)")
            let merged = daemon.directory + "/merged.snap"
            let merging = try await vmsnap(nil, ["merge", diff, merged])
            XCTAssertEqual(merging.status, 0, merging.text)
            let same = try await vmsnap(nil, ["diff", merged, diff])
            XCTAssertEqual(same.status, 0, same.text)

            // New processes run the guest from the chain, eagerly and lazily, and it carries on verifying its pages.
            for mode in [[], ["--lazy"]] {
                let ran = try await vmsnap(nil, ["restore", diff, "--seconds", "3"] + mode)
                XCTAssertEqual(ran.status, 0, ran.text)
                let lines = ran.text.components(separatedBy: "\n").compactMap(MemstressStatus.init)
                XCTAssertGreaterThanOrEqual(lines.count, 2, "\(mode): \(ran.text)")
                XCTAssertTrue(lines.allSatisfy(\.verified), ran.text)
                XCTAssertTrue(ran.text.contains("first instruction after"), ran.text)
            }

            // Into the daemon, as a second VM beside the first.
            let restored = try await vmsnap(daemon, ["restore", merged, "--into-daemon", "--id", "copy", "--json"])
            XCTAssertEqual(restored.status, 0, restored.text)
            _ = try XCTUnwrapAsync(await daemon.memstressStatus(after: 0, of: "copy"), "the restored VM runs in the daemon")
            try await withDaemon(memoryBudgetMiB: 64) { small in
                let refused = try await vmsnap(small, ["restore", merged, "--into-daemon"])
                XCTAssertEqual(refused.status, 2, refused.text)
                XCTAssertTrue(refused.text.contains("does not fit"), refused.text)
            }

            // One flipped byte in a memory page: verify names it and fails, restore refuses.
            var bytes = try Data(contentsOf: URL(fileURLWithPath: full))
            let inspect = try APIJSON.decode(InspectSummary.self, from: Data(try await vmsnap(nil, ["inspect", full, "--json"]).text.utf8))
            let memory = try XCTUnwrap(inspect.parts.first { $0.type == "memory" })
            let firstDataPage = try XCTUnwrap(firstDataPageOffset(bytes, pageMap: try XCTUnwrap(inspect.parts.first { $0.type == "page map" })))
            bytes[Int(memory.offset) + firstDataPage * 4096 + 123] ^= 0x01
            let bad = daemon.directory + "/bad.snap"
            try bytes.write(to: URL(fileURLWithPath: bad))
            let failed = try await vmsnap(nil, ["verify", bad])
            XCTAssertEqual(failed.status, 1, failed.text)
            XCTAssertTrue(failed.text.contains("checksum mismatch in memory page"), failed.text)
            let refusedRestore = try await vmsnap(nil, ["restore", bad, "--seconds", "1"])
            XCTAssertEqual(refusedRestore.status, 1, refusedRestore.text)
        }
    }

    /// A VM paused through the API is saved as it is and stays paused; after a resume it carries on, and the
    /// snapshot restores to a guest that carries on from the paused moment.
    func testSnapshotOfAPausedVM() async throws {
        try await withDaemon(memoryBudgetMiB: 1024) { daemon in
            _ = try TestGuest.image()
            _ = try await daemon.client.createVM(VMCreateRequest(id: "still", image: TestGuest.path, memoryMib: 128, cmdline: Self.guest))
            let before = try XCTUnwrapAsync(await daemon.memstressStatus(after: 0, of: "still"), "the guest runs")
            let paused = try await runTool("migratectl", ["vm", "pause", "still", "--socket", daemon.socketPath])
            XCTAssertEqual(paused.status, 0, paused.text)
            let pausedInfo = try await daemon.client.vm("still")
            XCTAssertEqual(pausedInfo.state, .paused)
            let linesWhilePaused = pausedInfo.consoleLines
            let file = daemon.directory + "/paused.snap"
            let saved = try await vmsnap(daemon, ["save", "still", file, "--json"])
            XCTAssertEqual(saved.status, 0, saved.text)
            let migrate = try await daemon.failure("POST", "/vms/still/migrate", body: #"{"peer": "127.0.0.1:1", "security": "plaintext"}"#)
            XCTAssertEqual(migrate.error.error, "vm_paused")
            try await Task.sleep(nanoseconds: 1_200_000_000)
            let info = try await daemon.client.vm("still")
            XCTAssertEqual(info.state, .paused, "a save leaves a paused VM paused")
            XCTAssertEqual(info.consoleLines, linesWhilePaused, "the guest printed nothing while paused")
            _ = try await daemon.client.resumeVM("still")
            _ = try XCTUnwrapAsync(await daemon.memstressStatus(after: before.ticks, of: "still"), "the guest carries on after resume")
            let ran = try await vmsnap(nil, ["restore", file, "--seconds", "3"])
            XCTAssertEqual(ran.status, 0, ran.text)
            let lines = ran.text.components(separatedBy: "\n").compactMap(MemstressStatus.init)
            XCTAssertGreaterThanOrEqual(lines.count, 2, ran.text)
            XCTAssertTrue(lines.allSatisfy(\.verified), ran.text)
            // A paused VM stops like a running one.
            _ = try await daemon.client.pauseVM("still")
            let stopped = try await daemon.client.stopVM("still")
            XCTAssertEqual(stopped.state, .stopped)
        }
    }

    /// A disk that fills up during the save: a clear error, no file left, and the VM runs on.
    func testFullDiskDuringSaveLeavesNoFileAndTheVMRunning() async throws {
        try await withDaemon(memoryBudgetMiB: 1024) { daemon in
            let smallDisk = try SmallDisk(at: daemon.directory + "/small-disk", size: "4m")
            defer { smallDisk.unmount() }
            let disk = smallDisk.path
            _ = try TestGuest.image()
            _ = try await daemon.client.createVM(VMCreateRequest(id: "full", image: TestGuest.path, memoryMib: 128, cmdline: Self.guest))
            let before = try XCTUnwrapAsync(await daemon.memstressStatus(after: 0, of: "full"), "the guest runs")
            let saved = try await vmsnap(daemon, ["save", "full", disk + "/snap"])
            XCTAssertEqual(saved.status, 2, saved.text)
            XCTAssertTrue(saved.text.contains("No space left on device"), saved.text)
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: disk), [], "nothing is left behind")
            _ = try XCTUnwrapAsync(await daemon.memstressStatus(after: before.ticks, of: "full"), "the VM runs on")
        }
    }

    /// The frame index of the first data page, from the page map part (state 2 = data).
    private func firstDataPageOffset(_ file: Data, pageMap: InspectSummary.Part) -> Int? {
        (0 ..< Int(pageMap.length)).first { file[Int(pageMap.offset) + $0] == 2 }
    }

    /// The part of `vmsnap inspect --json` these tests read.
    struct InspectSummary: Decodable {
        struct Part: Decodable { var type: String; var offset: UInt64; var length: UInt64 }
        var parts: [Part]
    }
}
