import CKVM
import Foundation
import KVMBackend
import MigrationWire
import TestSupport
import XCTest
@testable import XenAdapter

/// Runs Xen 4.17's verify-stream-v2 through scripts/xen-verifier.sh; skips the test when the package
/// cannot be fetched.
func xenVerifier(_ path: String, file: StaticString = #filePath, line: UInt = #line) throws -> (ok: Bool, output: String) {
    let result = try runProgram(TestGuest.repositoryRoot.appendingPathComponent("scripts/xen-verifier.sh").path, [path])
    if result.status == 77 {
        throw XCTSkip("Xen 4.17's verifier is unavailable (apt-get download xen-utils-4.17 failed): \(result.text)")
    }
    return (result.status == 0, result.text)
}

/// A machine state with recognisable values in every mapped field, built without KVM.
func syntheticMachine(vcpus: Int = 2) -> MachineState {
    var devices = VMDeviceState(picMaster: kvm_irqchip(), picSlave: kvm_irqchip(), ioapic: kvm_irqchip(),
                                timer: kvm_pit_state2(), clock: kvm_clock_data())
    devices.picSlave.chip_id = 1
    devices.ioapic.chip_id = 2
    devices.picMaster.chip.pic.imr = 0xFB
    devices.picMaster.chip.pic.irq_base = 0x20
    devices.picSlave.chip.pic.irq_base = 0x28
    devices.ioapic.chip.ioapic.base_address = 0xFEC0_0000
    devices.timer.channels.0.count = 65536
    devices.timer.channels.0.mode = 2
    devices.clock.clock = 123_456_789
    let states = (0 ..< vcpus).map { id -> VCPUState in
        var r = kvm_regs()
        r.rax = 0x1111 + UInt64(id); r.rip = 0x10_0000 + UInt64(id); r.rsp = 0x8000; r.rflags = 0x202; r.r15 = 0xF15
        var s = kvm_sregs()
        s.cs.selector = 0x10; s.cs.type = 0xB; s.cs.s = 1; s.cs.present = 1; s.cs.l = 1; s.cs.g = 1; s.cs.limit = 0xFFFF_FFFF
        s.ds.selector = 0x18; s.ds.type = 3; s.ds.s = 1; s.ds.present = 1; s.ds.db = 1; s.ds.g = 1; s.ds.limit = 0xFFFF_FFFF
        s.es = s.ds; s.ss = s.ds; s.fs = s.ds; s.gs = s.ds
        s.gs.base = 0x7000
        s.tr.selector = 0x28; s.tr.type = 0xB; s.tr.present = 1; s.tr.limit = 0x67; s.tr.base = 0x5000
        s.ldt.unusable = 1
        s.gdt.base = 0x6000; s.gdt.limit = 0x37; s.idt.base = 0x9000; s.idt.limit = 0xFFF
        s.cr0 = 0x8000_0011; s.cr3 = 0x1000; s.cr4 = 0x620; s.efer = 0x500; s.apic_base = 0xFEE0_0900
        var lapic = kvm_lapic_state()
        withUnsafeMutableBytes(of: &lapic.regs) { $0.storeBytes(of: UInt32(0x1FF), toByteOffset: 0xF0, as: UInt32.self) }
        var mp = kvm_mp_state()
        mp.mp_state = 0
        var xcrs = kvm_xcrs()
        xcrs.nr_xcrs = 1
        xcrs.xcrs.0.value = 3
        var xsave = [UInt8](repeating: 0, count: 4096)
        xsave[0] = 0x7F; xsave[512] = 3
        let msrs: [(UInt32, UInt64)] = [(0x10, 1_000_000), (0xC000_0082, 0xFFFF_8000_0000_1000), (0x277, 0x0007_0406_0007_0406)]
        var leaf = kvm_cpuid_entry2()
        leaf.function = 1; leaf.eax = 0x806F8
        return VCPUState(id: UInt32(id), cpuid: [leaf], multiprocessing: mp, registers: r, specialRegisters: s, xsave: xsave,
                         extendedControlRegisters: xcrs, debugRegisters: kvm_debugregs(), localAPIC: lapic,
                         modelSpecificRegisters: msrs.map { var e = kvm_msr_entry(); e.index = $0.0; e.data = $0.1; return e },
                         events: kvm_vcpu_events(), tscFrequencyKHz: 2_000_000)
    }
    return MachineState(devices: devices, vcpus: states)
}

/// A page whose every byte says which frame and which pass wrote it.
func pattern(frame: UInt64, pass: Int) -> [UInt8] {
    (0 ..< 4096).map { UInt8(truncatingIfNeeded: Int(frame) &* 31 &+ pass &* 7 &+ $0 / 64) }
}

/// Writes an image of a 64 MiB guest: pass 0 sends `frames`, each later pass resends `resent` with new
/// contents; `invalid` frames end as XTAB, `allocateOnly` ones are XALLOC.
func writeImage(to path: String, frames: [UInt64], passes: Int = 1, resent: [UInt64] = [], invalid: [UInt64] = [],
                allocateOnly: [UInt64] = [], carried: Bool = true, machine: MachineState = syntheticMachine()) throws {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    precondition(fd >= 0)
    defer { close(fd) }
    let configuration = XenDomainConfiguration(name: "test", vcpus: machine.vcpus.count, memoryBytes: 64 << 20, mmioHoleBytes: 1 << 30)
    let state = DeviceState(componentID: DeviceComponent.kvmVM, instance: 0, componentVersion: MachineStateEncoding.currentVersion,
                            blob: ByteSlice(MachineStateEncoding.encode(machine)))
    let writer = try XenImageWriter(fileDescriptor: fd, configuration: configuration, carriedState: carried ? [state] : [])
    let domain = XenStateMapping.domainState(from: machine)
    try writer.writeStaticData(cpuid: domain.cpuidPolicy, msrs: domain.msrPolicy)
    for pass in 0 ..< passes {
        let pages = pass == 0 ? frames : resent
        let contents = pages.map { pattern(frame: $0, pass: pass) }
        try contents.withUnsafeBufferPointers { pointers in
            let index = Dictionary(uniqueKeysWithValues: zip(pages, pointers))
            try writer.writePages(pages) { index[$0]! }
        }
    }
    if !invalid.isEmpty { try writer.writeFrames(invalid, type: .invalid) }
    if !allocateOnly.isEmpty { try writer.writeFrames(allocateOnly, type: .allocateOnly) }
    try writer.writeDomainState(domain)
    try writer.finish()
}

extension Array where Element == [UInt8] {
    func withUnsafeBufferPointers<R>(_ body: ([UnsafeRawPointer]) throws -> R) rethrows -> R {
        let copies = map { bytes -> UnsafeMutableRawPointer in
            let p = UnsafeMutableRawPointer.allocate(byteCount: bytes.count, alignment: 16)
            bytes.withUnsafeBytes { p.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            return p
        }
        defer { copies.forEach { $0.deallocate() } }
        return try body(copies.map { UnsafeRawPointer($0) })
    }
}

/// A record of an image, found by walking its framing: which stream, where its header starts, its type
/// and body length. Used to cut, reorder and corrupt images in tests.
struct ImageRecord {
    enum Stream { case libxl, libxc }
    var stream: Stream
    var offset: Int
    var type: UInt32
    var length: Int
    var end: Int { offset + 8 + length + (8 - length & 7) & 7 }
}

func records(_ image: [UInt8]) -> (libxlStart: Int, libxcStart: Int, records: [ImageRecord]) {
    func u32(_ at: Int) -> UInt32 { image.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: at, as: UInt32.self) } }
    let libxlStart = 48 + Int(u32(44))
    var out: [ImageRecord] = []
    var at = libxlStart + 16
    var libxcStart = 0
    var stream = ImageRecord.Stream.libxl
    while at < image.count {
        let r = ImageRecord(stream: stream, offset: at, type: u32(at), length: Int(u32(at + 4)))
        out.append(r)
        at = r.end
        if stream == .libxl && r.type == 1 {
            libxcStart = at
            at += 40
            stream = .libxc
        } else if stream == .libxc && r.type == 0 {
            stream = .libxl
        }
    }
    return (libxlStart, libxcStart, out)
}

func record(type: UInt32, body: [UInt8]) -> [UInt8] {
    var b = [UInt8]()
    withUnsafeBytes(of: type.littleEndian) { b += $0 }
    withUnsafeBytes(of: UInt32(body.count).littleEndian) { b += $0 }
    return b + body + [UInt8](repeating: 0, count: (8 - body.count & 7) & 7)
}

/// The body of a PAGE_DATA record of one normal page: how a test adds a Xen special page to an image.
func pageDataBody(frame: UInt64, contents: [UInt8]) -> [UInt8] {
    var body = [UInt8]()
    withUnsafeBytes(of: UInt32(1).littleEndian) { body += $0 }
    body += [0, 0, 0, 0]
    withUnsafeBytes(of: frame.littleEndian) { body += $0 }
    return body + contents
}

/// A test case with a fresh directory of its own for the images it writes, removed afterwards.
class XenFileTestCase: XCTestCase {
    var directory: URL!

    override func setUpWithError() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("xen-\(Self.self)-\(getpid())-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: directory) }

    func path(_ name: String) -> String { directory.appendingPathComponent(name).path }
}
