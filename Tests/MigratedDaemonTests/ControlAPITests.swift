import Foundation
import Logging
import MigratedAPI
import MigratedDaemon
import TestSupport
import XCTest

/// The control API's refusals, over a real Unix socket. None of these reaches KVM, so they run anywhere.
final class ControlAPITests: XCTestCase {
    func testUnknownVMIs404Everywhere() async throws {
        try await withDaemon { daemon in
            for (method, path) in [("GET", "/vms/nope"), ("DELETE", "/vms/nope"), ("POST", "/vms/nope/stop"),
                                   ("GET", "/vms/nope/migration"), ("POST", "/vms/nope/migration/cancel")] {
                let (status, error) = try await daemon.failure(method, path)
                XCTAssertEqual(status, 404, "\(method) \(path)")
                XCTAssertEqual(error.error, "vm_not_found")
                XCTAssertTrue(error.message.contains("nope"))
            }
            let (status, error) = try await daemon.failure("POST", "/vms/nope/migrate", body: #"{"peer": "10.0.0.2:7070"}"#)
            XCTAssertEqual(status, 404)
            XCTAssertEqual(error.error, "vm_not_found")
        }
    }

    func testMalformedBodiesAre400() async throws {
        try await withDaemon { daemon in
            let cases: [(body: String, code: String, mentions: String)] = [
                ("{not json", "bad_json", "not JSON"),
                ("[1, 2]", "bad_request", "JSON object"),
                (#"{"image": "/x"}"#, "bad_request", "memory_mib"),
                (#"{"image": "/x", "memory_mib": "lots"}"#, "bad_request", "memory_mib"),
                (#"{"image": "/x", "memory_mib": -1}"#, "bad_request", "out of range"),
                (#"{"image": "/x", "memroy_mib": 128}"#, "bad_request", "memroy_mib"),
                (#"{"image": "/x", "memory_mib": 128, "dirty_tracking": "magic"}"#, "bad_request", "dirty_tracking"),
                (#"{"image": "guest.elf", "memory_mib": 128}"#, "bad_request", "absolute"),
                (#"{"id": "Not/Valid", "image": "/x", "memory_mib": 128}"#, "bad_request", "id"),
            ]
            for item in cases {
                let (status, error) = try await daemon.failure("POST", "/vms", body: item.body)
                XCTAssertEqual(status, 400, item.body)
                XCTAssertEqual(error.error, item.code, item.body)
                XCTAssertTrue(error.message.contains(item.mentions), "\(item.body): \(error.message)")
            }
        }
    }

    /// The post-copy fields of a migration request: absent, they change nothing (older clients); their mistakes are
    /// refused before anything else, even for a VM that does not exist.
    func testPostCopyRequestFields() async throws {
        let old = try APIJSON.decodeRequest(MigrationRequest.self, from: Data(#"{"peer": "10.0.0.2:7070"}"#.utf8))
        XCTAssertFalse(old.postcopy)
        XCTAssertNil(old.postcopyAfterPasses)
        let asked = try APIJSON.decodeRequest(MigrationRequest.self, from: Data(#"{"peer": "10.0.0.2:7070", "postcopy": true, "postcopy_after_passes": 2}"#.utf8))
        XCTAssertEqual(asked, MigrationRequest(peer: "10.0.0.2:7070", postcopy: true, postcopyAfterPasses: 2))
        XCTAssertNil(asked.problem())
        try await withDaemon { daemon in
            for (body, mentions) in [(#"{"peer": "10.0.0.2:7070", "postcopy": true, "postcopy_after_passes": 0}"#, "1 or more"),
                                     (#"{"peer": "10.0.0.2:7070", "postcopy_after_passes": 3}"#, "needs \"postcopy\": true"),
                                     (#"{"peer": "10.0.0.2:7070", "postcopy": "yes"}"#, "postcopy")] {
                let (status, error) = try await daemon.failure("POST", "/vms/nope/migrate", body: body)
                XCTAssertEqual(status, 400, body)
                XCTAssertEqual(error.error, "bad_request", body)
                XCTAssertTrue(error.message.contains(mentions), "\(body): \(error.message)")
            }
        }
    }

    /// A resume names no peer: it carries on the migration that is paused. A request without it still must.
    func testAResumeRequestNeedsNoPeer() async throws {
        let resume = try APIJSON.decodeRequest(MigrationRequest.self, from: Data(#"{"resume": true}"#.utf8))
        XCTAssertTrue(resume.resume)
        XCTAssertNil(resume.problem())
        XCTAssertThrowsError(try APIJSON.decodeRequest(MigrationRequest.self, from: Data(#"{"resume": false}"#.utf8))) { error in
            XCTAssertTrue("\(error)".contains("peer"), "\(error)")
        }
        try await withDaemon { daemon in
            let (status, error) = try await daemon.failure("POST", "/vms/nope/migrate", body: #"{"resume": true}"#)
            XCTAssertEqual(status, 404)
            XCTAssertEqual(error.error, "vm_not_found")
        }
    }

    func testUnusableRequestsAre422Or409() async throws {
        try await withDaemon(memoryBudgetMiB: 256) { daemon in
            _ = try TestGuest.image() // a real image, so that the console-log case gets past the image check
            let image = TestGuest.path
            let cases: [(body: String, status: Int, code: String)] = [
                (#"{"image": "/does/not/exist.elf", "memory_mib": 128}"#, 422, "image_not_found"),
                (#"{"image": "/etc", "memory_mib": 128}"#, 422, "image_not_found"),
                (#"{"image": "/etc/hostname", "memory_mib": 128}"#, 422, "bad_image"),
                (#"{"image": "\#(image)", "memory_mib": 3}"#, 422, "invalid_memory"),
                (#"{"image": "\#(image)", "memory_mib": 129}"#, 422, "invalid_memory"),
                (#"{"image": "\#(image)", "memory_mib": 128, "vcpus": 0}"#, 422, "invalid_vcpus"),
                (#"{"image": "\#(image)", "memory_mib": 512}"#, 409, "memory_does_not_fit"),
                (#"{"image": "\#(image)", "memory_mib": 128, "console_log": "/no/such/dir/console.log"}"#, 422, "bad_console_log"),
            ]
            for item in cases {
                let (status, error) = try await daemon.failure("POST", "/vms", body: item.body)
                XCTAssertEqual(status, item.status, item.body)
                XCTAssertEqual(error.error, item.code, "\(item.body): \(error.message)")
            }
            let (_, budget) = try await daemon.failure("POST", "/vms", body: #"{"image": "\#(image)", "memory_mib": 512}"#)
            XCTAssertTrue(budget.message.contains("256 MiB budget"), budget.message)
            let remaining = try await daemon.client.listVMs()
            XCTAssertEqual(remaining, [])
        }
    }

    func testUnknownEndpointsAndMethods() async throws {
        try await withDaemon { daemon in
            var (status, error) = try await daemon.failure("GET", "/nothing/here")
            XCTAssertEqual(status, 404)
            XCTAssertEqual(error.error, "not_found")
            (status, error) = try await daemon.failure("PUT", "/vms")
            XCTAssertEqual(status, 405)
            XCTAssertEqual(error.error, "method_not_allowed")
            (status, error) = try await daemon.failure("POST", "/metrics")
            XCTAssertEqual(status, 405)
        }
    }

    func testMetricsWithoutVMs() async throws {
        try await withDaemon(memoryBudgetMiB: 2048) { daemon in
            let text = try await daemon.client.metrics()
            XCTAssertTrue(text.contains("# TYPE migrated_vms gauge\n"))
            XCTAssertTrue(text.contains("migrated_vms{state=\"running\"} 0\n"))
            XCTAssertTrue(text.contains("migrated_memory_budget_bytes 2147483648\n"))
            // Every sample belongs to a family announced before it.
            var families = Set<String>()
            for line in text.split(separator: "\n") {
                if line.hasPrefix("# TYPE ") { families.insert(String(line.split(separator: " ")[2])) }
                if !line.hasPrefix("#") {
                    let name = String(line.prefix { $0 != "{" && $0 != " " })
                    XCTAssertTrue(families.contains(name), "sample before its # TYPE: \(line)")
                }
            }
        }
    }

    /// A second daemon must not steal a live daemon's socket; a dead daemon's socket is taken over.
    func testSocketOwnership() async throws {
        try await withDaemon { first in
            var logger = Logging.Logger(label: "second")
            logger.logLevel = .critical
            let second = Daemon(configuration: ValidatedConfiguration(socketPath: first.socketPath, memoryBudget: 1 << 30), logger: logger)
            do {
                try await second.run()
                XCTFail("a second daemon ran on a live socket")
            } catch {
                XCTAssertTrue("\(error)".contains("another daemon is listening"), "\(error)")
            }
            let stillServed = try await first.client.listVMs()
            XCTAssertEqual(stillServed, [])
        }
        // A socket file nobody listens on, as a crashed daemon leaves it.
        let stale = TestDaemon()
        try FileManager.default.createDirectory(atPath: stale.directory, withIntermediateDirectories: true)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        let bound = withUnixAddress(stale.socketPath) { bind(fd, $0, $1) }
        XCTAssertEqual(bound, 0)
        close(fd)
        try await stale.start()
        let served = try await stale.client.listVMs()
        XCTAssertEqual(served, [])
        let info = try FileManager.default.attributesOfItem(atPath: stale.socketPath)
        await stale.stop()
        XCTAssertEqual((info[.posixPermissions] as? Int).map { $0 & 0o077 }, 0, "the control socket is for its owner only")
        XCTAssertFalse(FileManager.default.fileExists(atPath: stale.socketPath), "shutdown removes the socket")
    }
}
