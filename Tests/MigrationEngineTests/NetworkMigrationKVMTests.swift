import Foundation
import KVMMigration
import MicroVM
import MigrationEngine
import MigrationNetwork
import TestSupport
import Transport
import XCTest

/// Migrations over real TCP connections through the transport: the listener side gathers the channels,
/// the sender connects them.
final class NetworkMigrationKVMTests: MigrationTestCase {
    /// Runs a migration through `listener`; the report, or the error of connecting, and the receiver's error.
    func migrateOverNetwork(_ source: MicroVM, listener: Listener, security: Security, options: MigrationOptions)
        -> (Result<MigrationReport, Error>, Error?, MicroVMGuestSink) {
        let sink = MicroVMGuestSink(console: SerialConsole(output: nil))
        let result = ReceiverResult()
        Thread {
            do {
                let (channels, _) = try MigrationNetwork.accept(from: listener)
                _ = try MigrationReceiver(sink: sink, channels: channels).run()
            } catch { result.error = error }
            result.done.signal()
        }.start()
        let report = Result {
            let channels = try MigrationNetwork.connect(to: listener.endpoint, security: security, count: options.channels)
            return MigrationSender(source: MicroVMGuestSource(machine: source), channels: channels, options: options).run()
        }
        if case .failure = report { listener.close() }
        result.done.wait()
        return (report, result.error, sink)
    }

    func testPlainTCPWhenAskedForByName() throws {
        let (source, _) = try bootSource("workload=memstress size_mib=32 rate_mib=100")
        let listener = try Listener(endpoint: .tcp(host: "127.0.0.1", port: 0), security: .plaintext)
        var options = MigrationOptions()
        options.channels = 2
        let (result, receiverError, sink) = migrateOverNetwork(source, listener: listener, security: .plaintext, options: options)
        let report = try result.get()
        XCTAssertTrue(report.succeeded, report.error ?? "")
        XCTAssertNil(receiverError)
        let destination = try XCTUnwrap(sink.machine)
        XCTAssertEqual(statuses(destination.console, after: 0, count: 1).count, 1)
        destination.stop()
        source.stop()
    }
}
