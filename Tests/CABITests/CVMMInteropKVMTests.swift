import Foundation
import TestSupport
import XCTest

/// A second VMM, written in C against the installed header and library only (examples/c-vmm), moves real guests
/// with libmigrated: to another c-vmm over mutual TLS, into the migrated daemon and back out, through snapshot
/// files that vmsnap verifies, restores and writes; and, as a source, survives a cut link, a corrupted byte and a
/// cancel with its guest running on. The guests run memstress, which verifies its own memory after every move.
final class CVMMInteropKVMTests: KVMTestCase {
    private var directory = ""
    /// 256 MiB guests writing a 64 MiB working set at 100 MiB/s while they move.
    private let memory = "256M"
    private let commandLine = "workload=memstress size_mib=64 rate_mib=100"
    private var certificates: String { TestCertificates.directory }

    override func setUpWithError() throws {
        try super.setUpWithError()
        _ = try InstalledLibrary.prefix()
        _ = try TestGuest.image()
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("c-vmm-test-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    override func tearDown() {
        try? FileManager.default.removeItem(atPath: directory)
        super.tearDown()
    }

    /// c-vmm's TLS argument: its own certificate (the test CA's `name`) and the one peer it accepts.
    private func tls(_ name: String, peer: String) -> String {
        "\(certificates)/ca.pem,\(certificates)/\(name).pem,\(certificates)/\(name).key,\(peer)"
    }

    /// A c-vmm running memstress, once the guest has written its whole working set and verified it.
    private func runningGuest(_ name: String, dirty: String = "bitmap", build: CVMMProcess.Build = .plain,
                              commandLine: String? = nil) throws -> CVMMProcess {
        let vmm = try CVMMProcess(["run", "--kernel", TestGuest.path, "--memory", memory, "--cmdline", commandLine ?? self.commandLine, "--dirty", dirty],
                                  console: "\(directory)/\(name).console", build: build)
        vmm.expect("ok running")
        let status = vmm.memstress(pages: 64 * 256)
        XCTAssertEqual(status?.verified, true, "the guest fills its working set")
        return vmm
    }

    /// A c-vmm waiting for a guest on a loopback port the kernel chooses; returns it and the port.
    private func receiver(_ name: String, tls: String? = nil, build: CVMMProcess.Build = .plain) throws -> (CVMMProcess, String) {
        let vmm = try CVMMProcess(["receive", "--listen", "127.0.0.1:0"] + (tls.map { ["--tls", $0] } ?? []),
                                  console: "\(directory)/\(name).console", build: build)
        let line = try XCTUnwrap(vmm.expect("ok listening"))
        return (vmm, String(line.split(separator: " ")[2]))
    }

    /// Has c-vmm migrate its guest into `daemon` over mutual TLS, with the daemon's configuration for it under `id`;
    /// returns c-vmm's reply.
    private func migrate(_ source: CVMMProcess, intoDaemon daemon: DaemonProcess, as id: String) throws -> String? {
        let configuration = "\(directory)/\(id).json"
        try #"{"id":"\#(id)","image":"\#(TestGuest.path)","memory_mib":256,"cmdline":"\#(commandLine)"}"#
            .write(toFile: configuration, atomically: true, encoding: .utf8)
        return source.command("migrate 127.0.0.1:\(daemon.incomingPort) config=\(configuration) tls=\(tls("client", peer: "server.migrated.test"))")
    }

    /// The guest runs at `vmm` after a move: it prints new status lines, all verified.
    private func assertRunsVerified(_ vmm: CVMMProcess, after ticks: UInt64 = 0, file: StaticString = #filePath, line: UInt = #line) {
        let status = vmm.memstress(after: ticks)
        XCTAssertNotNil(status, "the guest prints status after the move", file: file, line: line)
        XCTAssertTrue(vmm.consoleVerified, "every status line verifies", file: file, line: line)
    }

    /// Three times: KVM's dirty bitmap; under AddressSanitizer with KVM's dirty ring; and with c-vmm's own dirty
    /// tracking (callback mode), where c-vmm also writes the machine state itself (examples/c-vmm/kvmstate.c).
    func testCVMMToCVMMOverMutualTLS() throws {
        for (build, dirty) in [(CVMMProcess.Build.plain, "bitmap"), (.sanitized, "ring"), (.plain, "callback")] {
            let source = try runningGuest("a-\(build)-\(dirty)", dirty: dirty, build: build)
            let (destination, address) = try receiver("b-\(build)-\(dirty)", tls: tls("server", peer: "client.migrated.test"), build: build)
            let reply = source.command("migrate \(address) channels=2 compression=adaptive tls=\(tls("client", peer: "server.migrated.test"))")
            XCTAssertEqual(reply?.hasPrefix("ok migrated"), true, "\(reply ?? "no reply"); \(source.stderr)")
            destination.expect("ok received")
            XCTAssertEqual(source.waitForExit(), 0, "the source VMM stops its guest and exits after the move")
            assertRunsVerified(destination)
            destination.stop()
            XCTAssertEqual(destination.process.terminationStatus, 0, "\(build): \(destination.stderr)")
        }
    }

    func testCVMMIntoTheDaemonAndBackOut() throws {
        let daemon = try DaemonProcess()
        defer { daemon.stop() }
        let source = try runningGuest("a")
        let reply = try migrate(source, intoDaemon: daemon, as: "from-c")
        XCTAssertEqual(reply?.hasPrefix("ok migrated"), true, "\(reply ?? "no reply"); \(source.stderr)")
        XCTAssertEqual(source.waitForExit(), 0)
        let arrived = try daemon.memstress(of: "from-c", after: 0)
        XCTAssertEqual(arrived?.verified, true, "the guest runs in the daemon's MicroVM and verifies: \(daemon.log)")

        // And out again, into a c-vmm that accepts the daemon's certificate.
        let (destination, address) = try receiver("b", tls: tls("client", peer: "server.migrated.test"))
        let migration = try daemon.ctl(["migrate", "from-c", "--to", address, "--channels", "2"])
        XCTAssertEqual(migration.status, 0, migration.text)
        destination.expect("ok received")
        assertRunsVerified(destination, after: arrived?.ticks ?? 0)
        XCTAssertEqual(try daemon.vm("from-c")?.state.rawValue, "migrated")
    }

    /// The destination daemon dies after reading COMMIT, before it says STARTED (its fault-injection hook): the
    /// library answers MIGRATED_ERR_IN_DOUBT and keeps the guest paused, because it may run there; c-vmm does not
    /// resume it by itself. The operator, having found no guest at the destination, resumes it, and it verifies.
    func testACommitWithoutStartedLeavesTheCVMMGuestPausedUntilTheOperatorResumes() throws {
        let daemon = try DaemonProcess(bin: "\(try InstalledLibrary.prefix())/bin", environment: ["MIGRATED_FAULT_INJECT": "exit-after-commit"])
        defer { daemon.stop() }
        let source = try runningGuest("a")
        let reply = try migrate(source, intoDaemon: daemon, as: "in-doubt")
        XCTAssertEqual(reply?.hasPrefix("error MIGRATED_ERR_IN_DOUBT"), true, "\(reply ?? "no reply"); \(source.stderr)")
        XCTAssertEqual(source.command("status"), "ok paused", "the guest may run at the destination: it stays paused")
        let before = source.memstress()?.ticks ?? 0
        Thread.sleep(forTimeInterval: 0.5)
        XCTAssertEqual(source.memstress()?.ticks ?? 0, before, "no guest tick while in doubt")
        XCTAssertFalse(daemon.isRunning, "the destination died at the commit")

        XCTAssertEqual(source.command("resume"), "ok running")
        assertRunsVerified(source, after: before)
    }

    func testSnapshotsBetweenCVMMAndVmsnap() throws {
        let prefix = try InstalledLibrary.prefix()
        // A live snapshot by the C VMM: vmsnap verifies it and runs it in MicroVM.
        let source = try runningGuest("a")
        let saved = "\(directory)/from-c.snap"
        XCTAssertEqual(source.command("save \(saved)")?.hasPrefix("ok saved"), true, source.stderr)
        let verify = try InstalledLibrary.shell("'\(prefix)/bin/vmsnap' verify '\(saved)'")
        XCTAssertTrue(verify.contains("ok") || verify.contains("verified"), verify)
        let restored = try InstalledLibrary.shell("'\(prefix)/bin/vmsnap' restore '\(saved)' --seconds 3")
        let statuses = restored.split(separator: "\n").compactMap { MemstressStatus(String($0)) }
        XCTAssertFalse(statuses.isEmpty, restored)
        XCTAssertTrue(statuses.allSatisfy(\.verified), restored)
        source.stop()

        // A snapshot by vmsnap save of a daemon's VM, restored by the C VMM.
        let daemon = try DaemonProcess()
        defer { daemon.stop() }
        let start = try daemon.ctl(["vm", "start", "--id", "web", "--image", TestGuest.path, "--memory", memory, "--cmdline", commandLine])
        XCTAssertEqual(start.status, 0, start.text)
        XCTAssertNotNil(try daemon.memstress(of: "web", after: 100))
        let fromDaemon = "\(directory)/from-daemon.snap"
        let save = try daemon.ctl(["save", "web", fromDaemon], tool: "vmsnap")
        XCTAssertEqual(save.status, 0, save.text)
        let vmm = try CVMMProcess(["restore", fromDaemon], console: "\(directory)/c.console")
        vmm.expect("ok restored")
        assertRunsVerified(vmm)
    }

    /// The C VMM as the source of a migration that fails: each time its guest runs on, verified, and a retry lands.
    /// A byte corrupted in transit is caught by the digest only if no later pass sends its page again, so that
    /// case moves a guest that wrote its working set once and now only verifies it.
    func testFaultsLeaveTheCVMMSourceRunning() throws {
        let writing = try runningGuest("a")
        let idle = try runningGuest("idle", commandLine: "workload=memstress size_mib=64 rate_mib=0")
        for fault in ["cut", "corrupt", "cancel"] {
            let source = fault == "corrupt" ? idle : writing
            let (destination, address) = try receiver("b-\(fault)")
            let port = try XCTUnwrap(UInt16(address.split(separator: ":").last!))
            let proxy = try TCPProxy(to: port, cutAfter: fault == "cut" ? 24 << 20 : nil, corruptAt: fault == "corrupt" ? 20 << 20 : nil)
            let extra = fault == "cancel" ? " bandwidth=20000000 cancel_after_ms=500" : ""
            let before = source.memstress()?.ticks ?? 0
            let reply = source.command("migrate 127.0.0.1:\(proxy.port) compression=none time_limit_s=30\(extra)") ?? "no reply"
            // A flipped payload byte fails the digest; the rare flip inside a batch's descriptors fails its checksum.
            let expected = ["cut": ["error MIGRATED_ERR_TRANSPORT"], "corrupt": ["error MIGRATED_ERR_VERIFY", "error MIGRATED_ERR_PROTOCOL"],
                            "cancel": ["error MIGRATED_ERR_CANCELLED"]][fault]!
            XCTAssertTrue(expected.contains { reply.hasPrefix($0) }, "\(fault): \(reply)")
            XCTAssertEqual(source.command("status"), "ok running", fault)
            assertRunsVerified(source, after: before)
            XCTAssertNotEqual(destination.waitForExit(), 0, "\(fault): the destination started nothing")
            XCTAssertNil(destination.memstress(timeout: 0.2), "\(fault): no guest ran at the destination")
            proxy.close()
        }
        for (name, source) in [("writing", writing), ("idle", idle)] {
            let (destination, address) = try receiver("b-retry-\(name)")
            let reply = source.command("migrate \(address)")
            XCTAssertEqual(reply?.hasPrefix("ok migrated"), true, reply ?? "no reply")
            destination.expect("ok received")
            assertRunsVerified(destination)
        }
    }
}
