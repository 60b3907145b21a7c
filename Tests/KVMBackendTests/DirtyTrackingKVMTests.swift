import Foundation
import KVMBackend
import MicroVM
import TestSupport
import XCTest

/// Dirty tracking must be exact. The dirtyrounds guest writes a known set of pages in each round, then stops
/// at the sync port; there the test harvests and compares. Within the guest's region, the harvest must be the
/// round's set plus the page the VMM marked itself, nothing missing and nothing more. Outside the region the
/// guest's stack, tick counter and page tables are dirty too (the CPU sets accessed and dirty bits): those
/// are counted and reported.
final class DirtyTrackingKVMTests: KVMTestCase {
    static let regionBase: UInt64 = 16 << 20
    static let regionMiB: UInt64 = 16
    static let pagesPerRound = 64
    static let rounds = 40

    struct Finding {
        var roundsChecked = 0
        var missing: [String] = []
        var unexpected: [String] = []
        var extraOutsideRegion = 0
    }

    func testBitmapIsExactOverManyRounds() throws {
        try checkExactness(method: .bitmap)
    }

    func testRingIsExactOverManyRounds() throws {
        try checkExactness(method: .defaultRing)
    }

    /// A ring far smaller than what the guest dirties while it clears its region: KVM stops the vCPU with
    /// "ring full" again and again, and no page may be lost in between.
    func testSmallRingThatFillsUpLosesNothing() throws {
        try checkExactness(method: .ring(bytesPerVCPU: 16 * 1024))
    }

    private func checkExactness(method: DirtyTrackingMethod) throws {
        let console = SerialConsole(output: nil)
        let machine = try MicroVM(
            booting: try TestGuest.image(),
            commandLine: "workload=dirtyrounds region_mib=\(Self.regionMiB) count=\(Self.pagesPerRound) rounds=\(Self.rounds)",
            configuration: MicroVMConfiguration(memorySize: 64 << 20, dirtyTracking: method, console: console))
        let regionPages = UInt64(Self.regionMiB * 256)
        let region = Self.regionBase ..< Self.regionBase + regionPages * 4096
        var finding = Finding()
        var harvested = GuestPageBitmap(slots: machine.memory.slots)
        var markedByVMM: UInt64?

        machine.onSync = { round in
            harvested.removeAll()
            do { try machine.dirtyTracker.harvest(into: &harvested) } catch {
                finding.missing.append("harvest failed: \(error)")
                return
            }
            defer {
                // Before the next round, the VMM writes a page of the region itself and reports it.
                let page = Self.regionBase + ((UInt64(round) * 53 + 7) % regionPages) * 4096
                machine.memory.pointer(guestPhysicalAddress: page, length: 8)!.storeBytes(of: UInt64(0xD1A7), toByteOffset: 8, as: UInt64.self)
                machine.dirtyTracker.markDirty(guestPhysicalAddress: page + 8, length: 8)
                markedByVMM = page
            }
            guard round > 0 else { return } // round 0: the guest has cleared its region; start from here
            var expected = Set((0 ..< UInt64(Self.pagesPerRound)).map { k in
                Self.regionBase + ((UInt64(round) * 37 + k * 101) % regionPages) * 4096
            })
            if let markedByVMM { expected.insert(markedByVMM) }
            var seen = Set<UInt64>()
            harvested.forEachPage { address in
                if region.contains(address) { seen.insert(address) } else { finding.extraOutsideRegion += 1 }
            }
            for address in expected.subtracting(seen).sorted() { finding.missing.append("round \(round): 0x\(String(address, radix: 16))") }
            for address in seen.subtracting(expected).sorted() { finding.unexpected.append("round \(round): 0x\(String(address, radix: 16))") }
            finding.roundsChecked += 1
        }
        try machine.dirtyTracker.start()
        machine.start()
        let stop = machine.waitForStop(timeout: 60)
        XCTAssertEqual(stop, .guestExit(GuestExitCode.pass.rawValue), "console: \(console.receivedLines.suffix(5))")
        try machine.dirtyTracker.stop()

        XCTAssertEqual(finding.roundsChecked, Self.rounds)
        XCTAssertEqual(finding.missing, [], "pages written but not reported (\(method))")
        XCTAssertEqual(finding.unexpected, [], "pages of the region reported but not written (\(method))")
        print("dirty tracking \(method): \(finding.roundsChecked) rounds exact; \(finding.extraOutsideRegion) extra pages outside the region over all rounds (stack, tick counter, page tables), \(Double(finding.extraOutsideRegion) / Double(Self.rounds)) per round")
    }
}
