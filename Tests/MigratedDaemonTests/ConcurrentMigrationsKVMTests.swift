import Foundation
import MigratedAPI
import TestSupport
import XCTest

/// Many migrations at once between two daemons, within their memory budgets (issue 17, item 1).
extension TwoDaemonMigrationKVMTests {
    /// Eight guests of 256 MiB, each writing 50 MiB/s, cross over TLS at once, four each way, and all land
    /// verified; a VM that does not fit in a budget is refused with 409 without disturbing the others; and a
    /// migration into a daemon whose budget is full is refused before any memory is received, its source running on.
    func testEightGuestsCrossAtOnceWithinTheMemoryBudgets() async throws {
        let image = try { _ = try TestGuest.image(); return TestGuest.path }()
        let guest = "workload=memstress size_mib=64 rate_mib=50 pattern=mixed"
        try await withTwoDaemons(budgetMiB: 2048) { a, aListener, b, bListener in
            for (daemon, prefix) in [(a, "a"), (b, "b")] {
                for index in 0 ..< 4 {
                    _ = try await daemon.client.createVM(VMCreateRequest(id: "\(prefix)\(index)", image: image, memoryMib: 256, cmdline: guest))
                }
            }
            var before: [String: UInt64] = [:]
            for (daemon, prefix) in [(a, "a"), (b, "b")] {
                for index in 0 ..< 4 {
                    before["\(prefix)\(index)"] = try XCTUnwrapAsync(await daemon.memstressStatus(after: 0, of: "\(prefix)\(index)"), "guest runs").ticks
                }
            }
            // 1 GiB in use and 1 GiB promised to arrivals fit the 2 GiB budget; 1280 MiB more do not.
            let refused = try await a.failure("POST", "/vms", body: #"{"id":"big","image":"\#(image)","memory_mib":1280}"#)
            XCTAssertEqual(refused.status, 409)
            XCTAssertEqual(refused.error.error, "memory_does_not_fit")

            let toB = try XCTUnwrap(bListener.address).description, toA = try XCTUnwrap(aListener.address).description
            for index in 0 ..< 4 {
                _ = try await a.client.migrate("a\(index)", MigrationRequest(peer: toB, channels: 1, compression: .lz4))
                _ = try await b.client.migrate("b\(index)", MigrationRequest(peer: toA, channels: 1, compression: .lz4))
            }
            for (daemon, prefix, destination) in [(a, "a", b), (b, "b", a)] {
                for index in 0 ..< 4 {
                    let id = "\(prefix)\(index)"
                    let status = try await finalStatus(of: id, on: daemon)
                    XCTAssertEqual(status.phase, .completed, "\(id): \(status.report?.error ?? "")")
                    let landed = try await destination.memstressStatus(after: before[id] ?? 0, of: id)
                    XCTAssertEqual(landed?.verified, true, "\(id) carries on verified at its destination")
                }
            }

            // B now holds four guests (1 GiB); fill the rest of its budget, and a fifth arrival is refused there.
            _ = try await b.client.createVM(VMCreateRequest(id: "filler", image: image, memoryMib: 1024, cmdline: guest))
            _ = try await a.client.migrate("b0", MigrationRequest(peer: toB, channels: 1, compression: .lz4))
            let full = try await finalStatus(of: "b0", on: a)
            XCTAssertEqual(full.phase, .failed)
            XCTAssertTrue(full.report?.error?.contains("memory_does_not_fit") ?? false, full.report?.error ?? "no report")
            let stillHere = try await a.client.vm("b0")
            XCTAssertEqual(stillHere.state, .running, "the refused migration's source runs on")
            let after = try XCTUnwrapAsync(await a.memstressStatus(after: 0, of: "b0"), "and verifies its memory")
            XCTAssertTrue(after.verified)
        }
    }
}
