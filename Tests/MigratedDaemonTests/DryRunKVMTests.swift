import Foundation
import KVMBackend
import MigratedAPI
import MigratedDaemon
import TestSupport
import XCTest

/// `migratectl migrate --dry-run` between two real daemons, with a real guest: a prediction comes back, nothing
/// migrates, and the guest is left as it was, running, untracked and unthrottled, so that a real migration follows.
extension TwoDaemonMigrationKVMTests {
    func testADryRunPredictsAndLeavesTheGuestRunningUntrackedAndUnthrottled() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        try await withTwoDaemons { a, _, b, bListener in
            _ = try await a.client.createVM(VMCreateRequest(id: "dry", image: image, memoryMib: 256,
                                                            cmdline: "workload=memstress size_mib=64 rate_mib=100 pattern=mixed"))
            // From the second status line on, the working set (0.64 s at 100 MiB/s) is written.
            _ = try XCTUnwrapAsync(await a.memstressStatus(after: 100, of: "dry"), "the guest runs on A")
            let toB = try XCTUnwrap(bListener.address).description
            // The check below of a log that is off means something: one that is on can be read.
            let machine = try a.daemon.api.vms.runningMachine("dry")
            var bitmap = GuestPageBitmap(slots: machine.memory.slots)
            try machine.dirtyTracker.start()
            XCTAssertNoThrow(try machine.dirtyTracker.harvest(into: &bitmap))
            try machine.dirtyTracker.stop()

            let output = try await runMigratectl(socket: a.socketPath, ["migrate", "dry", "--to", toB, "--channels", "2", "--dry-run"])
            XCTAssertEqual(output.status, 0, output.text)
            XCTAssertTrue(output.text.contains("dry run of dry to \(toB): nothing was migrated"), output.text)
            XCTAssertTrue(output.text.contains("prediction: converges in "), output.text)
            XCTAssertTrue(output.text.contains("over 2 TLS channels, lz4"), output.text)

            let prediction = try await a.client.predictMigration("dry", MigrationRequest(peer: toB))
            XCTAssertTrue(prediction.converges, prediction.reason ?? "")
            XCTAssertNotNil(prediction.downtimeMs)
            XCTAssertGreaterThan(prediction.totalSeconds, 0)
            XCTAssertGreaterThan(prediction.dirtyRateBytesPerSecond, 0, "the guest writes 100 MiB/s")
            XCTAssertEqual(prediction.dirtyWindows.count, 4)
            XCTAssertGreaterThan(prediction.rateBytesPerSecond, 0)
            XCTAssertGreaterThanOrEqual(prediction.dataBytes, 32 << 20, "most of the 64 MiB working set holds data")
            XCTAssertEqual(prediction.passes.first?.pass, 0)

            // Left as found: running, its dirty log off (KVM refuses to read a log that is not kept), no throttle.
            XCTAssertThrowsError(try machine.dirtyTracker.harvest(into: &bitmap), "dirty tracking is off")
            XCTAssertEqual(machine.throttle, 0)
            let after = try XCTUnwrapAsync(await a.memstressStatus(after: 0, of: "dry"), "the guest carries on at A")
            let later = try XCTUnwrapAsync(await a.memstressStatus(after: after.ticks, of: "dry"), "and on")
            XCTAssertGreaterThan(later.ticks, after.ticks)
            let state = try await a.client.vm("dry").state
            XCTAssertEqual(state, .running)
            // The probes reached B and left nothing there: each is a failed incoming migration.
            let atB = try await b.client.listVMs()
            XCTAssertEqual(atB, [])
            let probes = try await b.client.incomingMigrations()
            XCTAssertEqual(probes.count, 2)
            XCTAssertTrue(probes.allSatisfy { $0.outcome == .failed && $0.error?.contains("2 passes") == true }, "\(probes)")

            // A real migration follows; its status carries the engine's own prediction, made after pass 0.
            _ = try await a.client.migrate("dry", MigrationRequest(peer: toB, channels: 2))
            let status = try await finalStatus(of: "dry", on: a)
            XCTAssertEqual(status.phase, .completed, status.report?.error ?? "")
            XCTAssertNotNil(status.predictedDowntimeMs)
        }
    }
}
