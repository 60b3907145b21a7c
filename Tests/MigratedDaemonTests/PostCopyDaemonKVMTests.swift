import Foundation
import MicroVM
import MigratedAPI
import MigratedDaemon
import TestSupport
import XCTest

/// Post-copy through the daemons (issue 15 item 1): asked for with migratectl's --postcopy flags, shown in both
/// daemons' records, and refused clearly by a destination that cannot do it. The two daemons and their helpers are
/// TwoDaemonMigrationKVMTests'.
extension TwoDaemonMigrationKVMTests {
    /// A guest rewriting its 128 MiB of random data at 800 MiB/s, which pre-copy alone cannot move within 1 ms of
    /// downtime: it goes post-copy after one pass, lands at B and verifies its memory there throughout, and both
    /// daemons account for the pages that were missing when it started at B.
    func testAFastWriterMovesInPostCopy() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        try await withTwoDaemons { a, _, b, bListener in
            _ = try await a.client.createVM(VMCreateRequest(id: "fast", image: image, memoryMib: 256,
                                                            cmdline: "workload=memstress size_mib=128 rate_mib=800 pattern=random"))
            let before = try XCTUnwrapAsync(await a.memstressStatus(after: 0, of: "fast"), "the guest runs on A")
            let toB = try XCTUnwrap(bListener.address).description
            let output = try await runMigratectl(socket: a.socketPath, [
                "migrate", "fast", "--to", toB, "--postcopy-after", "1", "--downtime-limit-ms", "1", "--interval", "0.1"])
            print(output.text)
            XCTAssertEqual(output.status, 0, output.text)
            XCTAssertTrue(output.text.contains("migrated fast to \(toB)"), output.text)

            let status = try await a.client.migration("fast")
            let report = try XCTUnwrap(status.report)
            XCTAssertEqual(status.phase, .completed, report.error ?? "")
            let postCopy = try XCTUnwrap(report.postCopy, "the migration finished in post-copy")
            XCTAssertGreaterThan(postCopy.missingPages, 0)
            XCTAssertLessThanOrEqual(postCopy.requestedPages, postCopy.missingPages)
            XCTAssertEqual(report.passes.count, 1, "one pre-copy pass, then post-copy")
            XCTAssertTrue(output.text.contains("post-copy: \(postCopy.missingPages) pages missing at the start"), output.text)

            // The source was stopped and freed once the destination had every page and the digests agreed.
            let source = try await a.client.vm("fast")
            XCTAssertEqual(source.state, .migrated)
            XCTAssertEqual(source.stopReason, "migrated to \(toB)")
            let metrics = try await a.client.metrics()
            XCTAssertTrue(metrics.contains("migrated_guest_memory_bytes 0\n"), metrics)

            // B's account: the same missing pages, and as many asked for as the source answered requests (one page
            // each). Its record may come a moment after the source's report: it follows the source's last END.
            let received = try await incomingRecord(on: b)
            XCTAssertEqual(received.outcome, .received, received.error ?? "")
            XCTAssertEqual(received.vm, "fast")
            XCTAssertEqual(received.postCopy?.missingPages, postCopy.missingPages)
            XCTAssertEqual(received.postCopy?.requestedPages, postCopy.requests)
            let listed = try await runMigratectl(socket: b.socketPath, ["migration", "incoming"])
            print(listed.text)
            XCTAssertTrue(listed.text.contains("post-copy: \(postCopy.missingPages) pages missing at the start"), listed.text)

            // The guest carries on at B, arrived, verifying every status line it prints.
            let landed = try XCTUnwrapAsync(await b.memstressStatus(after: before.ticks, of: "fast"), "the guest carries on at B")
            XCTAssertGreaterThanOrEqual(landed.generation, before.generation)
            _ = try XCTUnwrapAsync(await b.memstressStatus(after: landed.ticks, of: "fast"), "and goes on verifying")
            let atB = try await b.client.vm("fast")
            XCTAssertEqual(atB.state, .running)
            XCTAssertNil(atB.arrivingFrom, "the migration has ended")
        }
    }

    /// B keeps guest RAM on huge pages, which userfaultfd cannot fill 4 KiB at a time, so its receiver does not offer
    /// post-copy: a migration that asks for it fails at negotiation with the reason, before the switchover, and the
    /// guest runs on at A.
    func testPostCopyIntoAHugePageDaemonIsRefused() async throws {
        try requireFreeHugePages(128)
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        try await withTwoDaemons(bMemory: .hugePages) { a, _, b, bListener in
            _ = try await a.client.createVM(VMCreateRequest(id: "stays", image: image, memoryMib: 256,
                                                            cmdline: "workload=memstress size_mib=64 rate_mib=100 pattern=random"))
            let before = try XCTUnwrapAsync(await a.memstressStatus(after: 0, of: "stays"), "the guest runs on A")
            let toB = try XCTUnwrap(bListener.address).description
            let output = try await runMigratectl(socket: a.socketPath, ["migrate", "stays", "--to", toB, "--postcopy", "--interval", "0.1"])
            print(output.text)
            XCTAssertEqual(output.status, 1, output.text)
            XCTAssertTrue(output.text.contains("cannot finish in post-copy"), output.text)
            let status = try await a.client.migration("stays")
            XCTAssertEqual(status.phase, .failed)
            XCTAssertEqual(status.report?.committed, false)
            XCTAssertNil(status.report?.postCopy)
            try await assertSourceCarriesOn("stays", at: a, after: before.ticks, nothingAt: b)
        }
    }

    /// The source daemon dies in post-copy, after B started the guest and before it had every page: B stops the guest,
    /// which cannot run on without them, shows its VM failed with the reason, frees its memory and records why, and
    /// answers throughout. A bandwidth cap keeps post-copy on the wire for seconds, and B lists the VM as arriving
    /// from its start, so the kill lands after the start. B waits 2 s for a resume that cannot come.
    func testASourceKilledInPostCopyStopsTheGuestAtTheDestination() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        let (b, bListener) = try await makeDaemon(certificate: "server", allowed: TestCertificates.clientNames, postCopyRecoveryTimeout: 2)
        do {
            let a = try DaemonProcess(bin: DaemonProcess.besideTests, certificate: "client", allowedPeers: TestCertificates.serverNames)
            defer { a.stop() }
            let started = try a.ctl(["vm", "start", "--id", "cut", "--image", image, "--memory", "256M",
                                     "--cmdline", "workload=memstress size_mib=128 rate_mib=800 pattern=random"])
            XCTAssertEqual(started.status, 0, started.text)
            XCTAssertNotNil(try a.memstress(of: "cut", after: 0), "the guest runs on A")
            let toB = try XCTUnwrap(bListener.address).description
            let migrate = try a.ctl(["migrate", "cut", "--to", toB, "--bandwidth", "16M", "--postcopy-after", "1",
                                     "--downtime-limit-ms", "1", "--detach"])
            XCTAssertEqual(migrate.status, 0, migrate.text)

            let deadline = Date(timeIntervalSinceNow: 60 * sanitizerSlowdown)
            var arriving: VMInfo?
            while arriving == nil, Date() < deadline, try await b.client.incomingMigrations().isEmpty {
                if let vm = try? await b.client.vm("cut"), vm.arrivingFrom != nil { arriving = vm } else {
                    try await Task.sleep(nanoseconds: 10_000_000)
                }
            }
            let running = try XCTUnwrap(arriving, "B listed the guest as arriving while post-copy ran")
            XCTAssertEqual(running.state, .running)
            a.kill9()

            let record = try await incomingRecord(on: b)
            XCTAssertEqual(record.outcome, .failed)
            XCTAssertEqual(record.vm, "cut")
            XCTAssertNil(record.postCopy)
            XCTAssertTrue(record.error?.hasPrefix("the guest had started here and was stopped: ") ?? false, record.error ?? "")
            let stopped = try await assertStoppedAfterItStarted("cut", on: b)
            XCTAssertNil(stopped.arrivingFrom)
            let list = try await runMigratectl(socket: b.socketPath, ["migration", "incoming"])
            print(list.text)
        } catch {
            await b.stop()
            throw error
        }
        await b.stop()
    }

    /// The first record of `daemon`'s incoming migrations, polled for at most a minute.
    /// `daemon` stopped the arrived VM `id` as failed, saying its migration failed after the guest had started there,
    /// and freed its memory; returns the VM as the daemon shows it.
    @discardableResult
    func assertStoppedAfterItStarted(_ id: String, on daemon: TestDaemon, file: StaticString = #filePath, line: UInt = #line) async throws -> VMInfo {
        let stopped = try await daemon.client.vm(id)
        XCTAssertEqual(stopped.state, .failed, file: file, line: line)
        XCTAssertTrue(stopped.stopReason?.contains("failed after the guest had started here") ?? false, stopped.stopReason ?? "", file: file, line: line)
        let held = try await metric("migrated_guest_memory_bytes", of: daemon)
        XCTAssertEqual(held, 0, "the daemon freed the guest's memory", file: file, line: line)
        return stopped
    }

    func incomingRecord(on daemon: TestDaemon) async throws -> IncomingMigrationRecord {
        let deadline = Date(timeIntervalSinceNow: 60 * sanitizerSlowdown)
        var records = try await daemon.client.incomingMigrations()
        while records.isEmpty, Date() < deadline {
            try await Task.sleep(nanoseconds: 100_000_000)
            records = try await daemon.client.incomingMigrations()
        }
        return try XCTUnwrap(records.first, "no incoming migration ended")
    }
}

/// The daemon's side of a VM that runs here before its migration has ended, as in post-copy, driven through the
/// desk the incoming listener uses, so that the end of the arrival comes when the test says.
final class ArrivingVMKVMTests: KVMTestCase {
    /// Registered as its guest starts, the VM is listed as running and arriving, and is neither migrated nor saved
    /// (its memory may still lack pages); when its migration fails after all, it is stopped as failed with the reason
    /// and its memory goes back to the budget. A second end of the same arrival changes nothing.
    func testAnArrivingVMRunsIsNotMovedAndIsStoppedWhenItsMigrationFails() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        try await withDaemon { daemon in
            let vms = daemon.daemon.api.vms
            let cmdline = "workload=memstress size_mib=16 rate_mib=10 pattern=random"
            try vms.reserveArrival(memory: 128 << 20)
            let machine = try MicroVM(booting: try TestGuest.image(), commandLine: cmdline,
                                      configuration: MicroVMConfiguration(memorySize: 128 << 20, console: SerialConsole(output: nil)))
            machine.start()
            let id = try vms.adoptArrival(IncomingVM(machine: machine, configuration: VMCreateRequest(
                id: "arriving", image: image, memoryMib: 128, cmdline: cmdline), peer: "10.0.0.1"))
            XCTAssertEqual(id, "arriving")

            let vm = try await daemon.client.vm(id)
            XCTAssertEqual(vm.state, .running)
            XCTAssertEqual(vm.arrivingFrom, "10.0.0.1")
            let list = try await runTool("migratectl", ["vm", "list", "--socket", daemon.socketPath])
            XCTAssertTrue(list.text.contains("arriving        128M"), list.text)
            let (migrateStatus, migrate) = try await daemon.failure("POST", "/vms/arriving/migrate",
                                                                    body: #"{"peer": "127.0.0.1:1", "security": "plaintext"}"#)
            XCTAssertEqual(migrateStatus, 409)
            XCTAssertEqual(migrate.error, "vm_arriving")
            XCTAssertTrue(migrate.message.contains("10.0.0.1"), migrate.message)
            let (snapshotStatus, snapshot) = try await daemon.failure("POST", "/vms/arriving/snapshot",
                                                                      body: #"{"path": "/tmp/arriving-never-written.snap"}"#)
            XCTAssertEqual(snapshotStatus, 409)
            XCTAssertEqual(snapshot.error, "vm_arriving")

            vms.endArrival(id: id, machine: machine, failure: "test: the pages it lacked will not come")
            let failed = try await daemon.client.vm(id)
            XCTAssertEqual(failed.state, .failed)
            XCTAssertEqual(failed.stopReason, "test: the pages it lacked will not come")
            XCTAssertNil(failed.arrivingFrom)
            let metrics = try await daemon.client.metrics()
            XCTAssertTrue(metrics.contains("migrated_guest_memory_bytes 0\n"), metrics)
            vms.endArrival(id: id, machine: machine, failure: "again")
            let still = try await daemon.client.vm(id)
            XCTAssertEqual(still.stopReason, "test: the pages it lacked will not come")
        }
    }
}
