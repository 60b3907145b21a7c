import Foundation
import Glibc
import MigratedAPI
import MigratedDaemon
import TestSupport
import XCTest

/// Daemons killed in the middle of a migration (issue 17, item 3). The daemon that dies runs as a process of its
/// own (`DaemonProcess`, the `migrated` built beside the tests), killed with SIGKILL or ended by a test hook
/// (`MIGRATED_FAULT_INJECT`) at an exact point of the switchover; the other runs in this process, where the test
/// reads its state. Every guest is memstress, which verifies its own memory. bench/reliability/kill-random.py
/// kills at random points instead, many times.
extension TwoDaemonMigrationKVMTests {
    static let smallGuest = "workload=memstress size_mib=32 rate_mib=50 pattern=mixed"

    /// Source A in this process (client certificate), destination B a process (server certificate) with `environment`.
    func withKillableDestination(environment: [String: String] = [:],
                                 _ body: (_ a: TestDaemon, _ b: DaemonProcess) async throws -> Void) async throws {
        let (a, _) = try await makeDaemon(certificate: "client", allowed: TestCertificates.serverNames)
        do {
            let b = try DaemonProcess(bin: DaemonProcess.besideTests, allowedPeers: TestCertificates.clientNames, environment: environment)
            defer { b.stop() }
            try await body(a, b)
        } catch {
            await a.stop()
            throw error
        }
        await a.stop()
    }

    /// The destination dies during setup (stopped, then killed, before the TLS handshake ends), during pre-copy
    /// (killed while pages flow) and during the switchover before the commit (a hook ends it after its digest check,
    /// before it answers VERIFIED). Each time the source runs on, unpaused and verifying; the destination, started
    /// again on the same socket and port, then receives the guest, which carries on verifying there.
    func testADestinationKilledBeforeTheCommitLeavesTheSourceRunningAndARestartedOneReceivesIt() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        try await withKillableDestination { a, b in
            _ = try await a.client.createVM(VMCreateRequest(id: "survivor", image: image, memoryMib: 128, cmdline: Self.smallGuest))
            var last = try XCTUnwrapAsync(await a.memstressStatus(after: 0, of: "survivor"), "the guest runs on A")
            let toB = "127.0.0.1:\(b.incomingPort)"

            // Setup: B accepts connections in the kernel but does not run, so the handshake hangs; then it dies.
            b.signal(SIGSTOP)
            _ = try await a.client.migrate("survivor", MigrationRequest(peer: toB))
            try await Task.sleep(nanoseconds: 300_000_000)
            let inSetup = try await a.client.migration("survivor")
            XCTAssertEqual(inSetup.phase, .setup)
            b.kill9()
            var status = try await finalStatus(of: "survivor", on: a)
            XCTAssertEqual(status.phase, .failed)
            XCTAssertEqual(status.report?.committed, false)
            last = try await assertRunsOn(a, "survivor", after: last.ticks)

            // Pre-copy: a bandwidth cap keeps pass 0 on the wire for seconds; B dies while pages flow.
            try b.restart()
            _ = try await a.client.migrate("survivor", MigrationRequest(peer: toB, bandwidthLimitBytesPerSecond: 8 << 20))
            let inPrecopy = try await waitForPhase(.precopy, bytes: 1 << 20, of: "survivor", on: a)
            XCTAssertEqual(inPrecopy, .precopy)
            b.kill9()
            status = try await finalStatus(of: "survivor", on: a)
            XCTAssertEqual(status.phase, .failed)
            XCTAssertEqual(status.report?.committed, false)
            last = try await assertRunsOn(a, "survivor", after: last.ticks)

            // Switchover: the source is paused and has sent everything; B dies before it answers VERIFIED.
            try b.restart(environment: [FaultInjection.environmentVariable: FaultInjection.exitBeforeVerified.rawValue])
            _ = try await a.client.migrate("survivor", MigrationRequest(peer: toB))
            status = try await finalStatus(of: "survivor", on: a)
            XCTAssertEqual(b.waitForExit(timeout: 10), 86, "B ended at its hook: \(b.log)")
            XCTAssertTrue(b.log.contains("exit-before-verified"), b.log)
            XCTAssertEqual(status.phase, .failed)
            XCTAssertEqual(status.report?.committed, false)
            XCTAssertNil(status.report?.downtimeMs)
            last = try await assertRunsOn(a, "survivor", after: last.ticks)

            // B again, whole: the guest moves and carries on there.
            try b.restart()
            XCTAssertNil(try b.vm("survivor"), "nothing of the failed attempts runs at B")
            _ = try await a.client.migrate("survivor", MigrationRequest(peer: toB, channels: 2))
            status = try await finalStatus(of: "survivor", on: a)
            XCTAssertEqual(status.phase, .completed, status.report?.error ?? "")
            let there = try XCTUnwrap(try b.memstress(of: "survivor", after: last.ticks), "the guest carries on at B: \(b.log)")
            XCTAssertTrue(there.verified)
            XCTAssertGreaterThanOrEqual(there.generation, last.generation)
        }
    }

    /// The destination dies on reading COMMIT, before it starts the guest and answers STARTED. The source cannot
    /// know whether the guest runs there: it stays paused and says so, refuses a plain resume, and runs again only
    /// when forced, after the operator found that the guest does not run at the destination.
    func testACommitWithoutStartedLeavesTheSourcePausedInDoubtUntilAForcedResume() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        try await withKillableDestination(environment: [FaultInjection.environmentVariable: FaultInjection.exitAfterCommit.rawValue]) { a, b in
            _ = try await a.client.createVM(VMCreateRequest(id: "doubt", image: image, memoryMib: 128, cmdline: Self.smallGuest))
            let before = try XCTUnwrapAsync(await a.memstressStatus(after: 0, of: "doubt"), "the guest runs on A")
            let toB = "127.0.0.1:\(b.incomingPort)"

            let output = try await runMigratectl(socket: a.socketPath, ["migrate", "doubt", "--to", toB])
            XCTAssertEqual(output.status, 1, output.text)
            XCTAssertTrue(output.text.contains("did not confirm that it started"), output.text)
            XCTAssertEqual(b.waitForExit(timeout: 10), 86, "B ended at its hook: \(b.log)")

            // A's account: paused, in doubt, naming B; the report says the same; the guest does not run.
            let vm = try await a.client.vm("doubt")
            XCTAssertEqual(vm.state, .paused)
            XCTAssertEqual(vm.inDoubt?.peer, toB)
            XCTAssertTrue(vm.inDoubt?.reason.contains("check the destination") ?? false, "\(String(describing: vm.inDoubt))")
            let status = try await a.client.migration("doubt")
            XCTAssertEqual(status.phase, .failed)
            XCTAssertEqual(status.report?.committed, true)
            XCTAssertEqual(status.report?.error, vm.inDoubt?.reason)
            let shown = try await runMigratectl(socket: a.socketPath, ["vm", "list"])
            XCTAssertTrue(shown.text.contains("in-doubt"), shown.text)
            try await Task.sleep(nanoseconds: 1_000_000_000)
            let stillPaused = try await a.client.vm("doubt")
            XCTAssertEqual(stillPaused.consoleLines, vm.consoleLines, "a guest in doubt does not run")
            let metrics = try await a.client.metrics()
            XCTAssertTrue(metrics.contains("migrated_migrations_completed_total{outcome=\"in_doubt\"} 1\n"), metrics)

            // A plain resume, or a new migration, is refused with what to do; a malformed force is a bad request.
            let (status409, refusal) = try await a.failure("POST", "/vms/doubt/resume")
            XCTAssertEqual(status409, 409)
            XCTAssertEqual(refusal.error, "migration_in_doubt")
            XCTAssertTrue(refusal.message.contains("--force") && refusal.message.contains(toB), refusal.message)
            let plain = try await runMigratectl(socket: a.socketPath, ["vm", "resume", "doubt"])
            XCTAssertEqual(plain.status, 1)
            XCTAssertTrue(plain.text.contains("migration_in_doubt"), plain.text)
            let (migrate409, paused) = try await a.failure("POST", "/vms/doubt/migrate", body: #"{"peer": "\#(toB)"}"#)
            XCTAssertEqual(migrate409, 409)
            XCTAssertEqual(paused.error, "vm_paused")
            let (status400, badForce) = try await a.failure("POST", "/vms/doubt/resume", body: #"{"force": "yes"}"#)
            XCTAssertEqual(status400, 400, badForce.message)
            let (unknown400, _) = try await a.failure("POST", "/vms/doubt/resume", body: #"{"forse": true}"#)
            XCTAssertEqual(unknown400, 400)
            let afterRefusals = try await a.client.vm("doubt")
            XCTAssertEqual(afterRefusals.state, .paused)

            // The operator asks the destination (started again): it does not run the guest, so A resumes it with force.
            try b.restart()
            XCTAssertNil(try b.vm("doubt"), "B does not run the guest")
            let forced = try await runMigratectl(socket: a.socketPath, ["vm", "resume", "doubt", "--force"])
            XCTAssertEqual(forced.status, 0, forced.text)
            let resumed = try await assertRunsOn(a, "doubt", after: before.ticks)

            // And it moves to B later, as any guest.
            _ = try await a.client.migrate("doubt", MigrationRequest(peer: toB))
            let moved = try await finalStatus(of: "doubt", on: a)
            XCTAssertEqual(moved.phase, .completed, moved.report?.error ?? "")
            let there = try XCTUnwrap(try b.memstress(of: "doubt", after: resumed.ticks), "the guest carries on at B: \(b.log)")
            XCTAssertTrue(there.verified)
        }
    }

    /// The other side of a migration in doubt: the destination started the guest and its STARTED never came (a hook
    /// closes its connections right after the start). The source is in doubt; the operator finds the guest running,
    /// verified, at the destination, and deletes it at the source, which frees its memory. One copy runs throughout.
    func testAGuestThatRunsAtTheDestinationIsDeletedAtTheSourceInDoubt() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        try await withKillableDestination(environment: [FaultInjection.environmentVariable: FaultInjection.closeBeforeStarted.rawValue]) { a, b in
            _ = try await a.client.createVM(VMCreateRequest(id: "moved", image: image, memoryMib: 128, cmdline: Self.smallGuest))
            let before = try XCTUnwrapAsync(await a.memstressStatus(after: 0, of: "moved"), "the guest runs on A")
            let output = try await runMigratectl(socket: a.socketPath, ["migrate", "moved", "--to", "127.0.0.1:\(b.incomingPort)"])
            XCTAssertEqual(output.status, 1, output.text)
            let inDoubt = try await a.client.vm("moved")
            XCTAssertEqual(inDoubt.state, .paused)
            XCTAssertNotNil(inDoubt.inDoubt, "A was not told that the guest started")

            // The operator asks B: the guest runs there, verifying, so A's paused copy must never run again.
            let there = try XCTUnwrap(try b.memstress(of: "moved", after: before.ticks), "the guest runs at B: \(b.log)")
            XCTAssertTrue(there.verified)
            let deleted = try await runMigratectl(socket: a.socketPath, ["vm", "delete", "moved"])
            XCTAssertEqual(deleted.status, 0, deleted.text)
            let memory = try await metric("migrated_guest_memory_bytes", of: a)
            XCTAssertEqual(memory, 0, "A freed the guest's memory")
            let later = try XCTUnwrap(try b.memstress(of: "moved", after: there.ticks), "and it carries on at B")
            XCTAssertTrue(later.verified)
        }
    }

    /// A daemon that shuts down while a VM is in doubt saves it first, since its guest may run nowhere else: the file
    /// verifies, and restored into the destination (which never ran the guest), the guest carries on verifying.
    func testAShutdownSavesAVMInDoubtAndItsGuestCarriesOnFromTheFile() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        let saved = NSTemporaryDirectory() + "in-doubt-" + String(UUID().uuidString.prefix(8))
        defer { try? FileManager.default.removeItem(atPath: saved) }
        let (a, _) = try await makeDaemon(certificate: "client", allowed: TestCertificates.serverNames, inDoubtDirectory: saved)
        let b = try DaemonProcess(bin: DaemonProcess.besideTests, allowedPeers: TestCertificates.clientNames,
                                  environment: [FaultInjection.environmentVariable: FaultInjection.exitAfterCommit.rawValue])
        defer { b.stop() }
        let before: MemstressStatus
        do {
            _ = try await a.client.createVM(VMCreateRequest(id: "kept", image: image, memoryMib: 128, cmdline: Self.smallGuest))
            before = try XCTUnwrapAsync(await a.memstressStatus(after: 0, of: "kept"), "the guest runs on A")
            let output = try await runMigratectl(socket: a.socketPath, ["migrate", "kept", "--to", "127.0.0.1:\(b.incomingPort)"])
            XCTAssertEqual(output.status, 1, output.text)
            XCTAssertEqual(b.waitForExit(timeout: 10), 86, "B ended at its hook: \(b.log)")
            let vm = try await a.client.vm("kept")
            XCTAssertNotNil(vm.inDoubt, "A holds the guest, paused, in doubt")
        } catch {
            await a.stop()
            throw error
        }
        await a.stop() // the daemon's shutdown, as on SIGTERM

        let files = try FileManager.default.contentsOfDirectory(atPath: saved).filter { $0.hasPrefix("kept-") && $0.hasSuffix(".snap") }
        XCTAssertEqual(files.count, 1, "one snapshot of the VM in doubt: \(files)")
        let path = try "\(saved)/\(XCTUnwrap(files.first))"
        let verified = try await runTool("vmsnap", ["verify", path])
        XCTAssertEqual(verified.status, 0, verified.text)

        // The operator finds that B never ran the guest, and restores it there from the file.
        try b.restart()
        XCTAssertNil(try b.vm("kept"), "B does not run the guest")
        let restored = try b.ctl(["restore", path, "--into-daemon", "--id", "kept"], tool: "vmsnap")
        XCTAssertEqual(restored.status, 0, restored.text)
        let there = try XCTUnwrap(try b.memstress(of: "kept", after: before.ticks), "the guest carries on at B: \(b.log)")
        XCTAssertTrue(there.verified)
    }

    /// The source daemon dies while the guest's pages flow: the destination keeps what had arrived for its grace
    /// period (a resume might come, stream.md §6.15), then discards it and gives its memory reservation back; it says
    /// why in GET /migrations/incoming and its metrics.
    func testASourceKilledMidMigrationLeavesNothingAtTheDestination() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        let (b, bListener) = try await makeDaemon(certificate: "server", allowed: TestCertificates.clientNames, preCopyResumeGrace: 2)
        do {
            let a = try DaemonProcess(bin: DaemonProcess.besideTests, certificate: "client", allowedPeers: TestCertificates.serverNames)
            defer { a.stop() }
            let started = try a.ctl(["vm", "start", "--id", "lost", "--image", image, "--memory", "256M", "--cmdline", Self.smallGuest])
            XCTAssertEqual(started.status, 0, started.text)
            XCTAssertNotNil(try a.memstress(of: "lost", after: 0), "the guest runs on A")
            let toB = try XCTUnwrap(bListener.address).description
            let migrate = try a.ctl(["migrate", "lost", "--to", toB, "--bandwidth", "8M", "--detach"])
            XCTAssertEqual(migrate.status, 0, migrate.text)

            // B has reserved the guest's memory and receives pages; then A dies.
            let deadline = Date(timeIntervalSinceNow: 20)
            while try await metric("migrated_guest_memory_bytes", of: b) != Double(256 << 20), Date() < deadline {
                try await Task.sleep(nanoseconds: 50_000_000)
            }
            let reservedAtB = try await metric("migrated_guest_memory_bytes", of: b)
            XCTAssertEqual(reservedAtB, Double(256 << 20), "B reserved the guest's memory")
            try await Task.sleep(nanoseconds: 500_000_000)
            a.kill9()

            var records: [IncomingMigrationRecord] = []
            while records.isEmpty, Date() < deadline.addingTimeInterval(10) {
                try await Task.sleep(nanoseconds: 100_000_000)
                records = try await b.client.incomingMigrations()
            }
            let record = try XCTUnwrap(records.first, "B recorded how the migration ended")
            XCTAssertEqual(records.count, 1)
            XCTAssertEqual(record.outcome, .failed)
            XCTAssertEqual(record.memoryBytes, 256 << 20)
            XCTAssertTrue(record.error?.contains("kept 2 s") ?? false, "B says why, and that it keeps what arrived: \(record.error ?? "")")
            let keptAtB = try await metric("migrated_guest_memory_bytes", of: b)
            XCTAssertEqual(keptAtB, Double(256 << 20), "what arrived is kept, and counted, for the grace period")
            try await Task.sleep(nanoseconds: 3_000_000_000)
            let heldAtB = try await metric("migrated_guest_memory_bytes", of: b)
            XCTAssertEqual(heldAtB, 0, "B gave the reservation back once the grace period ended")
            let failedAtB = try await metric("migrated_incoming_migrations_total{outcome=\"failed\"}", of: b)
            XCTAssertEqual(failedAtB, 1)
            let atB = try await b.client.listVMs()
            XCTAssertEqual(atB, [], "nothing was started at B")
        } catch {
            await b.stop()
            throw error
        }
        await b.stop()
    }

    // MARK: helpers

    /// Asserts that VM `id` runs at `daemon`, not in doubt, and that its guest verifies past `ticks`; the new status.
    func assertRunsOn(_ daemon: TestDaemon, _ id: String, after ticks: UInt64,
                      file: StaticString = #filePath, line: UInt = #line) async throws -> MemstressStatus {
        let vm = try await daemon.client.vm(id)
        XCTAssertEqual(vm.state, .running, file: file, line: line)
        XCTAssertNil(vm.inDoubt, file: file, line: line)
        let later = try XCTUnwrapAsync(await daemon.memstressStatus(after: ticks + 100, of: id), "the guest runs on, verifying",
                                       file: file, line: line)
        XCTAssertTrue(later.verified, file: file, line: line)
        return later
    }

    /// Polls the migration of `id` until it reaches `phase` with `bytes` on the wire, or ends; the phase it is in.
    func waitForPhase(_ phase: MigrationPhase, bytes: UInt64, of id: String, on daemon: TestDaemon) async throws -> MigrationPhase {
        let deadline = Date(timeIntervalSinceNow: 20)
        var status = try await daemon.client.migration(id)
        while !(status.phase == phase && status.bytesOnWire >= bytes), !status.phase.isFinal, Date() < deadline {
            try await Task.sleep(nanoseconds: 20_000_000)
            status = try await daemon.client.migration(id)
        }
        return status.phase
    }

    /// The value of the metric sample `name` (with its labels, as exposed) at `daemon`.
    func metric(_ name: String, of daemon: TestDaemon) async throws -> Double? {
        let text = try await daemon.client.metrics()
        return text.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Double($0.dropFirst(name.count + 1)) }
    }
}
