import CKVM
import KVMBackend
import XCTest

/// The state blob's encoding, checked without KVM: round trip, and every way a blob can be bad.
final class MachineStateEncodingTests: XCTestCase {
    /// A state with recognisable, non-zero contents in every part.
    static func sampleState(vcpus: Int = 2) -> MachineState {
        func filled<T>(_ type: T.Type, seed: UInt8) -> T {
            let bytes = (0 ..< MemoryLayout<T>.size).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) }
            return bytes.withUnsafeBytes { $0.loadUnaligned(as: T.self) }
        }
        var master = filled(kvm_irqchip.self, seed: 1)
        master.chip_id = 0
        let devices = VMDeviceState(
            picMaster: master, picSlave: filled(kvm_irqchip.self, seed: 2), ioapic: filled(kvm_irqchip.self, seed: 3),
            timer: filled(kvm_pit_state2.self, seed: 4), clock: filled(kvm_clock_data.self, seed: 5))
        let states = (0 ..< vcpus).map { (index: Int) -> VCPUState in
            let cpuid = [filled(kvm_cpuid_entry2.self, seed: 6), filled(kvm_cpuid_entry2.self, seed: 7)]
            let xsave = (0 ..< 4096 + 64 * index).map { UInt8(truncatingIfNeeded: $0) }
            return VCPUState(
                id: UInt32(index), cpuid: cpuid,
                multiprocessing: kvm_mp_state(mp_state: 0), registers: filled(kvm_regs.self, seed: UInt8(index)),
                specialRegisters: filled(kvm_sregs.self, seed: 9), xsave: xsave,
                extendedControlRegisters: filled(kvm_xcrs.self, seed: 10), debugRegisters: filled(kvm_debugregs.self, seed: 11),
                localAPIC: filled(kvm_lapic_state.self, seed: 12),
                modelSpecificRegisters: [kvm_msr_entry(index: 0x10, reserved: 0, data: 123_456_789)],
                events: filled(kvm_vcpu_events.self, seed: 13), tscFrequencyKHz: 2_000_000)
        }
        return MachineState(devices: devices, vcpus: states)
    }

    func testRoundTripIsExact() throws {
        let encoded = MachineStateEncoding.encode(Self.sampleState())
        let decoded = try MachineStateEncoding.decode(encoded)
        XCTAssertEqual(decoded.vcpus.count, 2)
        XCTAssertEqual(decoded.vcpus[1].xsave.count, 4096 + 64)
        XCTAssertEqual(decoded.vcpus[0].modelSpecificRegisters.first?.data, 123_456_789)
        XCTAssertEqual(MachineStateEncoding.encode(decoded), encoded, "decode then encode must give the same bytes")
        XCTAssertEqual(encoded.count % 8, 0)
    }

    func testRefusesABlobFromANewerVersion() {
        var blob = MachineStateEncoding.encode(Self.sampleState())
        blob[8] = UInt8(MachineStateEncoding.currentVersion + 1)
        XCTAssertThrowsError(try MachineStateEncoding.decode(blob)) { error in
            let error = error as! MachineStateDecodingError
            XCTAssertEqual(error.offset, 8)
            XCTAssertTrue(error.reason.contains("version 2 is not supported"), error.reason)
        }
    }

    func testRefusesEveryTruncation() {
        let blob = MachineStateEncoding.encode(Self.sampleState(vcpus: 1))
        for length in stride(from: 0, to: blob.count, by: 37) {
            XCTAssertThrowsError(try MachineStateEncoding.decode(Array(blob[0 ..< length])), "length \(length)") { error in
                XCTAssertLessThanOrEqual((error as! MachineStateDecodingError).offset, length)
            }
        }
    }

    func testRefusesBadMagic() {
        var blob = MachineStateEncoding.encode(Self.sampleState())
        blob[0] = UInt8(ascii: "X")
        XCTAssertThrowsError(try MachineStateEncoding.decode(blob)) { error in
            XCTAssertTrue("\(error)".contains("bad magic"), "\(error)")
        }
    }

    /// Sections start at byte 16: tag, length, payload. Insert a section before the first one.
    private func insertingSection(tag: UInt32, payload: [UInt8]) -> [UInt8] {
        var blob = MachineStateEncoding.encode(Self.sampleState())
        var section: [UInt8] = []
        withUnsafeBytes(of: tag.littleEndian) { section += $0 }
        withUnsafeBytes(of: UInt32(payload.count).littleEndian) { section += $0 }
        section += payload + [UInt8](repeating: 0, count: (8 - payload.count % 8) % 8)
        blob.insert(contentsOf: section, at: 16)
        return blob
    }

    func testSkipsAnUnknownOptionalSection() throws {
        let blob = insertingSection(tag: 0x8123, payload: [1, 2, 3])
        XCTAssertEqual(try MachineStateEncoding.decode(blob).vcpus.count, 2)
    }

    func testRefusesAnUnknownMandatorySection() {
        let blob = insertingSection(tag: 0x0123, payload: [1, 2, 3])
        XCTAssertThrowsError(try MachineStateEncoding.decode(blob)) { error in
            XCTAssertEqual((error as! MachineStateDecodingError).offset, 16)
            XCTAssertTrue("\(error)".contains("unknown mandatory section 0x123"), "\(error)")
        }
    }

    func testRefusesAHostileLengthBeforeAllocating() {
        var blob = MachineStateEncoding.encode(Self.sampleState())
        blob.replaceSubrange(20 ..< 24, with: [0xFF, 0xFF, 0xFF, 0x7F])
        XCTAssertThrowsError(try MachineStateEncoding.decode(blob)) { error in
            XCTAssertTrue("\(error)".contains("exceeds the limit"), "\(error)")
        }
    }

    func testRefusesAMissingPart() {
        // Drop the PIC master section (the first, 8 + 520 bytes).
        var blob = MachineStateEncoding.encode(Self.sampleState())
        blob.removeSubrange(16 ..< 16 + 8 + MemoryLayout<kvm_irqchip>.size)
        XCTAssertThrowsError(try MachineStateEncoding.decode(blob)) { error in
            XCTAssertTrue("\(error)".contains("incomplete"), "\(error)")
        }
    }
}
