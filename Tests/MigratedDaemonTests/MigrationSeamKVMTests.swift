import Foundation
import Logging
import MicroVM
import MigratedAPI
import MigratedDaemon
import TestSupport
import XCTest

/// A MigrationService that plays a scripted migration: what the engine will do, minus the network. It holds the
/// daemon's side of the seam to its promises: the VM handed over runs, its configuration is what it was started
/// with, and handOff turns it into a migrated VM.
actor ScriptedMigrationService: MigrationService {
    private var script: [MigrationStatus] = []
    private var current: MigrationStatus?
    private var outgoing: OutgoingVM?
    private(set) var requests: [MigrationRequest] = []
    private(set) var sawRunningVM = false

    func startMigration(of vm: OutgoingVM, request: MigrationRequest) async throws(ControlError) -> MigrationStatus {
        if let current, !current.phase.isFinal { throw ControlError(409, "migration_in_progress", "already migrating") }
        requests.append(request)
        sawRunningVM = vm.machine.stopped == nil && vm.configuration.memoryMib == 128
        outgoing = vm
        let peer = request.peer
        func step(_ phase: MigrationPhase, _ pass: Int, _ percent: Double) -> MigrationStatus {
            MigrationStatus(vm: vm.id, peer: peer, phase: phase, pass: pass, percent: percent, bytesOnWire: UInt64(percent) << 20,
                            rateBytesPerSecond: 800 * 1_048_576, dirtyRateBytesPerSecond: 20 * 1_048_576,
                            expectedDowntimeMs: 40, throttle: 0, elapsedSeconds: Double(pass), etaSeconds: 1)
        }
        let report = MigrationReportDocument(
            succeeded: true, error: nil, totalSeconds: 1.5, setupSeconds: 0.01, downtimeMs: 42, wireBytes: 20 << 20, pagesSent: 5000,
            compression: request.compression, channels: request.channels,
            passes: [.init(pass: 0, pagesSent: 4096, zeroPages: 100, compressedPages: 3000, wireBytes: 16 << 20, seconds: 1,
                           dirtyRateBytesPerSecond: 20 * 1_048_576, rateBytesPerSecond: 800 * 1_048_576, expectedDowntimeMs: 40, throttle: 0)])
        var done = step(.completed, 1, 100)
        done.report = report
        script = [step(.precopy, 0, 50), step(.precopy, 1, 100), step(.switchover, 1, 100), done]
        current = step(.setup, 0, 0)
        return current!
    }

    /// Each reading moves the migration one step on; the last step hands the VM over.
    func status(ofVM id: String) async throws(ControlError) -> MigrationStatus {
        guard let status = current, status.vm == id else { throw ControlError(404, "no_migration", "VM '\(id)' has not migrated") }
        if !script.isEmpty {
            current = script.removeFirst()
            if current?.phase == .completed { outgoing?.handOff(status.peer) }
        }
        return current!
    }

    func cancel(vm id: String) async throws(ControlError) -> MigrationStatus {
        guard var status = current, status.vm == id else { throw ControlError(404, "no_migration", "VM '\(id)' has not migrated") }
        if !status.phase.isFinal {
            status.phase = .cancelled
            script = []
            current = status
        }
        return status
    }

    func metrics() async -> String {
        "# HELP migrated_migrations_started_total Outgoing migrations started.\n# TYPE migrated_migrations_started_total counter\n"
            + "migrated_migrations_started_total \(requests.count)\n"
    }
}

/// An incoming listener that keeps what the daemon gives it, so a test can play an arriving VM.
final class RecordingListener: IncomingMigrationListener, @unchecked Sendable {
    private let lock = NSLock()
    private var started: (IncomingMigrationSettings, @Sendable (IncomingVM) throws(ControlError) -> String)?
    private(set) var stopped = false

    func start(_ settings: IncomingMigrationSettings, adopt: @escaping @Sendable (IncomingVM) throws(ControlError) -> String) throws {
        lock.lock()
        started = (settings, adopt)
        lock.unlock()
    }

    func stop() {
        lock.lock()
        stopped = true
        lock.unlock()
    }

    var settings: IncomingMigrationSettings? { lock.lock(); defer { lock.unlock() }; return started?.0 }

    func arrive(_ vm: IncomingVM) throws -> String {
        lock.lock()
        let adopt = started?.1
        lock.unlock()
        guard let adopt else { throw ControlError(500, "not_started", "the daemon did not start the listener") }
        return try adopt(vm)
    }
}

final class MigrationSeamKVMTests: KVMTestCase {
    /// The daemon starts the listener with its validated settings, and a VM the listener hands over is the
    /// daemon's like any other, under the id it had at the source.
    func testIncomingVMIsAdoptedThroughTheListener() async throws {
        let image = try TestGuest.image()
        let listener = RecordingListener()
        let settings = IncomingMigrationSettings(address: .tcp(host: "127.0.0.1", port: 7070), security: .plaintext)
        try await withDaemon(incoming: (settings, listener)) { daemon in
            XCTAssertEqual(listener.settings, settings)
            let machine = try MicroVM(booting: image, commandLine: "workload=memstress size_mib=16",
                                      configuration: MicroVMConfiguration(memorySize: 64 << 20, console: SerialConsole(output: nil)))
            machine.start()
            let id = try listener.arrive(IncomingVM(machine: machine, configuration: VMCreateRequest(
                id: "from-a", image: TestGuest.path, memoryMib: 64, cmdline: "workload=memstress size_mib=16"), peer: "host-a"))
            XCTAssertEqual(id, "from-a")
            let vm = try await daemon.client.vm("from-a")
            XCTAssertEqual(vm.state, .running)
            XCTAssertEqual(vm.memoryMib, 64)
            // A second VM under an id already taken here is renamed rather than refused: it has left its source.
            let second = try MicroVM(booting: image, commandLine: "exit=pass",
                                     configuration: MicroVMConfiguration(memorySize: 32 << 20, console: SerialConsole(output: nil)))
            second.start()
            let renamed = try listener.arrive(IncomingVM(machine: second, configuration: VMCreateRequest(
                id: "from-a", image: TestGuest.path, memoryMib: 32, cmdline: "exit=pass"), peer: "host-b"))
            XCTAssertNotEqual(renamed, "from-a")
            let ids = try await daemon.client.listVMs().map(\.id)
            XCTAssertEqual(ids, ["from-a", renamed])
        }
        XCTAssertTrue(listener.stopped, "shutdown stops the listener")
    }

    func testMigrationFlowsThroughTheSeamAndMigratectlFollowsIt() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        let service = ScriptedMigrationService()
        try await withDaemon(migrations: service) { daemon in
            _ = try await daemon.client.createVM(VMCreateRequest(id: "mover", image: image, memoryMib: 128,
                                                                 cmdline: "workload=memstress size_mib=16"))
            // migratectl, as a user runs it, with its output on a pipe: one line per update, then the report.
            let output = try await runMigratectl(socket: daemon.socketPath, [
                "migrate", "mover", "--to", "10.0.0.2:7070", "--plaintext", "--channels", "2", "--compression", "zstd",
                "--bandwidth", "1G", "--downtime-limit-ms", "200", "--interval", "0.05",
            ])
            XCTAssertEqual(output.status, 0, output.text)
            let lines = output.text.split(separator: "\n").map(String.init)
            XCTAssertEqual(lines.filter { $0.hasPrefix("precopy  pass") }.count, 2, output.text)
            XCTAssertTrue(lines.contains { $0.hasPrefix("setup  pass 0") }, output.text)
            XCTAssertTrue(lines.contains { $0.hasPrefix("completed  pass 1  100.0%") }, output.text)
            XCTAssertTrue(output.text.contains("migrated mover to 10.0.0.2:7070"), output.text)
            XCTAssertTrue(output.text.contains("downtime 42 ms"), output.text)
            XCTAssertTrue(output.text.contains("zstd, 2 channels"), output.text)

            let requests = await service.requests
            XCTAssertEqual(requests, [MigrationRequest(peer: "10.0.0.2:7070", channels: 2, compression: .zstd, security: .plaintext,
                                                       bandwidthLimitBytesPerSecond: 1 << 30, downtimeLimitMs: 200)])
            let sawRunning = await service.sawRunningVM
            XCTAssertTrue(sawRunning)

            // handOff: the source is stopped and shown as migrated, its memory released.
            let moved = try await daemon.client.vm("mover")
            XCTAssertEqual(moved.state, .migrated)
            XCTAssertEqual(moved.stopReason, "migrated to 10.0.0.2:7070")
            let metrics = try await daemon.client.metrics()
            XCTAssertTrue(metrics.contains("migrated_vms{state=\"migrated\"} 1\n"), metrics)
            XCTAssertTrue(metrics.contains("migrated_guest_memory_bytes 0\n"), metrics)
            XCTAssertTrue(metrics.contains("migrated_migrations_started_total 1\n"), metrics)
            // The last status, with its report, stays readable.
            let last = try await daemon.client.migration("mover")
            XCTAssertEqual(last.report?.downtimeMs, 42)
        }
    }

    func testCancelThroughTheAPI() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        try await withDaemon(migrations: ScriptedMigrationService()) { daemon in
            _ = try await daemon.client.createVM(VMCreateRequest(id: "stay", image: image, memoryMib: 128,
                                                                 cmdline: "workload=memstress size_mib=16"))
            let started = try await daemon.client.migrate("stay", MigrationRequest(peer: "unix:/tmp/peer.sock", security: .plaintext))
            XCTAssertEqual(started.phase, .setup)
            let (status, busy) = try await daemon.failure("POST", "/vms/stay/migrate", body: #"{"peer": "b:1", "security": "plaintext"}"#)
            XCTAssertEqual(status, 409)
            XCTAssertEqual(busy.error, "migration_in_progress")
            let output = try await runMigratectl(socket: daemon.socketPath, ["migration", "cancel", "stay"])
            XCTAssertEqual(output.text, "migration of stay: cancelled\n")
            let vm = try await daemon.client.vm("stay")
            XCTAssertEqual(vm.state, .running, "a cancelled migration leaves the source running")
        }
    }

    struct Output { var status: Int32; var text: String }

    func runMigratectl(socket: String, _ arguments: [String]) async throws -> Output {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("migratectl")
        process.arguments = arguments + ["--socket", socket]
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        // Read on a Dispatch thread: the daemon answering migratectl runs on this process's cooperative pool.
        let data = await withCheckedContinuation { continuation in
            DispatchQueue.global().async {
                let data = pipe.fileHandleForReading.readDataToEndOfFile()
                process.waitUntilExit()
                continuation.resume(returning: data)
            }
        }
        return Output(status: process.terminationStatus, text: String(decoding: data, as: UTF8.self))
    }
}
