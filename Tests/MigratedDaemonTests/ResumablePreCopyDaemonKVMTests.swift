import Foundation
import MigratedAPI
import MigratedDaemon
import TestSupport
import XCTest

/// Resumable pre-copy through the daemons (issue 15 item 3): the migration goes through a TCP proxy, which breaks every
/// connection during pass 0; the source runs on and says the migration may be resumed, the destination keeps what it
/// received, and `migratectl migrate VM --resume` sends only the rest. Or, once the destination's grace period is over,
/// it sends everything and says why. The two daemons and their helpers are TwoDaemonMigrationKVMTests'.
extension TwoDaemonMigrationKVMTests {
    /// 128 MiB of random data rewritten at 16 MiB/s, sent at 64 MiB/s so that pass 0 is on the wire for two seconds and
    /// most of what it sent is still current when the migration resumes.
    static let slowPassGuest = "workload=memstress size_mib=128 rate_mib=16 pattern=random"

    /// Creates `id` running `slowPassGuest` on `daemon`, and waits until it has written all of its working set (8 s).
    func createFilledGuest(_ id: String, on daemon: TestDaemon) async throws -> MemstressStatus {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        _ = try await daemon.client.createVM(VMCreateRequest(id: id, image: image, memoryMib: 256, cmdline: Self.slowPassGuest))
        var status = try XCTUnwrapAsync(await daemon.memstressStatus(after: 0, of: id), "the guest runs")
        while status.generation < 2 {
            status = try XCTUnwrapAsync(await daemon.memstressStatus(after: status.ticks, of: id), "the guest fills its working set")
        }
        return status
    }

    /// Starts migrating `id` through a new proxy, and cuts it once pass 0 is `percent` % done; the migration must fail
    /// and say that it may be resumed, with the VM running at the source. Returns the proxy and the failed status.
    func cutInPassZero(_ id: String, at percent: Double, from source: TestDaemon, to listener: EngineIncomingListener) async throws
        -> (TCPProxy, MigrationStatus) {
        guard case .tcp(_, let port)? = listener.address else { throw XCTSkip("the destination does not listen on TCP") }
        let proxy = try TCPProxy(to: port)
        _ = try await source.client.migrate(id, MigrationRequest(peer: "127.0.0.1:\(proxy.port)", channels: 2, compression: .none,
                                                                 bandwidthLimitBytesPerSecond: 64 << 20))
        let cutAt = try await poll { try await source.client.migration(id) } until: {
            $0.phase.isFinal || ($0.phase == .precopy && $0.pass == 0 && $0.percent >= percent)
        }
        XCTAssertEqual(cutAt.phase, .precopy, "the migration was in pass 0 when its link was cut")
        proxy.cut()
        let failed = try await finalStatus(of: id, on: source)
        XCTAssertEqual(failed.phase, .failed)
        XCTAssertEqual(failed.report?.resumable, true, "the destination keeps what it received: \(String(describing: failed.report))")
        let vm = try await source.client.vm(id)
        XCTAssertEqual(vm.state, .running, "a migration that fails before the switchover leaves the VM running")
        return (proxy, failed)
    }

    func testAPreCopyCutInPassZeroIsResumedWithOnlyWhatTheDestinationLacks() async throws {
        try await withTwoDaemons { a, _, b, bListener in
            let before = try await createFilledGuest("cut", on: a)
            let (proxy, _) = try await cutInPassZero("cut", at: 80, from: a, to: bListener)
            defer { proxy.close() }
            let kept = try await incomingRecord(on: b)
            XCTAssertEqual(kept.outcome, .failed)
            XCTAssertTrue(kept.error?.contains("kept") ?? false, kept.error ?? "")

            let resumed = try await runMigratectl(socket: a.socketPath, ["migrate", "cut", "--resume", "--interval", "0.1"])
            XCTAssertEqual(resumed.status, 0, resumed.text)
            XCTAssertTrue(resumed.text.contains("resumed: the destination held"), resumed.text)
            let status = try await a.client.migration("cut")
            XCTAssertEqual(status.phase, .completed, status.report?.error ?? "")
            let report = try XCTUnwrap(status.report)
            let held = try XCTUnwrap(report.resumedPrecopy)
            XCTAssertTrue(held.resumed)
            XCTAssertGreaterThan(held.heldPages, 16384, "most of the 32768 pages written had arrived")
            XCTAssertGreaterThan(report.passes.first?.unchangedPages ?? 0, held.heldPages / 2, "pages the destination held are not sent again")
            XCTAssertLessThan(report.wireBytes, 80 << 20, "well under the 128 MiB written went again")
            let source = try await a.client.vm("cut")
            XCTAssertEqual(source.state, .migrated)
            let landed = try XCTUnwrapAsync(await b.memstressStatus(after: before.ticks, of: "cut"), "the guest carries on at B")
            _ = try XCTUnwrapAsync(await b.memstressStatus(after: landed.ticks, of: "cut"), "and goes on verifying")
        }
    }

    func testAResumeAfterTheGracePeriodSendsEverythingAndSaysWhy() async throws {
        try await withTwoDaemons(preCopyResumeGrace: 1) { a, _, b, bListener in
            _ = try await createFilledGuest("late", on: a)
            let (proxy, _) = try await cutInPassZero("late", at: 30, from: a, to: bListener)
            defer { proxy.close() }
            try await Task.sleep(nanoseconds: 2_000_000_000)

            let resumed = try await runMigratectl(socket: a.socketPath, ["migrate", "late", "--resume", "--interval", "0.1"])
            XCTAssertEqual(resumed.status, 0, resumed.text)
            XCTAssertTrue(resumed.text.contains("not resumed: the destination cannot resume"), resumed.text)
            let status = try await a.client.migration("late")
            let report = try XCTUnwrap(status.report)
            XCTAssertEqual(report.resumedPrecopy?.resumed, false)
            XCTAssertEqual(report.passes.first?.unchangedPages, 0)
            _ = try XCTUnwrapAsync(await b.memstressStatus(after: 0, of: "late"), "the guest runs at B")

            // The migration succeeded: there is nothing left to resume, or to discard.
            let (discardCode, discardError) = try await a.failure("POST", "/vms/late/migration/discard", body: "")
            XCTAssertEqual(discardCode, 409)
            XCTAssertEqual(discardError.error, "nothing_to_resume")
            let (code, error) = try await a.failure("POST", "/vms/late/migrate", body: #"{"resume": true}"#)
            XCTAssertEqual(code, 409)
            XCTAssertEqual(error.error, "nothing_to_resume")
        }
    }

    /// A source that will not resume says so: the destination drops what it kept, and the migration is no longer
    /// resumable.
    func testASourceThatWillNotResumeTellsTheDestinationToDropWhatItKept() async throws {
        try await withTwoDaemons { a, _, _, bListener in
            _ = try await createFilledGuest("gone", on: a)
            let (proxy, _) = try await cutInPassZero("gone", at: 50, from: a, to: bListener)
            defer { proxy.close() }
            let discarded = try await runMigratectl(socket: a.socketPath, ["migration", "discard", "gone"])
            XCTAssertEqual(discarded.status, 0, discarded.text)
            XCTAssertTrue(discarded.text.contains("the destination keeps nothing for a resume"), discarded.text)
            let status = try await a.client.migration("gone")
            XCTAssertNil(status.report?.resumable)
            let resumed = try await runMigratectl(socket: a.socketPath, ["migrate", "gone", "--resume"])
            XCTAssertEqual(resumed.status, 1, resumed.text)
            XCTAssertTrue(resumed.text.contains("nothing_to_resume"), resumed.text)
        }
    }
}
