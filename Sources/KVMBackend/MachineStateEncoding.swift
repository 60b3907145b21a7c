import CKVM

/// The versioned binary encoding of `MachineState`, specified in protocol/kvm-state.md.
///
///     offset  size  field
///     0       8     magic "KVMSTATE"
///     8       4     format version (little-endian)
///     12      4     flags (0)
///     16      ...   sections, each: u32 tag, u32 length, `length` bytes, zero padding to 8 bytes
///
/// Sections appear in this order: the VM devices, then for each vCPU a VCPU_BEGIN followed by its parts,
/// then END. Every kernel structure is stored as the bytes of its Linux UAPI layout, which the kernel keeps
/// stable. A tag with bit 15 set is optional: a reader that does not know it skips it. An unknown tag without
/// that bit is an error.
public enum MachineStateEncoding {
    public static let magic: [UInt8] = Array("KVMSTATE".utf8)
    public static let currentVersion: UInt32 = 1
    /// Bounds checked before anything is allocated, so a hostile blob cannot ask for unbounded memory.
    public static let maximumVCPUs = 1024
    public static let maximumCPUIDEntries = 512
    public static let maximumMSRs = 2048
    public static let maximumXsaveSize = 1 << 20
    public static let maximumSectionLength = 1 << 20

    enum Tag: UInt32 {
        case picMaster = 0x0001, picSlave = 0x0002, ioapic = 0x0003, timer = 0x0004, clock = 0x0005
        case vcpuBegin = 0x0100, cpuid = 0x0101, multiprocessing = 0x0102, registers = 0x0103
        case specialRegisters = 0x0104, xsave = 0x0105, extendedControlRegisters = 0x0106
        case debugRegisters = 0x0107, localAPIC = 0x0108, modelSpecificRegisters = 0x0109
        case events = 0x010A, tscFrequency = 0x010B
        case end = 0xFFFF
        static let optionalBit: UInt32 = 0x8000
    }

    // MARK: encoding

    public static func encode(_ state: MachineState) -> [UInt8] {
        var out = ByteWriter()
        out.append(magic)
        out.append(currentVersion)
        out.append(UInt32(0))
        out.section(.picMaster, raw: state.devices.picMaster)
        out.section(.picSlave, raw: state.devices.picSlave)
        out.section(.ioapic, raw: state.devices.ioapic)
        out.section(.timer, raw: state.devices.timer)
        out.section(.clock, raw: state.devices.clock)
        for vcpu in state.vcpus {
            out.section(.vcpuBegin, raw: (vcpu.id, UInt32(0)))
            out.section(.cpuid, counted: vcpu.cpuid)
            out.section(.multiprocessing, raw: vcpu.multiprocessing)
            out.section(.registers, raw: vcpu.registers)
            out.section(.specialRegisters, raw: vcpu.specialRegisters)
            out.section(.xsave, bytes: vcpu.xsave)
            out.section(.extendedControlRegisters, raw: vcpu.extendedControlRegisters)
            out.section(.debugRegisters, raw: vcpu.debugRegisters)
            out.section(.localAPIC, raw: vcpu.localAPIC)
            out.section(.modelSpecificRegisters, counted: vcpu.modelSpecificRegisters)
            out.section(.events, raw: vcpu.events)
            out.section(.tscFrequency, raw: (vcpu.tscFrequencyKHz, UInt32(0)))
        }
        out.section(.end, bytes: [])
        return out.bytes
    }

    // MARK: decoding

    public static func decode(_ bytes: [UInt8]) throws(MachineStateDecodingError) -> MachineState {
        try bytes.withUnsafeBytes { buffer in Result { () throws(MachineStateDecodingError) in try decode(buffer) } }.get()
    }

    public static func decode(_ buffer: UnsafeRawBufferPointer) throws(MachineStateDecodingError) -> MachineState {
        var input = ByteReader(buffer)
        guard Array(try input.bytes(8, what: "magic")) == magic else {
            throw MachineStateDecodingError(offset: 0, reason: "not a KVM state blob (bad magic)")
        }
        let version: UInt32 = try input.read(what: "version")
        guard version <= currentVersion, version >= 1 else {
            throw MachineStateDecodingError(offset: 8, reason: "state blob version \(version) is not supported (this build reads 1...\(currentVersion))")
        }
        let flags: UInt32 = try input.read(what: "flags")
        guard flags == 0 else { throw MachineStateDecodingError(offset: 12, reason: "unknown flags 0x\(String(flags, radix: 16))") }

        var devices = PartialDevices()
        var vcpus: [PartialVCPU] = []
        while true {
            let sectionOffset = input.offset
            let rawTag: UInt32 = try input.read(what: "section tag")
            let length: UInt32 = try input.read(what: "section length")
            guard length <= maximumSectionLength else {
                throw MachineStateDecodingError(offset: sectionOffset + 4, reason: "section length \(length) exceeds the limit of \(maximumSectionLength)")
            }
            var body = ByteReader(try input.bytes(Int(length), what: "section of tag 0x\(String(rawTag, radix: 16))"), base: input.offset - Int(length))
            try input.skipPadding(after: Int(length))
            guard let tag = Tag(rawValue: rawTag) else {
                if rawTag & Tag.optionalBit != 0 { continue }
                throw MachineStateDecodingError(offset: sectionOffset, reason: "unknown mandatory section 0x\(String(rawTag, radix: 16))")
            }
            func current() throws(MachineStateDecodingError) -> Int {
                guard let last = vcpus.indices.last else {
                    throw MachineStateDecodingError(offset: sectionOffset, reason: "vCPU section 0x\(String(rawTag, radix: 16)) before any VCPU_BEGIN")
                }
                return last
            }
            switch tag {
            case .picMaster: devices.picMaster = try body.whole(kvm_irqchip.self, what: "PIC master")
            case .picSlave: devices.picSlave = try body.whole(kvm_irqchip.self, what: "PIC slave")
            case .ioapic: devices.ioapic = try body.whole(kvm_irqchip.self, what: "IOAPIC")
            case .timer: devices.timer = try body.whole(kvm_pit_state2.self, what: "PIT")
            case .clock: devices.clock = try body.whole(kvm_clock_data.self, what: "kvmclock")
            case .vcpuBegin:
                let (id, _) = try body.whole((UInt32, UInt32).self, what: "VCPU_BEGIN")
                guard vcpus.count < maximumVCPUs else {
                    throw MachineStateDecodingError(offset: sectionOffset, reason: "more than \(maximumVCPUs) vCPUs")
                }
                guard !vcpus.contains(where: { $0.id == id }) else {
                    throw MachineStateDecodingError(offset: sectionOffset, reason: "vCPU \(id) appears twice")
                }
                vcpus.append(PartialVCPU(id: id))
            case .cpuid: vcpus[try current()].cpuid = try body.counted(kvm_cpuid_entry2.self, limit: maximumCPUIDEntries, what: "CPUID")
            case .multiprocessing: vcpus[try current()].multiprocessing = try body.whole(kvm_mp_state.self, what: "MP state")
            case .registers: vcpus[try current()].registers = try body.whole(kvm_regs.self, what: "registers")
            case .specialRegisters: vcpus[try current()].specialRegisters = try body.whole(kvm_sregs.self, what: "special registers")
            case .xsave:
                guard length >= UInt32(MemoryLayout<kvm_xsave>.size), length <= maximumXsaveSize else {
                    throw MachineStateDecodingError(offset: sectionOffset, reason: "XSAVE area of \(length) bytes (expected \(MemoryLayout<kvm_xsave>.size)...\(maximumXsaveSize))")
                }
                vcpus[try current()].xsave = Array(try body.bytes(Int(length), what: "XSAVE"))
            case .extendedControlRegisters: vcpus[try current()].extendedControlRegisters = try body.whole(kvm_xcrs.self, what: "XCRs")
            case .debugRegisters: vcpus[try current()].debugRegisters = try body.whole(kvm_debugregs.self, what: "debug registers")
            case .localAPIC: vcpus[try current()].localAPIC = try body.whole(kvm_lapic_state.self, what: "LAPIC")
            case .modelSpecificRegisters: vcpus[try current()].modelSpecificRegisters = try body.counted(kvm_msr_entry.self, limit: maximumMSRs, what: "MSRs")
            case .events: vcpus[try current()].events = try body.whole(kvm_vcpu_events.self, what: "vCPU events")
            case .tscFrequency:
                let (khz, _) = try body.whole((UInt32, UInt32).self, what: "TSC frequency")
                vcpus[try current()].tscFrequencyKHz = khz
            case .end:
                guard input.remaining == 0 else {
                    throw MachineStateDecodingError(offset: input.offset, reason: "\(input.remaining) bytes after END")
                }
                return MachineState(devices: try devices.complete(at: sectionOffset),
                                    vcpus: try vcpus.map { v throws(MachineStateDecodingError) in try v.complete(at: sectionOffset) })
            }
        }
    }
}

/// Why a state blob was refused, and where.
public struct MachineStateDecodingError: Error, CustomStringConvertible, Equatable {
    public let offset: Int
    public let reason: String
    public var description: String { "KVM state blob rejected at byte \(offset): \(reason)" }
}

// MARK: - decoding helpers

private struct PartialDevices {
    var picMaster: kvm_irqchip?, picSlave: kvm_irqchip?, ioapic: kvm_irqchip?
    var timer: kvm_pit_state2?, clock: kvm_clock_data?

    func complete(at offset: Int) throws(MachineStateDecodingError) -> VMDeviceState {
        guard let picMaster, let picSlave, let ioapic, let timer, let clock else {
            throw MachineStateDecodingError(offset: offset, reason: "VM device state incomplete (PIC, IOAPIC, PIT and clock are all required)")
        }
        return VMDeviceState(picMaster: picMaster, picSlave: picSlave, ioapic: ioapic, timer: timer, clock: clock)
    }
}

private struct PartialVCPU {
    let id: UInt32
    var cpuid: [kvm_cpuid_entry2]?, multiprocessing: kvm_mp_state?, registers: kvm_regs?
    var specialRegisters: kvm_sregs?, xsave: [UInt8]?, extendedControlRegisters: kvm_xcrs?
    var debugRegisters: kvm_debugregs?, localAPIC: kvm_lapic_state?, modelSpecificRegisters: [kvm_msr_entry]?
    var events: kvm_vcpu_events?, tscFrequencyKHz: UInt32?

    init(id: UInt32) { self.id = id }

    func complete(at offset: Int) throws(MachineStateDecodingError) -> VCPUState {
        guard let cpuid, let multiprocessing, let registers, let specialRegisters, let xsave,
              let extendedControlRegisters, let debugRegisters, let localAPIC, let modelSpecificRegisters,
              let events, let tscFrequencyKHz else {
            throw MachineStateDecodingError(offset: offset, reason: "state of vCPU \(id) incomplete")
        }
        return VCPUState(id: id, cpuid: cpuid, multiprocessing: multiprocessing, registers: registers,
                         specialRegisters: specialRegisters, xsave: xsave,
                         extendedControlRegisters: extendedControlRegisters, debugRegisters: debugRegisters,
                         localAPIC: localAPIC, modelSpecificRegisters: modelSpecificRegisters, events: events,
                         tscFrequencyKHz: tscFrequencyKHz)
    }
}

private struct ByteWriter {
    var bytes: [UInt8] = []

    mutating func append(_ raw: [UInt8]) { bytes += raw }
    mutating func append<T>(_ value: T) { withUnsafeBytes(of: value) { bytes += $0 } }

    mutating func section(_ tag: MachineStateEncoding.Tag, bytes payload: [UInt8]) {
        append(tag.rawValue)
        append(UInt32(payload.count))
        bytes += payload
        bytes += [UInt8](repeating: 0, count: (8 - payload.count % 8) % 8)
    }

    mutating func section<T>(_ tag: MachineStateEncoding.Tag, raw value: T) {
        section(tag, bytes: withUnsafeBytes(of: value) { Array($0) })
    }

    /// A u32 count, u32 zero, then the elements.
    mutating func section<T>(_ tag: MachineStateEncoding.Tag, counted elements: [T]) {
        var payload = withUnsafeBytes(of: (UInt32(elements.count), UInt32(0))) { Array($0) }
        elements.withUnsafeBytes { payload += $0 }
        section(tag, bytes: payload)
    }
}

private struct ByteReader {
    let buffer: UnsafeRawBufferPointer
    let base: Int
    var position = 0

    init(_ buffer: UnsafeRawBufferPointer, base: Int = 0) {
        self.buffer = buffer
        self.base = base
    }

    var offset: Int { base + position }
    var remaining: Int { buffer.count - position }

    mutating func bytes(_ count: Int, what: String) throws(MachineStateDecodingError) -> UnsafeRawBufferPointer {
        guard count <= remaining else {
            throw MachineStateDecodingError(offset: offset, reason: "truncated: \(what) needs \(count) bytes, \(remaining) remain")
        }
        defer { position += count }
        return UnsafeRawBufferPointer(rebasing: buffer[position ..< position + count])
    }

    mutating func read<T>(what: String) throws(MachineStateDecodingError) -> T {
        let raw = try bytes(MemoryLayout<T>.size, what: what)
        return withZeroedStorage(of: T.self) { storage in
            storage.copyMemory(from: raw.baseAddress!, byteCount: raw.count)
            return storage.load(as: T.self)
        }
    }

    mutating func skipPadding(after length: Int) throws(MachineStateDecodingError) {
        let padding = (8 - length % 8) % 8
        for byte in try bytes(padding, what: "padding") where byte != 0 {
            throw MachineStateDecodingError(offset: offset - padding, reason: "non-zero padding")
        }
    }

    /// A section that must be exactly one `T`.
    mutating func whole<T>(_ type: T.Type, what: String) throws(MachineStateDecodingError) -> T {
        guard remaining == MemoryLayout<T>.size else {
            throw MachineStateDecodingError(offset: offset, reason: "\(what) section is \(remaining) bytes, expected \(MemoryLayout<T>.size)")
        }
        return try read(what: what)
    }

    /// A section of a u32 count, a u32 zero, and exactly that many `T`.
    mutating func counted<T>(_ type: T.Type, limit: Int, what: String) throws(MachineStateDecodingError) -> [T] {
        let start = offset
        let count: UInt32 = try read(what: "\(what) count")
        let _: UInt32 = try read(what: "\(what) reserved")
        guard count <= limit else {
            throw MachineStateDecodingError(offset: start, reason: "\(count) \(what) entries exceed the limit of \(limit)")
        }
        guard remaining == Int(count) * MemoryLayout<T>.stride else {
            throw MachineStateDecodingError(offset: start, reason: "\(what) section holds \(remaining) bytes for \(count) entries of \(MemoryLayout<T>.stride)")
        }
        let raw = try bytes(remaining, what: what)
        return (0 ..< Int(count)).map { index in
            withZeroedStorage(of: T.self) { storage in
                storage.copyMemory(from: raw.baseAddress! + index * MemoryLayout<T>.stride, byteCount: MemoryLayout<T>.size)
                return storage.load(as: T.self)
            }
        }
    }
}
