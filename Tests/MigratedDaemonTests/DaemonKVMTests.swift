import Foundation
import MicroVM
import MigratedAPI
import MigratedDaemon
import TestSupport
import XCTest

/// Real VMs through the real control API on a Unix socket.
final class DaemonKVMTests: KVMTestCase {
    static let memstress = "workload=memstress size_mib=16"

    /// Polls the VM until its last console line satisfies `predicate`.
    func waitForConsole(_ daemon: TestDaemon, _ id: String, timeout: TimeInterval = 10,
                        where predicate: (String) -> Bool) async throws -> VMInfo {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while true {
            let info = try await daemon.client.vm(id)
            if let line = info.lastConsoleLine, predicate(line) { return info }
            if Date() > deadline { XCTFail("no such console line within \(timeout) s; last: \(info.lastConsoleLine ?? "none")"); return info }
            try await Task.sleep(nanoseconds: 100_000_000)
        }
    }

    func testVMLifecycle() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        try await withDaemon { daemon in
            let console = daemon.directory + "/console.log"
            let created = try await daemon.client.createVM(VMCreateRequest(
                id: "stress-1", image: image, memoryMib: 128, cmdline: Self.memstress, consoleLog: console))
            XCTAssertEqual(created.id, "stress-1")
            XCTAssertEqual(created.state, .running)
            XCTAssertEqual(created.memoryMib, 128)
            XCTAssertEqual(created.memoryBacking, "shared-memory", "the daemon's default")

            let listed = try await daemon.client.listVMs()
            XCTAssertEqual(listed.map(\.id), ["stress-1"])

            let running = try await waitForConsole(daemon, "stress-1") { MemstressStatus($0)?.verified == true }
            XCTAssertEqual(running.state, .running)
            XCTAssertEqual(running.vcpus, 1)
            XCTAssertGreaterThan(running.uptimeSeconds, 0)
            XCTAssertNil(running.stopReason)
            let log = try String(contentsOfFile: console, encoding: .utf8)
            XCTAssertTrue(log.contains("verify=ok"), "console log: \(log)")

            // A second VM with the same id is refused; ids are the daemon's keys.
            let (status, duplicate) = try await daemon.failure("POST", "/vms",
                body: #"{"id": "stress-1", "image": "\#(image)", "memory_mib": 128}"#)
            XCTAssertEqual(status, 409)
            XCTAssertEqual(duplicate.error, "vm_exists")

            let metrics = try await daemon.client.metrics()
            XCTAssertTrue(metrics.contains("migrated_vms{state=\"running\"} 1\n"), metrics)
            XCTAssertTrue(metrics.contains("migrated_vm_memory_bytes{vm=\"stress-1\"} 134217728\n"), metrics)
            XCTAssertTrue(metrics.contains("migrated_guest_memory_bytes 134217728\n"), metrics)
            XCTAssertTrue(metrics.contains("migrated_vms_started_total 1\n"), metrics)

            // No migration yet; and what the daemon can judge itself it refuses before the engine sees it.
            var (code, error) = try await daemon.failure("GET", "/vms/stress-1/migration")
            XCTAssertEqual(code, 404)
            XCTAssertEqual(error.error, "no_migration")
            (code, error) = try await daemon.failure("POST", "/vms/stress-1/migrate", body: #"{"peer": "127.0.0.1:7070"}"#)
            XCTAssertEqual(code, 409)
            XCTAssertEqual(error.error, "tls_not_configured")
            (code, error) = try await daemon.failure("POST", "/vms/stress-1/migrate",
                body: #"{"peer": "127.0.0.1", "security": "plaintext"}"#)
            XCTAssertEqual(code, 400)
            (code, error) = try await daemon.failure("POST", "/vms/stress-1/migrate",
                body: #"{"peer": "127.0.0.1:7070", "security": "plaintext", "channels": 99}"#)
            XCTAssertEqual(code, 400)
            XCTAssertTrue(error.message.contains("channels"), error.message)

            let stopped = try await daemon.client.stopVM("stress-1")
            XCTAssertEqual(stopped.state, .stopped)
            XCTAssertEqual(stopped.stopReason, "stopped on request")
            XCTAssertTrue(stopped.lastConsoleLine?.contains("verify=ok") == true)
            // Stopping twice changes nothing; a stopped VM cannot migrate.
            let again = try await daemon.client.stopVM("stress-1")
            XCTAssertEqual(again.state, .stopped)
            (code, error) = try await daemon.failure("POST", "/vms/stress-1/migrate",
                body: #"{"peer": "127.0.0.1:7070", "security": "plaintext"}"#)
            XCTAssertEqual(code, 409)
            XCTAssertEqual(error.error, "vm_not_running")
            let afterStop = try await daemon.client.metrics()
            XCTAssertTrue(afterStop.contains("migrated_vms{state=\"stopped\"} 1\n"))
            XCTAssertTrue(afterStop.contains("migrated_guest_memory_bytes 0\n"), "a stopped VM's memory is released")

            let deleted = try await daemon.client.deleteVM("stress-1")
            XCTAssertEqual(deleted.id, "stress-1")
            let (gone, _) = try await daemon.failure("GET", "/vms/stress-1")
            XCTAssertEqual(gone, 404)
            let left = try await daemon.client.listVMs()
            XCTAssertEqual(left, [])
        }
    }

    /// A guest that exits by itself is shown as exited with its code, and its memory goes back without anyone
    /// stopping it (the daemon's sweep).
    func testGuestExitIsReported() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        try await withDaemon { daemon in
            _ = try await daemon.client.createVM(VMCreateRequest(id: "short", image: image, memoryMib: 32, cmdline: "exit=pass"))
            let deadline = Date(timeIntervalSinceNow: 10)
            var metrics = ""
            while Date() < deadline {
                metrics = try await daemon.client.metrics()
                if metrics.contains("migrated_vms{state=\"exited\"} 1\n") { break }
                try await Task.sleep(nanoseconds: 50_000_000)
            }
            XCTAssertTrue(metrics.contains("migrated_guest_memory_bytes 0\n"), metrics)
            let vm = try await daemon.client.vm("short")
            XCTAssertEqual(vm.state, .exited)
            XCTAssertEqual(vm.exitCode, 0x10)
            XCTAssertTrue(vm.stopReason?.contains("0x10") == true, vm.stopReason ?? "none")
        }
    }

    /// The incoming side's hand-over: a VM built outside the daemon (as a migration receiver builds it) is
    /// adopted, listed and stopped like any other.
    func testAdoptedVMIsManaged() async throws {
        let image = try TestGuest.image()
        try await withDaemon { daemon in
            let machine = try MicroVM(booting: image, commandLine: Self.memstress,
                                      configuration: MicroVMConfiguration(memorySize: 128 << 20, console: SerialConsole(output: nil)))
            machine.start()
            let adopted = try daemon.daemon.api.vms.adopt(machine, as: VMCreateRequest(
                id: "arrived", image: TestGuest.path, memoryMib: 128, cmdline: Self.memstress))
            XCTAssertEqual(adopted.id, "arrived")
            let ids = try await daemon.client.listVMs().map(\.id)
            XCTAssertEqual(ids, ["arrived"])
            _ = try await waitForConsole(daemon, "arrived") { MemstressStatus($0)?.verified == true }
            let stopped = try await daemon.client.stopVM("arrived")
            XCTAssertEqual(stopped.state, .stopped)
            XCTAssertNotNil(machine.stopped)
        }
    }
}
