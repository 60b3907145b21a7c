import Foundation
import MigratedAPI
import MigratedDaemon
import XCTest

final class ConfigurationTests: XCTestCase {
    var directory = ""

    override func setUpWithError() throws {
        directory = NSTemporaryDirectory() + "migrated-config-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        for name in ["host.pem", "host.key", "ca.pem"] {
            XCTAssertTrue(FileManager.default.createFile(atPath: "\(directory)/\(name)", contents: Data("pem".utf8)))
        }
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(atPath: directory)
    }

    func write(_ text: String) -> String {
        let path = directory + "/migrated.json"
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(text.utf8)))
        return path
    }

    var tls: TLSFiles { TLSFiles(certificate: "\(directory)/host.pem", key: "\(directory)/host.key", ca: "\(directory)/ca.pem", allowedPeers: ["host-b"]) }

    func testFileThenFlags() throws {
        let path = write("""
            {"socket": "/tmp/a.sock", "log_level": "debug", "memory_budget_mib": 4096,
             "tls": {"certificate": "\(directory)/host.pem", "key": "\(directory)/host.key", "ca": "\(directory)/ca.pem", "allowed_peers": ["host-b"]},
             "incoming": {"listen": "0.0.0.0:7070"}}
            """)
        let file = try DaemonConfiguration.load(from: path)
        let fromFile = try file.validated()
        XCTAssertEqual(fromFile.socketPath, "/tmp/a.sock")
        XCTAssertEqual(fromFile.logLevel, .debug)
        XCTAssertEqual(fromFile.memoryBudget, 4096 << 20)
        XCTAssertEqual(fromFile.incoming, IncomingMigrationSettings(address: .tcp(host: "0.0.0.0", port: 7070), security: .tls(tls)))

        var flags = DaemonConfiguration.Overrides()
        flags.socket = "/tmp/b.sock"
        flags.allowedPeers = ["host-c", "host-d"]
        flags.incomingListen = "[::1]:7171"
        let merged = try file.merging(flags).validated()
        XCTAssertEqual(merged.socketPath, "/tmp/b.sock")
        XCTAssertEqual(merged.logLevel, .debug, "what the flags leave alone comes from the file")
        XCTAssertEqual(merged.tls?.allowedPeers, ["host-c", "host-d"])
        XCTAssertEqual(merged.tls?.certificate, tls.certificate)
        XCTAssertEqual(merged.incoming?.address, .tcp(host: "::1", port: 7171))
        XCTAssertEqual(merged.memoryBacking, .sharedMemory)

        // Guest memory on huge pages, from the file or a flag, for VMs started here and VMs that arrive.
        let hugeFromFile = try DaemonConfiguration.load(from: write(#"{"guest_memory": "huge-pages", "incoming": {"listen": "127.0.0.1:7070", "plaintext": true}}"#)).validated()
        XCTAssertEqual(hugeFromFile.memoryBacking, .hugePages)
        XCTAssertEqual(hugeFromFile.incoming?.memoryBacking, .hugePages)
        flags.guestMemory = "huge-pages"
        let hugeFromFlag = try file.merging(flags).validated()
        XCTAssertEqual(hugeFromFlag.memoryBacking, .hugePages)
        XCTAssertEqual(hugeFromFlag.incoming?.memoryBacking, .hugePages)
    }

    func testDefaults() throws {
        let settings = try DaemonConfiguration().validated(hostMemory: 8 << 30)
        XCTAssertEqual(settings.socketPath, DaemonConfiguration.defaultSocket)
        XCTAssertEqual(settings.logLevel, .info)
        XCTAssertEqual(settings.memoryBudget, 8 << 30)
        XCTAssertNil(settings.incoming, "no incoming listener unless asked for")
        XCTAssertEqual(settings.postCopyRecoveryTimeout, 60)
    }

    /// One wait for both ends of a post-copy whose link broke: the file's, or the flag's over it.
    func testPostCopyRecoveryTimeout() throws {
        let file = try APIJSON.decodeRequest(DaemonConfiguration.self, from: Data(#"{"postcopy_recovery_timeout_seconds": 5, "incoming": {"listen": "127.0.0.1:7070", "plaintext": true}}"#.utf8))
        let fromFile = try file.validated()
        XCTAssertEqual(fromFile.postCopyRecoveryTimeout, 5)
        XCTAssertEqual(fromFile.incoming?.postCopyRecoveryTimeout, 5)
        var flags = DaemonConfiguration.Overrides()
        flags.postcopyRecoveryTimeoutSeconds = 0
        let fromFlag = try file.merging(flags).validated()
        XCTAssertEqual(fromFlag.postCopyRecoveryTimeout, 0)
        XCTAssertEqual(fromFlag.incoming?.postCopyRecoveryTimeout, 0)
        XCTAssertThrowsError(try DaemonConfiguration(postcopyRecoveryTimeoutSeconds: -1).validated()) { error in
            XCTAssertTrue("\(error)".contains("postcopy_recovery_timeout_seconds"), "\(error)")
        }
    }

    func testPlaintextIncomingMustBeExplicit() throws {
        var flags = DaemonConfiguration.Overrides()
        flags.incomingListen = "127.0.0.1:7070"
        XCTAssertThrowsError(try DaemonConfiguration().merging(flags).validated()) { error in
            XCTAssertTrue("\(error)".contains("plaintext"), "\(error)")
        }
        flags.incomingPlaintext = true
        let settings = try DaemonConfiguration().merging(flags).validated()
        XCTAssertEqual(settings.incoming?.security, .plaintext)
        XCTAssertEqual(settings.incoming?.address, .tcp(host: "127.0.0.1", port: 7070))
    }

    func testRefusals() throws {
        func refused(_ configuration: DaemonConfiguration, mentioning words: String, line: UInt = #line) {
            XCTAssertThrowsError(try configuration.validated(), line: line) { error in
                XCTAssertTrue("\(error)".contains(words), "\(error)", line: line)
            }
        }
        refused(DaemonConfiguration(logLevel: "loud"), mentioning: "log_level")
        refused(DaemonConfiguration(memoryBudgetMib: 0), mentioning: "memory_budget_mib")
        refused(DaemonConfiguration(guestMemory: "hugepages"), mentioning: "guest_memory 'hugepages' is not one of shared-memory, huge-pages")
        refused(DaemonConfiguration(socket: "/" + String(repeating: "s", count: 120)), mentioning: "socket")
        var noPeers = tls
        noPeers.allowedPeers = []
        refused(DaemonConfiguration(tls: noPeers), mentioning: "allowed_peers")
        var missingKey = tls
        missingKey.key = directory + "/absent.key"
        refused(DaemonConfiguration(tls: missingKey), mentioning: "tls.key")
        refused(DaemonConfiguration(tls: tls, incoming: .init(listen: "7070")), mentioning: "incoming.listen")
        refused(DaemonConfiguration(tls: tls, incoming: .init(listen: "unix:relative/path")), mentioning: "incoming.listen")

        XCTAssertThrowsError(try DaemonConfiguration.load(from: write(#"{"sokcet": "/tmp/x"}"#))) { error in
            XCTAssertTrue("\(error)".contains("unknown field 'sokcet'"), "\(error)")
        }
        XCTAssertThrowsError(try DaemonConfiguration.load(from: directory + "/none.json")) { error in
            XCTAssertTrue("\(error)".contains("cannot read"), "\(error)")
        }
    }
}

final class APIDocumentTests: XCTestCase {
    func testPeerAddresses() {
        XCTAssertEqual(PeerAddress("host-b:7070"), .tcp(host: "host-b", port: 7070))
        XCTAssertEqual(PeerAddress("[fe80::1]:7070"), .tcp(host: "fe80::1", port: 7070))
        XCTAssertEqual(PeerAddress("unix:/run/m.sock"), .unix(path: "/run/m.sock"))
        for bad in ["host", "host:", ":7070", "host:70000", "a:b:c", "[::1]7070", "unix:rel", "unix:/" + String(repeating: "x", count: 110)] {
            XCTAssertNil(PeerAddress(bad), bad)
        }
        XCTAssertEqual(PeerAddress("[::1]:7")?.description, "[::1]:7")
    }

    func testMigrationRequestDefaultsAndWireNames() throws {
        let request = try APIJSON.decodeRequest(MigrationRequest.self, from: Data(#"{"peer": "b:1"}"#.utf8))
        XCTAssertEqual(request, MigrationRequest(peer: "b:1"))
        XCTAssertEqual(request.security, .tls, "TLS unless plaintext is asked for by name")
        let text = String(decoding: try APIJSON.encode(MigrationRequest(peer: "b:1", bandwidthLimitBytesPerSecond: 5, postcopy: true,
                                                                        postcopyAfterPasses: 2)), as: UTF8.self)
        for key in MigrationRequest.fieldNames { XCTAssertTrue(text.contains("\"\(key)\""), "\(key) in \(text)") }
        let vmText = String(decoding: try APIJSON.encode(VMCreateRequest(id: "x", image: "/i", memoryMib: 1, consoleLog: "/c")), as: UTF8.self)
        for key in VMCreateRequest.fieldNames { XCTAssertTrue(vmText.contains("\"\(key)\""), "\(key) in \(vmText)") }
    }

    func testProgressLineHasEveryFigure() {
        let status = MigrationStatus(vm: "a", peer: "b:1", phase: .precopy, pass: 2, percent: 63.4, bytesOnWire: 1 << 30,
                                     rateBytesPerSecond: 1.5 * 1024 * 1024 * 1024, dirtyRateBytesPerSecond: 95 * 1024 * 1024,
                                     expectedDowntimeMs: 12, throttle: 0.3, elapsedSeconds: 4, etaSeconds: 3.1)
        XCTAssertEqual(Formatting.progressLine(status),
                       "precopy  pass 2   63.4%  rate 1.50 GiB/s  dirty 95.0 MiB/s  downtime ~12 ms  ETA 3.1 s  throttle 30%")
        var unknown = status
        unknown.etaSeconds = nil
        XCTAssertTrue(Formatting.progressLine(unknown).contains("ETA ?"))
    }
}
