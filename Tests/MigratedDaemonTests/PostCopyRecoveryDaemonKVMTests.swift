import Foundation
import MigratedAPI
import MigratedDaemon
import TestSupport
import XCTest

/// Post-copy recovery through the daemons (issue 15 item 2): the migration goes through a TCP proxy, which breaks
/// every connection once post-copy is under way; both daemons show the post-copy paused and how long they will wait,
/// and `migratectl migrate VM --resume` carries it on, or, without a resume in time, both give up and say why. The
/// two daemons and their helpers are TwoDaemonMigrationKVMTests'.
extension TwoDaemonMigrationKVMTests {
    /// The fast writer of testAFastWriterMovesInPostCopy, capped at 16 MiB/s so that post-copy is on the wire for
    /// seconds, its link cut once post-copy has pushed 10, 50 and 90 % of the pages that were missing, one migration
    /// each: after `--resume` it lands at B, its digests agree (no page lost) and it verifies its memory there.
    func testAPostCopyWhoseLinkIsCutCarriesOnAfterAResume() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        for percent in [10.0, 50.0, 90.0] {
            try await withTwoDaemons { a, _, b, bListener in
                _ = try await a.client.createVM(VMCreateRequest(id: "cut", image: image, memoryMib: 256, cmdline: Self.fastWriter))
                let before = try XCTUnwrapAsync(await a.memstressStatus(after: 0, of: "cut"), "the guest runs on A")
                let (proxy, via) = try await migrateThroughProxy("cut", from: a, to: bListener)
                defer { proxy.close() }
                try await cutInPostCopy("cut", at: percent, proxy: proxy, source: a, destination: b)

                let resumed = try await runMigratectl(socket: a.socketPath, ["migrate", "cut", "--resume", "--interval", "0.1"])
                print(resumed.text)
                XCTAssertEqual(resumed.status, 0, "\(percent) %: \(resumed.text)")
                XCTAssertTrue(resumed.text.contains("migrated cut to \(via)"), resumed.text)

                let status = try await a.client.migration("cut")
                XCTAssertEqual(status.phase, .completed, "\(percent) %: \(status.report?.error ?? "")")
                XCTAssertNil(status.postcopyPause)
                let postCopy = try XCTUnwrap(status.report?.postCopy, "the migration finished in post-copy")
                XCTAssertGreaterThan(postCopy.missingPages, 0)
                let source = try await a.client.vm("cut")
                XCTAssertEqual(source.state, .migrated)

                let received = try await incomingRecord(on: b)
                XCTAssertEqual(received.outcome, .received, "\(percent) %: \(received.error ?? "")")
                XCTAssertEqual(received.vm, "cut")
                XCTAssertEqual(received.postCopy?.missingPages, postCopy.missingPages)
                let landed = try XCTUnwrapAsync(await b.memstressStatus(after: before.ticks, of: "cut"), "\(percent) %: the guest carries on at B")
                _ = try XCTUnwrapAsync(await b.memstressStatus(after: landed.ticks, of: "cut"), "\(percent) %: and goes on verifying")
                let atB = try await b.client.vm("cut")
                XCTAssertEqual(atB.state, .running)
                XCTAssertNil(atB.arrivingFrom)
                XCTAssertNil(atB.postcopyPause)

                // Nothing waits for a resume any more.
                let (code, error) = try await a.failure("POST", "/vms/cut/migrate", body: #"{"resume": true}"#)
                XCTAssertEqual(code, 409)
                XCTAssertEqual(error.error, "nothing_to_resume")
            }
        }
    }

    /// The link is cut in post-copy and nobody resumes within the daemons' 10 s: B stops the guest as failed and records
    /// why; A's migration fails after its commit, in doubt, with the reason, and its VM stays paused there.
    func testAPostCopyNotResumedInTimeStopsTheGuestAtTheDestination() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        try await withTwoDaemons(postCopyRecoveryTimeout: 10) { a, _, b, bListener in
            _ = try await a.client.createVM(VMCreateRequest(id: "lost", image: image, memoryMib: 256, cmdline: Self.fastWriter))
            _ = try XCTUnwrapAsync(await a.memstressStatus(after: 0, of: "lost"), "the guest runs on A")
            let (proxy, _) = try await migrateThroughProxy("lost", from: a, to: bListener)
            defer { proxy.close() }
            try await cutInPostCopy("lost", at: 30, proxy: proxy, source: a, destination: b, wait: 10)

            let status = try await finalStatus(of: "lost", on: a)
            XCTAssertEqual(status.phase, .failed)
            XCTAssertNil(status.postcopyPause)
            XCTAssertEqual(status.report?.committed, true)
            let reason = try XCTUnwrap(status.report?.error)
            XCTAssertTrue(reason.contains("no resume came within 10"), reason)
            let source = try await a.client.vm("lost")
            XCTAssertEqual(source.state, .paused)
            XCTAssertEqual(source.inDoubt?.reason, reason)

            let record = try await incomingRecord(on: b)
            XCTAssertEqual(record.outcome, .failed)
            XCTAssertEqual(record.vm, "lost")
            XCTAssertTrue(record.error?.contains("no resume came within 10") ?? false, record.error ?? "")
            let stopped = try await assertStoppedAfterItStarted("lost", on: b)
            XCTAssertNil(stopped.postcopyPause)

            let late = try await runMigratectl(socket: a.socketPath, ["migrate", "lost", "--resume"])
            XCTAssertEqual(late.status, 1, late.text)
            XCTAssertTrue(late.text.contains("nothing_to_resume"), late.text)
        }
    }

    /// 128 MiB of random data rewritten at 800 MiB/s: pre-copy alone cannot move it within 1 ms of downtime.
    static let fastWriter = "workload=memstress size_mib=128 rate_mib=800 pattern=random"

    /// Starts migrating `id` from `source` to the daemon of `listener` through a new proxy, at 16 MiB/s, into post-copy
    /// after one pass; returns the proxy and the address the source was given.
    func migrateThroughProxy(_ id: String, from source: TestDaemon, to listener: EngineIncomingListener) async throws -> (TCPProxy, String) {
        guard case .tcp(_, let port)? = listener.address else { throw XCTSkip("the destination does not listen on TCP") }
        let proxy = try TCPProxy(to: port)
        let via = "127.0.0.1:\(proxy.port)"
        _ = try await source.client.migrate(id, MigrationRequest(peer: via, bandwidthLimitBytesPerSecond: 16 << 20, downtimeLimitMs: 1,
                                                                 postcopy: true, postcopyAfterPasses: 1))
        return (proxy, via)
    }

    /// Cuts the proxy's connections once `source`'s migration of `id` has pushed `percent` % of the post-copy's pages,
    /// and checks that both daemons then report the post-copy paused, waiting at most `wait` seconds.
    func cutInPostCopy(_ id: String, at percent: Double, proxy: TCPProxy, source: TestDaemon, destination: TestDaemon,
                       wait: Double = DaemonConfiguration.defaultPostCopyRecoveryTimeout) async throws {
        let cutAt = try await poll { try await source.client.migration(id) } until: {
            $0.phase.isFinal || ($0.phase == .postcopy && $0.percent >= percent)
        }
        XCTAssertEqual(cutAt.phase, .postcopy, "\(percent) %: the migration was in post-copy when its link was cut")
        proxy.cut()

        let paused = try await poll { try await source.client.migration(id) } until: { $0.phase != .postcopy }
        XCTAssertEqual(paused.phase, .postcopyPaused, "\(percent) %: \(paused.report?.error ?? "")")
        let sourcePause = try XCTUnwrap(paused.postcopyPause, "the source says how long it waits")
        XCTAssertGreaterThan(sourcePause.waitSecondsLeft, 0)
        XCTAssertLessThanOrEqual(sourcePause.waitSecondsLeft, wait)
        let shown = try await runMigratectl(socket: source.socketPath, ["migration", "show", id])
        XCTAssertTrue(shown.text.contains("postcopy-paused"), shown.text)
        XCTAssertTrue(shown.text.contains("migratectl migrate \(id) --resume"), shown.text)

        let arriving = try await poll { try await destination.client.vm(id) } until: { $0.postcopyPause != nil || $0.state != .running }
        XCTAssertEqual(arriving.state, .running, "the guest runs on at B, its faults waiting")
        let destinationPause = try XCTUnwrap(arriving.postcopyPause, "\(percent) %: B says it waits for a resume")
        XCTAssertNotNil(destinationPause.reason)
        XCTAssertLessThanOrEqual(destinationPause.waitSecondsLeft, wait)
        let listed = try await runMigratectl(socket: destination.socketPath, ["vm", "list"])
        XCTAssertTrue(listed.text.contains("postcopy-paused"), listed.text)
    }

    /// Polls `get` every 10 ms until `done` says so, for at most a minute; returns the last value.
    func poll<T>(_ get: () async throws -> T, until done: (T) -> Bool) async throws -> T {
        let deadline = Date(timeIntervalSinceNow: 60 * sanitizerSlowdown)
        var value = try await get()
        while !done(value), Date() < deadline {
            try await Task.sleep(nanoseconds: 10_000_000)
            value = try await get()
        }
        return value
    }
}
