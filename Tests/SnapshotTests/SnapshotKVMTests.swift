import Foundation
import KVMMigration
import MicroVM
import MigrationWire
import Snapshots
import TestSupport
import XCTest

/// Snapshots of real guests: memstress stamps its pages and checks them, so a page lost or stale in a
/// snapshot shows up as `verify=bad` after the restore.
final class SnapshotKVMTests: KVMTestCase {
    var directory: URL!
    var machines: [MicroVM] = []

    override func setUpWithError() throws {
        try super.setUpWithError()
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("snapshot-kvm-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        for machine in machines { machine.stop() }
        machines = []
        try? FileManager.default.removeItem(at: directory)
    }

    func path(_ name: String) -> String { directory.appendingPathComponent(name).path }

    func boot(_ commandLine: String, memory: UInt64 = 256 << 20,
              backing: GuestMemory.Backing = .sharedMemory) throws -> (MicroVM, SerialConsole) {
        let console = SerialConsole(output: nil)
        let machine = try MicroVM(booting: try TestGuest.image(), commandLine: commandLine,
                                  configuration: MicroVMConfiguration(memorySize: memory, console: console, memoryBacking: backing))
        machines.append(machine)
        machine.start()
        XCTAssertNotNil(console.waitForLine(timeout: 10) { $0.contains("verify=ok") && !$0.contains("pages=0 ") })
        return (machine, console)
    }

    /// The next `count` memstress lines after `line`; every one must verify.
    func statuses(_ console: SerialConsole, after line: Int = 0, count: Int) -> [MemstressStatus] {
        var found: [MemstressStatus] = []
        var next = line
        while found.count < count, let text = console.waitForLine(after: next, timeout: 10, where: { $0.hasPrefix("memstress") }) {
            if let status = MemstressStatus(text) { found.append(status) }
            next = console.lineCount
        }
        XCTAssertEqual(found.count, count, "\(console.receivedLines.suffix(5))")
        XCTAssertTrue(found.allSatisfy(\.verified), "\(console.receivedLines.suffix(5))")
        return found
    }

    /// Restores `chain` into a new MicroVM, eagerly or lazily, starts it and checks that memstress carries on.
    func restoreAndRun(_ chain: SnapshotChain, lazy: Bool, backing: GuestMemory.Backing = .sharedMemory) throws -> RestoreReport {
        let console = SerialConsole(output: nil)
        let sink = MicroVMGuestSink(console: console, memoryBacking: backing)
        var report: RestoreReport
        if lazy {
            let restore = LazyRestore(chain, into: sink)
            restore.onFailure = { error in XCTFail("lazy restore: \(error)") }
            try restore.prepare()
            try sink.start()
            machines.append(sink.machine!)
            report = try restore.waitUntilResident()
        } else {
            report = try SnapshotRestore.restore(chain, into: sink)
            try sink.start()
            machines.append(sink.machine!)
        }
        let after = statuses(console, count: 2)
        XCTAssertLessThan(after[0].generation, after[1].generation, "the restored guest keeps writing")
        sink.machine!.stop()
        return report
    }

    /// Issue 5, test 1: a guest writing 100 MiB/s is saved live, and carries on after eager and lazy restores.
    func testLiveSnapshotOfAWritingGuestRestoresEagerlyAndLazily() throws {
        let (machine, console) = try boot("workload=memstress size_mib=64 rate_mib=100 pattern=mixed")
        let saved = try SnapshotSaver(source: MicroVMGuestSource(machine: machine), path: path("live"),
                                      options: SnapshotSaveOptions(keepTracking: false)).run()
        XCTAssertGreaterThan(saved.header.dataPages, 16384, "the 64 MiB working set is in the snapshot")
        _ = statuses(console, after: console.lineCount, count: 1) // the source runs on, unharmed
        // Compressed as it is written: the pages later passes write again are patched into their blocks.
        let compressed = try SnapshotSaver(source: MicroVMGuestSource(machine: machine), path: path("live-zstd"),
                                           options: SnapshotSaveOptions(keepTracking: false, memoryFormat: .compressed)).run()
        XCTAssertEqual(compressed.header.memoryFormat, .compressed)
        XCTAssertGreaterThan(compressed.passes.count, 1, "the guest wrote pages again during the save")
        machine.stop()
        for name in ["live", "live-zstd"] {
            let chain = try SnapshotChain.open(path(name))
            XCTAssertNoThrow(try SnapshotVerifier.verify(chain))
            let eager = try restoreAndRun(chain, lazy: false)
            XCTAssertEqual(eager.dataPages, Int(chain.top.header.dataPages))
            let lazy = try restoreAndRun(chain, lazy: true)
            XCTAssertNotNil(lazy.secondsToResident)
        }
    }

    /// A guest on huge pages is saved live (its pages found with mincore) and restored eagerly onto huge pages.
    func testLiveSnapshotOfAHugePageGuestRestoresOntoHugePages() throws {
        try requireFreeHugePages(2 * (256 << 20) / GuestMemory.hugePageSize)
        let (machine, _) = try boot("workload=memstress size_mib=64 rate_mib=100 pattern=mixed", backing: .hugePages)
        let saved = try SnapshotSaver(source: MicroVMGuestSource(machine: machine), path: path("huge"),
                                      options: SnapshotSaveOptions(keepTracking: false)).run()
        XCTAssertGreaterThan(saved.header.dataPages, 16384, "the 64 MiB working set is in the snapshot")
        let chain = try SnapshotChain.open(path("huge"))
        let report = try restoreAndRun(chain, lazy: false, backing: .hugePages)
        XCTAssertEqual(report.dataPages, Int(saved.header.dataPages))
    }

    /// Issue 5, test 4: a live snapshot pauses the guest only briefly while 256 MiB are written at 50 MiB/s.
    func testLiveSnapshotPausesTheGuestBriefly() throws {
        let (machine, console) = try boot("workload=memstress size_mib=256 rate_mib=50", memory: 512 << 20)
        // The whole working set written once (65536 pages), so that the snapshot holds all of it.
        XCTAssertNotNil(console.waitForLine(timeout: 30) { $0.contains("pages=65536 ") && $0.contains("verify=ok") })
        let saved = try SnapshotSaver(source: MicroVMGuestSource(machine: machine), path: path("brief"),
                                      options: SnapshotSaveOptions(keepTracking: false)).run()
        print("live snapshot of a 256 MiB working set at 50 MiB/s: paused \(String(format: "%.1f", saved.pauseSeconds * 1000)) ms, passes \(saved.passes.count)")
        XCTAssertGreaterThanOrEqual(saved.header.dataPages, 65536)
        XCTAssertLessThan(saved.pauseSeconds, 0.05)
    }

    /// Issue 5, test 2: a full snapshot and five diffs restore to the memory of a full snapshot of the same
    /// moment; so does their merge; a diff on the wrong parent is refused.
    func testChainOfFiveDiffsEqualsAFullSnapshotAndItsMerge() throws {
        let (machine, console) = try boot("workload=memstress size_mib=32 rate_mib=50 pattern=mixed", memory: 128 << 20)
        let source = MicroVMGuestSource(machine: machine)
        var base = try SnapshotSaver(source: source, path: path("0-full")).run().base
        for step in 1 ... 5 {
            Thread.sleep(forTimeInterval: 0.1)
            var options = SnapshotSaveOptions()
            if step == 3 { options.memoryFormat = .compressed }
            if step == 5 {
                // The last diff and a full snapshot of the same moment: the guest stays paused between them.
                // (Paused and compressed: compressed as it is written, in one pass.)
                options.live = false
                options.resumeGuest = false
                options.memoryFormat = .compressed
            }
            base = try SnapshotSaver(source: source, path: path("\(step)-diff"), base: base, options: options).run().base
            XCTAssertNotNil(base)
        }
        _ = try SnapshotSaver(source: source, path: path("same-moment-full"), options: SnapshotSaveOptions(live: false, keepTracking: false)).run()
        machine.resume()
        _ = statuses(console, after: console.lineCount, count: 1)

        let chain = try SnapshotChain.open(path("5-diff"))
        XCTAssertEqual(chain.files.count, 6)
        XCTAssertNoThrow(try SnapshotVerifier.verify(chain))
        let full = try SnapshotChain.open(path("same-moment-full"))
        let differences = try SnapshotCompare.differences(chain, full)
        XCTAssertEqual(differences.reduce(0) { $0 + $1.pages }, 0, "pages that differ, the first: \(differences.prefix(3))")
        let restoredChain = try restoredMemory(chain)
        XCTAssertTrue(restoredChain == (try restoredMemory(full)), "the chain restores to the memory of the full snapshot")
        try SnapshotConvert.merge(chain, to: path("merged"))
        XCTAssertTrue(restoredChain == (try restoredMemory(try SnapshotChain.open(path("merged")))), "the merge restores to the same memory")
        _ = try restoreAndRun(try SnapshotChain.open(path("merged")), lazy: false)

        XCTAssertThrowsError(try SnapshotChain.open(path("4-diff"), parents: [path("2-diff")])) { error in
            guard case SnapshotError.chain = error else { return XCTFail("\(error)") }
        }
    }

    /// A diff that fails half way (its disk fills up) loses nothing: the pages it took from the dirty log go
    /// into the next diff, whose chain equals a full snapshot of the same moment.
    func testAFailedDiffLosesNoDirtyPages() throws {
        let smallDisk = try SmallDisk(at: directory.appendingPathComponent("small-disk").path, size: "1m")
        defer { smallDisk.unmount() }
        let disk = smallDisk.path
        let (machine, _) = try boot("workload=memstress size_mib=32 rate_mib=50 pattern=mixed", memory: 128 << 20)
        let source = MicroVMGuestSource(machine: machine)
        let base = try XCTUnwrap(try SnapshotSaver(source: source, path: path("full")).run().base)
        Thread.sleep(forTimeInterval: 0.3)
        XCTAssertThrowsError(try SnapshotSaver(source: source, path: disk + "/diff", base: base).run()) { error in
            XCTAssertTrue("\(error)".contains("No space left on device"), "\(error)")
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: disk), [])
        Thread.sleep(forTimeInterval: 0.3)
        _ = try SnapshotSaver(source: source, path: path("diff"), base: base, options: SnapshotSaveOptions(live: false, resumeGuest: false)).run()
        _ = try SnapshotSaver(source: source, path: path("same-moment"), options: SnapshotSaveOptions(live: false, keepTracking: false, resumeGuest: false)).run()
        machine.resume()
        let differences = try SnapshotCompare.differences(try SnapshotChain.open(path("diff")), try SnapshotChain.open(path("same-moment")))
        XCTAssertEqual(differences.reduce(0) { $0 + $1.pages }, 0, "pages that differ, the first: \(differences.prefix(3))")
    }

    /// All of a chain's guest memory after an eager restore (not started).
    private func restoredMemory(_ chain: SnapshotChain) throws -> Data {
        let sink = MicroVMGuestSink(console: SerialConsole(output: nil))
        _ = try SnapshotRestore.restore(chain, into: sink)
        defer { sink.discard() }
        var memory = Data()
        for region in chain.top.layout.regions {
            memory.append(Data(bytes: sink.page(frame: region.guestPhysicalAddress >> 12), count: Int(region.size)))
        }
        return memory
    }

    /// Issue 5, test 3 (restore side): a snapshot with a flipped memory byte is refused, and the sink is left
    /// without a guest.
    func testRestoreRefusesACorruptedSnapshot() throws {
        let (machine, _) = try boot("workload=memstress size_mib=16 rate_mib=50", memory: 64 << 20)
        _ = try SnapshotSaver(source: MicroVMGuestSource(machine: machine), path: path("good")).run()
        machine.stop()
        let file = try SnapshotFile(path: path("good"))
        var bytes = try Data(contentsOf: URL(fileURLWithPath: path("good")))
        bytes[Int(file.header.part(.memory)!.offset) + file.dataIndices[file.dataIndices.count / 2] * 4096 + 7] ^= 1
        try bytes.write(to: URL(fileURLWithPath: path("bad")))
        let sink = MicroVMGuestSink(console: SerialConsole(output: nil))
        XCTAssertThrowsError(try SnapshotRestore.restore(try SnapshotChain.open(path("bad")), into: sink)) { error in
            guard case SnapshotError.checksumMismatch(let part, _) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(part.contains("memory page"), part)
        }
        XCTAssertNil(sink.machine)
    }
}
