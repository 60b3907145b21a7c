// The HVM context blob (HVM_CONTEXT record): Xen's per-domain hypervisor state as a sequence of save
// entries, each an 8-byte descriptor (typecode:u16, instance:u16, length:u32) and `length` bytes, packed
// with no padding, opening with HEADER and closed by END (typecode 0, length 0). Structures are those of
// xen/include/public/arch-x86/hvm/save.h, little-endian; protocol/xen.md lists the fields we map.

/// One save entry. Entries this adapter does not map are kept as they are and written back unchanged.
public struct HVMSaveEntry: Equatable, Sendable {
    public var typecode: UInt16
    public var instance: UInt16
    public var data: [UInt8]

    public init(typecode: UInt16, instance: UInt16, data: [UInt8]) {
        self.typecode = typecode
        self.instance = instance
        self.data = data
    }
}

/// Save entry typecodes (HVM_SAVE_CODE in save.h).
public enum HVMSaveType {
    public static let end: UInt16 = 0
    public static let header: UInt16 = 1
    public static let cpu: UInt16 = 2
    public static let pic: UInt16 = 3
    public static let ioapic: UInt16 = 4
    public static let lapic: UInt16 = 5
    public static let lapicRegisters: UInt16 = 6
    public static let pit: UInt16 = 10
    public static let rtc: UInt16 = 11
    public static let mtrr: UInt16 = 14
    public static let cpuXsave: UInt16 = 16
    public static let tscAdjust: UInt16 = 19

    /// The entry's name in save.h, for people reading an image's contents.
    public static func name(_ typecode: UInt16) -> String {
        let names: [UInt16: String] = [end: "END", header: "HEADER", cpu: "CPU", pic: "PIC", ioapic: "IOAPIC", lapic: "LAPIC",
                                       lapicRegisters: "LAPIC_REGS", pit: "PIT", rtc: "RTC", mtrr: "MTRR", cpuXsave: "CPU_XSAVE",
                                       tscAdjust: "TSC_ADJUST"]
        return names[typecode] ?? "type \(typecode)"
    }

    /// The sizes Xen accepts for the fixed-size entries we map. CPU has a pre-4.7 compat size (no
    /// msr_tsc_aux, flags); LAPIC grew pending_esr (and 8 bytes) in Xen 4.21.
    static let acceptedLengths: [UInt16: Set<Int>] = [
        header: [24], cpu: [1032, 1016], pic: [8], ioapic: [400], lapic: [24, 32],
        lapicRegisters: [1024], pit: [56], rtc: [24], mtrr: [240], tscAdjust: [8],
    ]
}

public struct HVMContext: Equatable, Sendable {
    public static let headerMagic: UInt32 = 0x5438_1286
    public static let headerVersion: UInt32 = 1
    /// Entries between HEADER and END, HEADER included, END excluded.
    public var entries: [HVMSaveEntry]

    public init(entries: [HVMSaveEntry]) { self.entries = entries }

    public func entry(_ typecode: UInt16, instance: UInt16 = 0) -> HVMSaveEntry? {
        entries.first { $0.typecode == typecode && $0.instance == instance }
    }

    public func entries(_ typecode: UInt16) -> [HVMSaveEntry] { entries.filter { $0.typecode == typecode } }

    /// The blob, END appended.
    public func encoded() -> [UInt8] {
        var out = LEBytes()
        for e in entries + [HVMSaveEntry(typecode: HVMSaveType.end, instance: 0, data: [])] {
            out.u16(e.typecode)
            out.u16(e.instance)
            out.u32(UInt32(e.data.count))
            out.raw(e.data)
        }
        return out.bytes
    }

    /// Parses a blob found at file offset `base`, checking the framing, HEADER and the sizes of the entries
    /// we map; entries we do not map are kept whatever their size.
    public static func parse(_ blob: UnsafeRawBufferPointer, base: UInt64) throws(XenImageError) -> HVMContext {
        var reader = FieldReader(blob, base: base)
        var entries: [HVMSaveEntry] = []
        while true {
            let at = reader.position
            let typecode = try reader.le(UInt16.self, "save descriptor typecode")
            let instance = try reader.le(UInt16.self, "save descriptor instance")
            let length = try reader.le(UInt32.self, "save descriptor length")
            guard Int(length) <= reader.remaining else {
                throw reader.error("HVM save entry \(typecode) declares \(length) bytes, \(reader.remaining) left", at: at)
            }
            if entries.isEmpty && typecode != HVMSaveType.header {
                throw reader.error("HVM context does not open with HEADER (typecode \(typecode))", at: at)
            }
            if typecode == HVMSaveType.end {
                guard length == 0 else { throw reader.error("HVM context END entry with length \(length)", at: at) }
                guard reader.remaining == 0 else {
                    throw reader.error("\(reader.remaining) bytes after the HVM context END entry")
                }
                return HVMContext(entries: entries)
            }
            if let accepted = HVMSaveType.acceptedLengths[typecode], !accepted.contains(Int(length)) {
                throw reader.error("HVM save entry \(typecode) instance \(instance) has length \(length), expected one of \(accepted.sorted())", at: at)
            }
            let data = try reader.bytes(Int(length), "save entry")
            if typecode == HVMSaveType.header {
                guard entries.isEmpty else { throw reader.error("second HVM context HEADER", at: at) }
                let magic = data.le(UInt32.self, at: 0), version = data.le(UInt32.self, at: 4)
                guard magic == headerMagic else { throw reader.error("HVM context HEADER magic 0x\(String(magic, radix: 16))", at: at + 8) }
                guard version == headerVersion else { throw reader.error("HVM context HEADER version \(version)", at: at + 12) }
            }
            entries.append(HVMSaveEntry(typecode: typecode, instance: instance, data: Array(data)))
        }
    }
}

/// Little-endian field access by byte offset into an entry's bytes.
struct EntryBytes {
    var bytes: [UInt8]
    init(count: Int) { bytes = [UInt8](repeating: 0, count: count) }
    init(_ bytes: [UInt8]) { self.bytes = bytes }

    subscript<T: FixedWidthInteger>(_ type: T.Type, _ offset: Int) -> T {
        get {
            guard offset + MemoryLayout<T>.size <= bytes.count else { return 0 }
            return bytes.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
        }
        set {
            bytes.withUnsafeMutableBytes { $0.storeBytes(of: newValue.littleEndian, toByteOffset: offset, as: T.self) }
        }
    }

    mutating func copy(_ source: UnsafeRawBufferPointer, to offset: Int) {
        bytes.withUnsafeMutableBytes { dst in
            let n = min(source.count, dst.count - offset)
            guard n > 0 else { return }
            dst.baseAddress!.advanced(by: offset).copyMemory(from: source.baseAddress!, byteCount: n)
        }
    }

    func slice(_ offset: Int, _ count: Int) -> [UInt8] {
        guard offset < bytes.count else { return [UInt8](repeating: 0, count: count) }
        let end = min(bytes.count, offset + count)
        return Array(bytes[offset ..< end]) + [UInt8](repeating: 0, count: count - (end - offset))
    }
}

/// Byte offsets of `struct hvm_hw_cpu` (1032 bytes; the 1016-byte compat form lacks msr_tsc_aux and
/// everything after error_code is shifted back by 8).
enum CPUField {
    static let fpu = 0                  // 512-byte FXSAVE image
    static let gpr = 512                // rax rbx rcx rdx rbp rsi rdi rsp r8..r15 rip rflags: 18 x u64
    static let cr0 = 656, cr2 = 664, cr3 = 672, cr4 = 680
    static let dr = 688                 // dr0..dr3, dr6, dr7: 6 x u64
    static let selectors = 736          // cs ds es fs gs ss tr ldtr: 8 x u32
    static let limits = 768             // cs ds es fs gs ss tr ldtr idtr gdtr: 10 x u32
    static let bases = 808              // same order: 10 x u64
    static let arbytes = 888            // cs ds es fs gs ss tr ldtr: 8 x u32
    static let sysenterCS = 920, sysenterESP = 928, sysenterEIP = 936
    static let shadowGS = 944, msrFlags = 952, lstar = 960, star = 968, cstar = 976, sfmask = 984
    static let efer = 992, tscAux = 1000, tsc = 1008
    static let pendingEvent = 1016, errorCode = 1020, flags = 1024
    static let size = 1032
    static let fpuInitialised: UInt32 = 1
}
