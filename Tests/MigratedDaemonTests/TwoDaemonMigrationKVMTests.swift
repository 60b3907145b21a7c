import Foundation
import Logging
import MigratedAPI
import MicroVM
import MigratedDaemon
import TestSupport
import XCTest

/// Two real daemons on this machine, each with its own control socket, TLS identity and migration listener on
/// loopback: a guest moves from one to the other and back, driven by migratectl and the API.
final class TwoDaemonMigrationKVMTests: KVMTestCase {
    /// The issue's guest: 1 GiB of RAM, a 256 MiB working set written at 100 MiB/s.
    static let guest = "workload=memstress size_mib=256 rate_mib=100 pattern=mixed"

    /// A daemon that listens for migrations on 127.0.0.1 with `certificate`, accepting peers named `allowed`; a post-copy
    /// whose link broke waits `postCopyRecoveryTimeout` seconds for a resume there, as source or destination.
    func makeDaemon(certificate: String, allowed: [String], memoryBacking: GuestMemory.Backing = .sharedMemory,
                    budgetMiB: UInt64 = 4096, inDoubtDirectory: String? = nil,
                    postCopyRecoveryTimeout: Double = DaemonConfiguration.defaultPostCopyRecoveryTimeout,
                    preCopyResumeGrace: Double = DaemonConfiguration.defaultPreCopyResumeGrace) async throws -> (TestDaemon, EngineIncomingListener) {
        let tls = TLSFiles(certificate: "\(TestCertificates.directory)/\(certificate).pem",
                           key: "\(TestCertificates.directory)/\(certificate).key",
                           ca: "\(TestCertificates.directory)/ca.pem", allowedPeers: allowed)
        var logger = Logger(label: "incoming")
        logger.logLevel = .error
        let listener = EngineIncomingListener(logger: logger)
        let settings = IncomingMigrationSettings(address: .tcp(host: "127.0.0.1", port: 0), security: .tls(tls), memoryBacking: memoryBacking,
                                                 postCopyRecoveryTimeout: postCopyRecoveryTimeout, preCopyResumeGrace: preCopyResumeGrace)
        let daemon = TestDaemon(memoryBudgetMiB: budgetMiB, memoryBacking: memoryBacking, tls: tls, incoming: (settings, listener),
                                inDoubtDirectory: inDoubtDirectory, postCopyRecoveryTimeout: postCopyRecoveryTimeout)
        try await daemon.start()
        return (daemon, listener)
    }

    /// Runs `body` with host A and host B, and shuts both down whatever happens. Host A presents the client
    /// certificate and accepts the server's name; host B the other way round.
    func withTwoDaemons(bMemory: GuestMemory.Backing = .sharedMemory, budgetMiB: UInt64 = 4096,
                        postCopyRecoveryTimeout: Double = DaemonConfiguration.defaultPostCopyRecoveryTimeout,
                        preCopyResumeGrace: Double = DaemonConfiguration.defaultPreCopyResumeGrace,
                        _ body: (_ a: TestDaemon, _ aListener: EngineIncomingListener,
                                 _ b: TestDaemon, _ bListener: EngineIncomingListener) async throws -> Void) async throws {
        let (a, aListener) = try await makeDaemon(certificate: "client", allowed: TestCertificates.serverNames, budgetMiB: budgetMiB,
                                                  postCopyRecoveryTimeout: postCopyRecoveryTimeout)
        let (b, bListener) = try await makeDaemon(certificate: "server", allowed: TestCertificates.clientNames, memoryBacking: bMemory,
                                                  budgetMiB: budgetMiB, postCopyRecoveryTimeout: postCopyRecoveryTimeout,
                                                  preCopyResumeGrace: preCopyResumeGrace)
        do {
            try await body(a, aListener, b, bListener)
        } catch {
            await a.stop()
            await b.stop()
            throw error
        }
        await a.stop()
        await b.stop()
    }

    func testAGuestMovesOverMutualTLSAndBack() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        try await withTwoDaemons { a, aListener, b, bListener in
            _ = try await a.client.createVM(VMCreateRequest(id: "mover", image: image, memoryMib: 1024, cmdline: Self.guest))
            let before = try XCTUnwrapAsync(await a.memstressStatus(after: 0, of: "mover"), "the guest runs on A")
            let toB = try XCTUnwrap(bListener.address).description

            // There: migratectl follows the migration, one line per update on a pipe, then the report.
            let output = try await runMigratectl(socket: a.socketPath, [
                "migrate", "mover", "--to", toB, "--channels", "2", "--compression", "lz4", "--interval", "0.1"])
            XCTAssertEqual(output.status, 0, output.text)
            XCTAssertTrue(output.text.contains("migrated mover to \(toB)"), output.text)
            XCTAssertTrue(output.text.contains("lz4, 2 channels"), output.text)
            let source = try await a.client.vm("mover")
            XCTAssertEqual(source.state, .migrated, "the source VM is gone from A")
            let onB = try XCTUnwrapAsync(await b.memstressStatus(after: before.ticks, of: "mover"), "the guest carries on at B")
            XCTAssertGreaterThanOrEqual(onB.generation, before.generation)
            let report = try await a.client.migration("mover").report
            XCTAssertEqual(report?.succeeded, true)
            XCTAssertNotNil(report?.downtimeMs)
            let metrics = try await a.client.metrics()
            XCTAssertTrue(metrics.contains("migrated_migrations_completed_total{outcome=\"succeeded\"} 1\n"), metrics)

            // And back, with zstd, through the API. "mover" is still a record on A, so it comes back renamed.
            let toA = try XCTUnwrap(aListener.address).description
            _ = try await b.client.migrate("mover", MigrationRequest(peer: toA, channels: 1, compression: .zstd))
            let back = try await finalStatus(of: "mover", on: b)
            XCTAssertEqual(back.phase, .completed, back.report?.error ?? "")
            let returned = try await a.client.listVMs().filter { $0.state == .running }
            XCTAssertEqual(returned.count, 1)
            let home = try XCTUnwrapAsync(await a.memstressStatus(after: onB.ticks, of: returned[0].id), "the guest carries on at A")
            XCTAssertGreaterThanOrEqual(home.generation, onB.generation)
        }
    }

    /// A guest that rewrites most pages with the bytes they hold: the report, in the API and in migratectl's lines,
    /// counts the pages of later passes that went as unchanged descriptors (stream.md §6.4.1), and the guest carries
    /// on at B, verifying its memory.
    func testUnchangedPagesAreReported() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        try await withTwoDaemons { a, _, b, bListener in
            _ = try await a.client.createVM(VMCreateRequest(id: "rewriter", image: image, memoryMib: 256,
                                                            cmdline: "workload=memstress size_mib=64 rate_mib=200 pattern=random same_pct=90"))
            // From the second status line on, the working set (0.3 s at 200 MiB/s) is written.
            let before = try XCTUnwrapAsync(await a.memstressStatus(after: 100, of: "rewriter"), "the guest runs on A")
            let toB = try XCTUnwrap(bListener.address).description
            let output = try await runMigratectl(socket: a.socketPath, [
                "migrate", "rewriter", "--to", toB, "--channels", "2", "--compression", "none", "--interval", "0.1"])
            XCTAssertEqual(output.status, 0, output.text)
            XCTAssertTrue(output.text.contains("pass 0: ") && output.text.contains(", 0 unchanged)"), output.text)
            let status = try await a.client.migration("rewriter")
            let report = try XCTUnwrap(status.report)
            XCTAssertEqual(report.passes.first?.unchangedPages, 0)
            let later = report.passes.dropFirst().reduce(0) { $0 + ($1.unchangedPages ?? 0) }
            XCTAssertGreaterThan(later, 0, "\(report.passes)")
            XCTAssertTrue(output.text.contains(", \(report.passes.last!.unchangedPages!) unchanged)"), output.text)
            _ = try XCTUnwrapAsync(await b.memstressStatus(after: before.ticks, of: "rewriter"), "the guest carries on at B")
        }
    }

    /// Host B keeps guest RAM on huge pages (`guest_memory`): a guest from A arrives there on huge pages and carries
    /// on, and each daemon reports the memory its VM has. Uncompressed, so that its pages are decrypted straight
    /// into guest memory at B.
    func testAGuestArrivesOnHugePagesWhereTheDaemonKeepsThem() async throws {
        try requireFreeHugePages(128)
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        try await withTwoDaemons(bMemory: .hugePages) { a, _, b, bListener in
            _ = try await a.client.createVM(VMCreateRequest(id: "onto-huge", image: image, memoryMib: 256,
                                                            cmdline: "workload=memstress size_mib=64 rate_mib=100 pattern=mixed"))
            let before = try XCTUnwrapAsync(await a.memstressStatus(after: 0, of: "onto-huge"), "the guest runs on A")
            let onA = try await a.client.vm("onto-huge")
            XCTAssertEqual(onA.memoryBacking, "shared-memory")
            _ = try await a.client.migrate("onto-huge", MigrationRequest(peer: try XCTUnwrap(bListener.address).description,
                                                                        channels: 2, compression: .none))
            let status = try await finalStatus(of: "onto-huge", on: a)
            XCTAssertEqual(status.phase, .completed, status.report?.error ?? "")
            let onB = try await b.client.vm("onto-huge")
            XCTAssertEqual(onB.memoryBacking, "huge-pages")
            let after = try XCTUnwrapAsync(await b.memstressStatus(after: before.ticks, of: "onto-huge"), "the guest carries on at B")
            XCTAssertGreaterThanOrEqual(after.generation, before.generation)
        }
    }

    /// Host B keeps RAM on huge pages and its pool cannot hold the guest: the migration fails before switchover
    /// with B's reason, the source runs on at A, and nothing runs at B.
    func testAGuestBiggerThanTheDestinationsHugePagePoolStaysAtTheSource() async throws {
        let memoryMib = max(256, (GuestMemory.freeHugePages() + 1) * 2)
        guard memoryMib <= 2048 else { throw XCTSkip("the huge-page pool is too large to overflow with a test guest") }
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        try await withTwoDaemons(bMemory: .hugePages) { a, _, b, bListener in
            _ = try await a.client.createVM(VMCreateRequest(id: "too-big", image: image, memoryMib: memoryMib,
                                                            cmdline: "workload=memstress size_mib=64 rate_mib=50 pattern=mixed"))
            let before = try XCTUnwrapAsync(await a.memstressStatus(after: 0, of: "too-big"), "the guest runs on A")
            _ = try await a.client.migrate("too-big", MigrationRequest(peer: try XCTUnwrap(bListener.address).description))
            let last = try await finalStatus(of: "too-big", on: a)
            XCTAssertEqual(last.phase, .failed)
            let reason = last.report?.error ?? ""
            XCTAssertTrue(reason.contains("huge pages") && reason.contains("nr_hugepages"), reason)
            try await assertSourceCarriesOn("too-big", at: a, after: before.ticks, nothingAt: b)
        }
    }

    /// A migration the guest outpaces (a tiny bandwidth cap), cancelled from migratectl: the source keeps
    /// running at A, throttle lifted, and nothing runs at B.
    func testCancelledMigrationLeavesTheSourceRunning() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        try await withTwoDaemons { a, _, b, bListener in
            _ = try await a.client.createVM(VMCreateRequest(id: "stay", image: image, memoryMib: 128,
                                                            cmdline: "workload=memstress size_mib=64 rate_mib=50 pattern=random"))
            let before = try XCTUnwrapAsync(await a.memstressStatus(after: 0, of: "stay"), "the guest runs on A")
            let started = try await a.client.migrate("stay", MigrationRequest(
                peer: try XCTUnwrap(bListener.address).description, bandwidthLimitBytesPerSecond: 4 << 20))
            XCTAssertEqual(started.vm, "stay")
            let (status409, busy) = try await a.failure("POST", "/vms/stay/migrate",
                body: #"{"peer": "127.0.0.1:1", "security": "plaintext"}"#)
            XCTAssertEqual(status409, 409)
            XCTAssertEqual(busy.error, "migration_in_progress")
            try await Task.sleep(nanoseconds: 1_000_000_000)
            // Mid-pass progress: the pass's own rate so far, and how long the rest of it will take.
            let running = try await a.client.migration("stay")
            XCTAssertEqual(running.phase, .precopy)
            XCTAssertGreaterThan(running.rateBytesPerSecond, 0)
            XCTAssertNotNil(running.etaSeconds)
            let output = try await runMigratectl(socket: a.socketPath, ["migration", "cancel", "stay"])
            XCTAssertEqual(output.status, 0, output.text)
            let last = try await finalStatus(of: "stay", on: a)
            XCTAssertEqual(last.phase, .cancelled)
            try await assertSourceCarriesOn("stay", at: a, after: before.ticks, nothingAt: b)
        }
    }

    /// Two guests leave A for B at the same time, each on two channels: B's listener gathers the four connections
    /// into two migrations by their migration IDs, receives both side by side, and both guests carry on at B.
    /// Meanwhile a peer that connected first and never starts its TLS handshake holds nobody up.
    func testTwoConcurrentMigrationsIntoOneDaemon() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        try await withTwoDaemons { a, _, b, bListener in
            guard case .tcp(_, let port)? = bListener.address else { return XCTFail("B listens on TCP") }
            let stalled = try connectSilently(toLoopbackPort: port)
            defer { close(stalled) }
            let guests = ["left", "right"]
            var before: [String: MemstressStatus] = [:]
            for id in guests {
                _ = try await a.client.createVM(VMCreateRequest(id: id, image: image, memoryMib: 128,
                                                                cmdline: "workload=memstress size_mib=48 rate_mib=50 pattern=random"))
            }
            for id in guests { before[id] = try XCTUnwrapAsync(await a.memstressStatus(after: 0, of: id), "\(id) runs on A") }
            let toB = try XCTUnwrap(bListener.address).description
            // A cap keeps both migrations on the wire at once for a second or more.
            for id in guests {
                _ = try await a.client.migrate(id, MigrationRequest(peer: toB, channels: 2, bandwidthLimitBytesPerSecond: 32 << 20))
            }
            for id in guests {
                let last = try await finalStatus(of: id, on: a)
                XCTAssertEqual(last.phase, .completed, last.report?.error ?? "")
                // Opening the channels did not wait for the stalled peer's 10 s handshake timeout.
                XCTAssertLessThan(last.report?.setupSeconds ?? 99, 5)
            }
            let atB = try await b.client.listVMs()
            XCTAssertEqual(Set(atB.filter { $0.state == .running }.map(\.id)), Set(guests))
            for id in guests {
                let moved = try XCTUnwrapAsync(await b.memstressStatus(after: before[id]!.ticks, of: id), "\(id) carries on at B")
                XCTAssertGreaterThanOrEqual(moved.generation, before[id]!.generation)
            }
        }
    }

    /// A TCP connection to 127.0.0.1:`port` that sends nothing; the caller closes it.
    func connectSilently(toLoopbackPort port: UInt16) throws -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard fd >= 0, result == 0 else { throw NSError(domain: NSPOSIXErrorDomain, code: Int(errno)) }
        return fd
    }

    /// Polls a migration until it has ended, for at most a minute.
    /// After a migration that failed or was cancelled: the VM still runs at the source, its guest writing and
    /// verifying, and the destination started nothing.
    func assertSourceCarriesOn(_ id: String, at source: TestDaemon, after ticks: UInt64, nothingAt destination: TestDaemon,
                               file: StaticString = #filePath, line: UInt = #line) async throws {
        let vm = try await source.client.vm(id)
        XCTAssertEqual(vm.state, .running, file: file, line: line)
        let later = await (try? source.memstressStatus(after: ticks + 100, of: id)) ?? nil
        XCTAssertNotNil(later, "the source carries on", file: file, line: line)
        let there = try await destination.client.listVMs()
        XCTAssertEqual(there, [], "nothing was started at the destination", file: file, line: line)
    }

    func finalStatus(of id: String, on daemon: TestDaemon) async throws -> MigrationStatus {
        let deadline = Date(timeIntervalSinceNow: 60 * sanitizerSlowdown)
        var status = try await daemon.client.migration(id)
        while !status.phase.isFinal, Date() < deadline {
            try await Task.sleep(nanoseconds: 100_000_000)
            status = try await daemon.client.migration(id)
        }
        return status
    }

    func runMigratectl(socket: String, _ arguments: [String]) async throws -> ToolOutput {
        try await runTool("migratectl", arguments + ["--socket", socket])
    }
}

/// XCTUnwrap for a value an async call produced.
func XCTUnwrapAsync<T>(_ value: T?, _ message: String, file: StaticString = #filePath, line: UInt = #line) throws -> T {
    try XCTUnwrap(value, message, file: file, line: line)
}
