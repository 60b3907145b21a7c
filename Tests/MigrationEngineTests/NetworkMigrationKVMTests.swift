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
    /// Runs a migration through `listener`; the sender's report and the receiver's error.
    func migrateOverNetwork(_ source: MicroVM, listener: Listener, security: Security, options: MigrationOptions)
        -> (MigrationReport, Error?, MicroVMGuestSink) {
        let sink = MicroVMGuestSink(console: SerialConsole(output: nil))
        let result = ReceiverResult()
        Thread {
            do {
                let (channels, _) = try MigrationNetwork.accept(from: listener)
                _ = try MigrationReceiver(sink: sink, channels: channels).run()
            } catch { result.error = error }
            result.done.signal()
        }.start()
        let report = MigrationSender(source: MicroVMGuestSource(machine: source), options: options) { _ in
            try MigrationNetwork.connect(to: listener.endpoint, security: security)
        }.run()
        if !report.succeeded { listener.close() }
        result.done.wait()
        return (report, result.error, sink)
    }

    /// The migration succeeded, the destination guest verifies its memory; both VMs are then stopped.
    func assertMoved(_ report: MigrationReport, _ receiverError: Error?, _ sink: MicroVMGuestSink, from source: MicroVM,
                     file: StaticString = #filePath, line: UInt = #line) throws {
        XCTAssertTrue(report.succeeded, report.error ?? "", file: file, line: line)
        XCTAssertNil(receiverError, file: file, line: line)
        let destination = try XCTUnwrap(sink.machine, file: file, line: line)
        XCTAssertEqual(statuses(destination.console, after: 0, count: 1).count, 1, file: file, line: line)
        destination.stop()
        source.stop()
    }

    func testPlainTCPWhenAskedForByName() throws {
        let (source, _) = try bootSource("workload=memstress size_mib=32 rate_mib=100")
        let listener = try Listener(endpoint: .tcp(host: "127.0.0.1", port: 0), security: .plaintext)
        var options = MigrationOptions()
        options.channels = 2
        let (report, receiverError, sink) = migrateOverNetwork(source, listener: listener, security: .plaintext, options: options)
        try assertMoved(report, receiverError, sink, from: source)
    }

    func testMutualTLSWithLz4OnTwoChannels() throws {
        let (source, _) = try bootSource("workload=memstress size_mib=32 rate_mib=100 pattern=mixed")
        let listener = try Listener(endpoint: .tcp(host: "127.0.0.1", port: 0), security: TestCertificates.server)
        var options = MigrationOptions()
        options.channels = 2
        options.compression = .lz4
        let (report, receiverError, sink) = migrateOverNetwork(source, listener: listener, security: TestCertificates.client(), options: options)
        try assertMoved(report, receiverError, sink, from: source)
    }

    /// A client whose certificate comes from a CA the receiver does not trust never gets to send a page:
    /// the source keeps running, and nothing is built at the destination.
    func testWrongClientCertificateIsRefusedAndTheSourceRuns() throws {
        let (source, console) = try bootSource("workload=memstress size_mib=16 rate_mib=50")
        let listener = try Listener(endpoint: .tcp(host: "127.0.0.1", port: 0), security: TestCertificates.server)
        var options = MigrationOptions()
        options.channels = 2
        let rogue = TestCertificates.tls("rogue", allowed: TestCertificates.serverNames)
        let (report, receiverError, sink) = migrateOverNetwork(source, listener: listener, security: rogue, options: options)
        XCTAssertTrue(report.error?.contains("opening channel 0") ?? false, report.error ?? "")
        XCTAssertTrue("\(receiverError.map { "\($0)" } ?? "")".contains("untrusted certificate"), "\(String(describing: receiverError))")
        XCTAssertNil(sink.machine)
        XCTAssertNil(source.stopped)
        XCTAssertEqual(statuses(console, after: console.lineCount, count: 1).count, 1)
        source.stop()
    }
}
