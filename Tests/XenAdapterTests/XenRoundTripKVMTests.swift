import CKVM
import Foundation
import KVMBackend
import KVMMigration
import MicroVM
import MigrationEngine
import MigrationWire
import Snapshots
import TestSupport
import XCTest
@testable import XenAdapter

/// A running memstress guest goes into an xl save image, through Xen's verifier, and back into a new
/// MicroVM, which carries on.
final class XenRoundTripKVMTests: KVMTestCase {
    var directory: URL!

    override func setUpWithError() throws {
        try super.setUpWithError()
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("xen-kvm-\(getpid())-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws { if let directory { try? FileManager.default.removeItem(at: directory) } }

    func boot() throws -> (MicroVM, SerialConsole) {
        let console = SerialConsole(output: nil)
        let machine = try MicroVM(booting: try TestGuest.image(), commandLine: "workload=memstress size_mib=32 rate_mib=50 pattern=mixed",
                                  configuration: MicroVMConfiguration(memorySize: 256 << 20, console: console))
        machine.start()
        XCTAssertNotNil(console.waitForLine(timeout: 10) { $0.hasPrefix("memstress") && $0.contains("verify=ok") && !$0.contains("pages=0 ") })
        return (machine, console)
    }

    func lastStatus(_ console: SerialConsole) -> MemstressStatus? {
        console.receivedLines.reversed().lazy.compactMap { MemstressStatus($0) }.first
    }

    /// Status lines printed by the restored guest; at least `count`, all verified.
    func statuses(_ console: SerialConsole, count: Int) -> [MemstressStatus] {
        var found: [MemstressStatus] = []
        var next = 0
        while found.count < count, let line = console.waitForLine(after: next, timeout: 10, where: { $0.hasPrefix("memstress") }) {
            if let s = MemstressStatus(line) { found.append(s) } else { XCTFail(line) }
            next = console.lineCount
        }
        return found
    }

    func roundTrip(carry: Bool) throws {
        let (source, sourceConsole) = try boot()
        defer { source.stop() }
        let guestSource = MicroVMGuestSource(machine: source)
        try guestSource.pause()
        let before = try source.captureState()
        let last = try XCTUnwrap(lastStatus(sourceConsole))
        let file = directory.appendingPathComponent("guest.xl").path
        let sink = XenImageSink(path: file, carriesDeviceState: carry)
        let copied = try GuestCopy.copy(from: guestSource, to: sink)
        try sink.start()
        XCTAssertGreaterThan(copied, 0)
        // Saving straight from the source writes the same memory as going through the sink. (The device
        // state differs: each capture reads the running TSC and clock again.)
        let direct = directory.appendingPathComponent("direct.xl").path
        try XenImageSink.save(guestSource, to: direct, carriesDeviceState: carry)
        let (a, b) = (try XenImage(path: file), try XenImage(path: direct))
        XCTAssertEqual(a.fileSize, b.fileSize)
        var frames: [UInt64] = []
        a.forEachDataFrame { frames.append($0) }
        var framesB: [UInt64] = []
        b.forEachDataFrame { framesB.append($0) }
        XCTAssertEqual(frames, framesB)
        XCTAssertTrue(frames.allSatisfy { memcmp(a.page(frame: $0)!, b.page(frame: $0)!, 4096) == 0 })
        XCTAssertEqual(a.domainState.hvmContext.entries.map(\.typecode), b.domainState.hvmContext.entries.map(\.typecode))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: directory.path).sorted(), ["direct.xl", "guest.xl"],
                       "no temporary file is left behind")

        let (ok, output) = try xenVerifier(file)
        XCTAssertTrue(ok, output)

        let image = try XenImageSource(path: file)
        XCTAssertEqual(image.usedCarriedState, carry)
        XCTAssertEqual(image.layout, guestSource.layout)
        let console = SerialConsole(output: nil)
        let restored = MicroVMGuestSink(console: console)
        try GuestCopy.copy(from: image, to: restored)
        let machine = try XCTUnwrap(restored.machine)
        defer { machine.stop() }
        let after = try machine.captureState()
        for (a, b) in zip(before.vcpus, after.vcpus) {
            XCTAssertTrue(bytesEqual(a.registers, b.registers), "kvm_regs differ")
            if carry {
                XCTAssertTrue(bytesEqual(a.specialRegisters, b.specialRegisters), "kvm_sregs differ")
            } else {
                // Without the carried state, KVM's unusable bit comes from Xen's present bit, and the
                // interrupt bitmap is not in Xen's records.
                let (x, y) = (a.specialRegisters, b.specialRegisters)
                XCTAssertEqual([x.cr0, x.cr2, x.cr3, x.cr4, x.cr8, x.efer, x.apic_base], [y.cr0, y.cr2, y.cr3, y.cr4, y.cr8, y.efer, y.apic_base])
                for (s, t) in zip([x.cs, x.ds, x.es, x.fs, x.gs, x.ss, x.tr], [y.cs, y.ds, y.es, y.fs, y.gs, y.ss, y.tr]) {
                    XCTAssertEqual([s.base, UInt64(s.limit), UInt64(s.selector), UInt64(s.type), UInt64(s.dpl), UInt64(s.l), UInt64(s.db), UInt64(s.g)],
                                   [t.base, UInt64(t.limit), UInt64(t.selector), UInt64(t.type), UInt64(t.dpl), UInt64(t.l), UInt64(t.db), UInt64(t.g)])
                }
                XCTAssertEqual([x.gdt.base, UInt64(x.gdt.limit), x.idt.base, UInt64(x.idt.limit)], [y.gdt.base, UInt64(y.gdt.limit), y.idt.base, UInt64(y.idt.limit)])
            }
        }
        if carry {
            XCTAssertEqual(MachineStateEncoding.encode(before).count, MachineStateEncoding.encode(after).count)
        }
        try restored.start()
        let lines = statuses(console, count: 3)
        XCTAssertGreaterThanOrEqual(lines.count, 3, "\(console.receivedLines.suffix(5))")
        XCTAssertTrue(lines.allSatisfy(\.verified), "\(console.receivedLines.suffix(5))")
        XCTAssertGreaterThan(lines.last?.ticks ?? 0, last.ticks, "ticks carry on")
        XCTAssertGreaterThanOrEqual(lines.first?.generation ?? 0, last.generation)
    }

    func testGuestThroughXenImageCarriesOnWithEqualRegisters() throws { try roundTrip(carry: true) }

    /// Only what Xen's own records hold (no carried KVM state): the guest still carries on.
    func testGuestRebuiltFromXenRecordsAloneCarriesOn() throws { try roundTrip(carry: false) }

    /// The round trip with the tools an operator uses: a native snapshot of the running guest,
    /// `vmsnap convert --to xen`, Xen's verifier, `vmsnap inspect` and `verify` of the image,
    /// `vmsnap convert --to native`, and a restore into a new MicroVM that carries on with equal registers.
    func testSnapshotToXenImageAndBackWithVmsnap() async throws {
        let (source, sourceConsole) = try boot()
        defer { source.stop() }
        let options = SnapshotSaveOptions(live: false, keepTracking: false, resumeGuest: false)
        let snapshot = directory.appendingPathComponent("guest.snap").path
        _ = try SnapshotSaver(source: MicroVMGuestSource(machine: source), path: snapshot, options: options).run()
        let before = try source.captureState()
        let last = try XCTUnwrap(lastStatus(sourceConsole))

        let image = directory.appendingPathComponent("guest.xl").path
        let converted = try await runTool("vmsnap", ["convert", snapshot, image, "--to", "xen"])
        XCTAssertEqual(converted.status, 0, converted.text)
        let (ok, output) = try xenVerifier(image)
        XCTAssertTrue(ok, output)
        let inspected = try await runTool("vmsnap", ["inspect", image])
        XCTAssertTrue(inspected.text.contains("KVM state       carried"), inspected.text)
        XCTAssertTrue(inspected.text.contains("not carried:    a device model's state"), inspected.text)
        let verified = try await runTool("vmsnap", ["verify", image])
        XCTAssertEqual(verified.status, 0, verified.text)

        // A real Xen guest's special page (a console ring at 0xFEFF_F000, outside RAM): the native snapshot
        // keeps it as a device state, and MicroVM, which takes only the KVM state, restores the guest all the same.
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: image)))
        let libxcEnd = try XCTUnwrap(records(bytes).records.first { $0.stream == .libxc && $0.type == 0 })
        bytes.insert(contentsOf: record(type: 1, body: pageDataBody(frame: 0xFEFFF, contents: pattern(frame: 0xFEFFF, pass: 0))), at: libxcEnd.offset)
        try Data(bytes).write(to: URL(fileURLWithPath: image))

        let back = directory.appendingPathComponent("back.snap").path
        let returned = try await runTool("vmsnap", ["convert", image, back, "--to", "native"])
        XCTAssertEqual(returned.status, 0, returned.text)
        XCTAssertTrue(returned.text.contains("Xen special frames outside RAM: 1, kept as device state"), returned.text)
        XCTAssertEqual(try SnapshotFile(path: back).deviceState.map(\.componentID), [DeviceComponent.kvmVM, XenDeviceComponent.specialPages])
        let console = SerialConsole(output: nil)
        let sink = MicroVMGuestSink(console: console)
        _ = try SnapshotRestore.restore(try SnapshotChain.open(back), into: sink)
        let machine = try XCTUnwrap(sink.machine)
        defer { machine.stop() }
        let after = try machine.captureState()
        for (a, b) in zip(before.vcpus, after.vcpus) {
            XCTAssertTrue(bytesEqual(a.registers, b.registers), "kvm_regs differ")
            XCTAssertTrue(bytesEqual(a.specialRegisters, b.specialRegisters), "kvm_sregs differ")
        }
        try sink.start()
        let lines = statuses(console, count: 3)
        XCTAssertGreaterThanOrEqual(lines.count, 3, "\(console.receivedLines.suffix(5))")
        XCTAssertTrue(lines.allSatisfy(\.verified), "\(console.receivedLines.suffix(5))")
        XCTAssertGreaterThan(lines.last?.ticks ?? 0, last.ticks, "ticks carry on")

        // A damaged image is refused by vmsnap verify, with the reader's reason.
        var cut = try Data(contentsOf: URL(fileURLWithPath: image))
        cut.removeLast(100)
        try cut.write(to: URL(fileURLWithPath: image + ".cut"))
        let refused = try await runTool("vmsnap", ["verify", image + ".cut"])
        XCTAssertEqual(refused.status, 1, refused.text)
    }
}

func bytesEqual<T>(_ a: T, _ b: T) -> Bool {
    withUnsafeBytes(of: a) { x in withUnsafeBytes(of: b) { y in x.elementsEqual(y) } }
}
