import Foundation
import Logging
import MigratedAPI
import MicroVM
import MigratedDaemon
import TestSupport
import XCTest

/// A real daemon in this process, serving HTTP on a Unix socket in a fresh temporary directory.
final class TestDaemon {
    let directory: String
    let socketPath: String
    let daemon: Daemon
    let client: ControlClient
    private var task: Task<Void, any Error>?

    init(memoryBudgetMiB: UInt64 = 1024, memoryBacking: GuestMemory.Backing = .sharedMemory, tls: TLSFiles? = nil,
         migrations: (any MigrationService)? = nil, incoming: (IncomingMigrationSettings, any IncomingMigrationListener)? = nil,
         controlLimits: ControlLimits = ControlLimits(), inDoubtDirectory: String? = nil,
         postCopyRecoveryTimeout: Double = DaemonConfiguration.defaultPostCopyRecoveryTimeout) {
        directory = NSTemporaryDirectory() + "migrated-test-" + String(UUID().uuidString.prefix(8))
        socketPath = directory + "/control.sock"
        var logger = Logger(label: "migrated-test")
        logger.logLevel = .error
        daemon = Daemon(configuration: ValidatedConfiguration(socketPath: socketPath, memoryBudget: memoryBudgetMiB << 20,
                                                              memoryBacking: memoryBacking, tls: tls, incoming: incoming?.0,
                                                              inDoubtDirectory: inDoubtDirectory ?? directory + "/in-doubt",
                                                              postCopyRecoveryTimeout: postCopyRecoveryTimeout, controlLimits: controlLimits),
                        logger: logger, migrations: migrations, incoming: incoming?.1)
        client = ControlClient(socketPath: socketPath)
    }

    func start() async throws {
        let daemon = self.daemon
        task = Task { try await daemon.run() }
        try await daemon.waitUntilListening()
    }

    /// As migrated's main does on a signal: end the server, then shut the daemon down.
    func stop() async {
        task?.cancel()
        _ = try? await task?.value
        await daemon.shutdown()
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// The status and decoded error of a call that must fail.
    func failure(_ method: String, _ path: String, body: String? = nil,
                 file: StaticString = #filePath, line: UInt = #line) async throws -> (status: Int, error: APIError) {
        let (status, data) = try await client.send(.init(method), path, body: body.map { Data($0.utf8) })
        XCTAssertGreaterThanOrEqual(status, 400, "expected an error, got \(status)", file: file, line: line)
        let error = try APIJSON.decode(APIError.self, from: data)
        XCTAssertFalse(error.message.isEmpty, file: file, line: line)
        return (status, error)
    }
}

/// Runs `body` against a fresh daemon, and shuts the daemon down whatever happens.
func withDaemon(memoryBudgetMiB: UInt64 = 1024, tls: TLSFiles? = nil, migrations: (any MigrationService)? = nil,
                incoming: (IncomingMigrationSettings, any IncomingMigrationListener)? = nil,
                controlLimits: ControlLimits = ControlLimits(),
                _ body: (TestDaemon) async throws -> Void) async throws {
    let daemon = TestDaemon(memoryBudgetMiB: memoryBudgetMiB, tls: tls, migrations: migrations, incoming: incoming,
                            controlLimits: controlLimits)
    try await daemon.start()
    do {
        try await body(daemon)
    } catch {
        await daemon.stop()
        throw error
    }
    await daemon.stop()
}

extension TestDaemon {
    /// Polls until VM `id` has printed a memstress status line after `ticks`, which must verify; returns it.
    func memstressStatus(after ticks: UInt64, of id: String, timeout: TimeInterval = 20) async throws -> MemstressStatus? {
        let deadline = Date(timeIntervalSinceNow: timeout * sanitizerSlowdown)
        while Date() < deadline {
            if let line = try? await client.vm(id).lastConsoleLine, let status = MemstressStatus(line), status.ticks > ticks {
                XCTAssertTrue(status.verified, line)
                return status
            }
            try await Task.sleep(nanoseconds: 100_000_000)
        }
        return nil
    }
}
