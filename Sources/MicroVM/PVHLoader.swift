import CKVM
import KVMBackend

/// Loads a PVH-bootable ELF into guest memory and prepares the boot vCPU as the PVH boot protocol asks:
/// 32-bit protected mode, paging off, flat segments, EBX holding the address of `struct hvm_start_info`.
///
/// A PVH kernel names its 32-bit entry point in an ELF note of owner "Xen" and type
/// XEN_ELFNOTE_PHYS32_ENTRY (18). Segments are loaded at their physical addresses.
public struct PVHImage {
    public let entryPoint: UInt32
    public let segments: [Segment]

    public struct Segment {
        public let physicalAddress: UInt64
        public let fileBytes: ArraySlice<UInt8>
        public let memorySize: UInt64
    }

    static let phys32EntryNoteType: UInt32 = 18

    /// Parses an ELF file; refuses anything that is not an x86-64 ELF with a PVH entry note.
    public init(elf bytes: [UInt8]) throws(PVHLoadError) {
        let reader = ELFReader(bytes: bytes)
        guard bytes.count >= 64, bytes[0 ..< 4].elementsEqual([0x7F, 0x45, 0x4C, 0x46]) else { throw .notELF }
        guard bytes[4] == 2 else { throw .unsupported("only 64-bit ELF files are loaded (EI_CLASS \(bytes[4]))") }
        guard bytes[5] == 1 else { throw .unsupported("big-endian ELF") }
        let machine: UInt16 = try reader.read(at: 18)
        guard machine == 62 else { throw .unsupported("ELF machine \(machine) is not x86-64 (62)") }
        let headerOffset: UInt64 = try reader.read(at: 32)
        let headerSize: UInt16 = try reader.read(at: 54)
        let headerCount: UInt16 = try reader.read(at: 56)
        guard headerSize >= 56 else { throw .malformed("program header size \(headerSize)") }

        var segments: [Segment] = []
        var entry: UInt32?
        for index in 0 ..< Int(headerCount) {
            let base = Int(headerOffset) + index * Int(headerSize)
            let type: UInt32 = try reader.read(at: base)
            let fileOffset: UInt64 = try reader.read(at: base + 8)
            let physical: UInt64 = try reader.read(at: base + 24)
            let fileSize: UInt64 = try reader.read(at: base + 32)
            let memorySize: UInt64 = try reader.read(at: base + 40)
            guard fileOffset <= UInt64(bytes.count), fileSize <= UInt64(bytes.count) - fileOffset else {
                throw .malformed("segment \(index) lies beyond the end of the file")
            }
            let contents = bytes[Int(fileOffset) ..< Int(fileOffset + fileSize)]
            switch type {
            case 1: // PT_LOAD
                guard memorySize >= fileSize else { throw .malformed("segment \(index) is smaller in memory than in the file") }
                segments.append(Segment(physicalAddress: physical, fileBytes: contents, memorySize: memorySize))
            case 4: // PT_NOTE
                if let found = try Self.findEntryNote(contents) { entry = found }
            default:
                continue
            }
        }
        guard let entry else { throw .noPVHNote }
        guard !segments.isEmpty else { throw .malformed("no loadable segment") }
        self.entryPoint = entry
        self.segments = segments
    }

    /// Walks the notes of one PT_NOTE segment: namesz, descsz, type, then name and desc, each 4-byte aligned.
    private static func findEntryNote(_ notes: ArraySlice<UInt8>) throws(PVHLoadError) -> UInt32? {
        let reader = ELFReader(bytes: Array(notes))
        var offset = 0
        while offset + 12 <= reader.bytes.count {
            let nameSize: UInt32 = try reader.read(at: offset)
            let descriptionSize: UInt32 = try reader.read(at: offset + 4)
            let type: UInt32 = try reader.read(at: offset + 8)
            let nameStart = offset + 12
            let descriptionStart = nameStart + Int((nameSize + 3) & ~3)
            let next = descriptionStart + Int((descriptionSize + 3) & ~3)
            guard nameSize < 256, descriptionSize < 4096, next <= reader.bytes.count else {
                throw .malformed("ELF note at offset \(offset) runs past its segment")
            }
            let name = reader.bytes[nameStart ..< nameStart + Int(nameSize)]
            if type == phys32EntryNoteType, name.elementsEqual(Array("Xen\0".utf8)) {
                switch descriptionSize {
                case 4: return try reader.read(at: descriptionStart)
                case 8:
                    let wide: UInt64 = try reader.read(at: descriptionStart)
                    guard wide <= UInt64(UInt32.max) else { throw .malformed("PVH entry point 0x\(String(wide, radix: 16)) is above 4 GiB") }
                    return UInt32(wide)
                default: throw .malformed("PVH entry note of \(descriptionSize) bytes")
                }
            }
            offset = next
        }
        return nil
    }

    // MARK: loading

    /// Where the loader puts the boot information, below the 1 MiB where PVH kernels are linked.
    static let startInfoAddress: UInt64 = 0x6000
    static let memoryMapAddress: UInt64 = 0x6100
    static let commandLineAddress: UInt64 = 0x7000
    static let commandLineLimit = 4096
    static let bootInfoRange: Range<UInt64> = 0x6000 ..< 0x8000

    /// Copies the segments into guest memory and writes `hvm_start_info`, the memory map and the command line.
    /// Returns the guest-physical address of `hvm_start_info`.
    public func load(into memory: GuestMemory, commandLine: String) throws(PVHLoadError) -> UInt64 {
        for segment in segments {
            let range = segment.physicalAddress ..< segment.physicalAddress + segment.memorySize
            guard let target = memory.pointer(guestPhysicalAddress: segment.physicalAddress, length: Int(segment.memorySize)) else {
                throw .doesNotFit("segment at 0x\(String(segment.physicalAddress, radix: 16)) of \(segment.memorySize) bytes is outside guest RAM")
            }
            guard !range.overlaps(Self.bootInfoRange) else {
                throw .doesNotFit("segment at 0x\(String(segment.physicalAddress, radix: 16)) overlaps the boot information at 0x6000")
            }
            segment.fileBytes.withUnsafeBytes { target.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            (target + segment.fileBytes.count).initializeMemory(as: UInt8.self, repeating: 0,
                                                               count: Int(segment.memorySize) - segment.fileBytes.count)
        }

        var line = Array(commandLine.utf8)
        guard line.count < Self.commandLineLimit else { throw .doesNotFit("command line of \(line.count) bytes exceeds \(Self.commandLineLimit - 1)") }
        line.append(0)
        var memoryMap: [UInt8] = []
        for slot in memory.slots { // struct hvm_memmap_table_entry: addr, size, type (1 = RAM), reserved
            appendLittleEndian(slot.guestPhysicalAddress, to: &memoryMap)
            appendLittleEndian(slot.size, to: &memoryMap)
            appendLittleEndian(UInt32(1), to: &memoryMap)
            appendLittleEndian(UInt32(0), to: &memoryMap)
        }
        var startInfo: [UInt8] = [] // struct hvm_start_info, version 1
        appendLittleEndian(UInt32(0x336E_C578), to: &startInfo) // magic
        appendLittleEndian(UInt32(1), to: &startInfo)           // version
        appendLittleEndian(UInt32(0), to: &startInfo)           // flags
        appendLittleEndian(UInt32(0), to: &startInfo)           // nr_modules
        appendLittleEndian(UInt64(0), to: &startInfo)           // modlist_paddr
        appendLittleEndian(Self.commandLineAddress, to: &startInfo)
        appendLittleEndian(UInt64(0), to: &startInfo)           // rsdp_paddr: no ACPI
        appendLittleEndian(Self.memoryMapAddress, to: &startInfo)
        appendLittleEndian(UInt32(memory.slots.count), to: &startInfo)
        appendLittleEndian(UInt32(0), to: &startInfo)           // reserved
        for (bytes, address) in [(startInfo, Self.startInfoAddress), (memoryMap, Self.memoryMapAddress), (line, Self.commandLineAddress)] {
            guard let target = memory.pointer(guestPhysicalAddress: address, length: bytes.count) else {
                throw .doesNotFit("boot information at 0x\(String(address, radix: 16)) is outside guest RAM")
            }
            bytes.withUnsafeBytes { target.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        }
        return Self.startInfoAddress
    }

    /// The registers of the boot vCPU at the PVH entry point.
    public func bootRegisters(startInfo: UInt64, base: kvm_sregs) -> (kvm_regs, kvm_sregs) {
        var registers = kvm_regs()
        registers.rip = UInt64(entryPoint)
        registers.rbx = startInfo
        registers.rflags = 0x2 // bit 1 is always set; interrupts off
        var special = base
        func flat(_ selector: UInt16, type: UInt8, system: UInt8 = 1) -> kvm_segment {
            kvm_segment(base: 0, limit: 0xFFFF_FFFF, selector: selector, type: type, present: 1, dpl: 0,
                        db: 1, s: system, l: 0, g: 1, avl: 0, unusable: 0, padding: 0)
        }
        special.cs = flat(0x10, type: 0xB) // execute/read, accessed
        special.ds = flat(0x18, type: 0x3) // read/write, accessed
        special.es = special.ds
        special.fs = special.ds
        special.gs = special.ds
        special.ss = special.ds
        special.tr = kvm_segment(base: 0, limit: 0x67, selector: 0x20, type: 0xB, present: 1, dpl: 0,
                                 db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 0, padding: 0) // busy 32-bit TSS
        special.cr0 = 0x11 // PE and ET: protected mode, no paging
        special.cr4 = 0
        special.efer = 0
        return (registers, special)
    }
}

public enum PVHLoadError: Error, CustomStringConvertible, Equatable {
    case notELF
    case unsupported(String)
    case malformed(String)
    case noPVHNote
    case doesNotFit(String)

    public var description: String {
        switch self {
        case .notELF: "guest image is not an ELF file"
        case .unsupported(let what): "guest image not supported: \(what)"
        case .malformed(let what): "guest image is malformed: \(what)"
        case .noPVHNote: "guest image has no PVH entry point (no ELF note Xen/XEN_ELFNOTE_PHYS32_ENTRY): it cannot be booted with the PVH protocol"
        case .doesNotFit(let what): "guest image does not fit: \(what)"
        }
    }
}

/// Bounds-checked little-endian reads from an ELF file.
private struct ELFReader {
    let bytes: [UInt8]

    func read<T: FixedWidthInteger>(at offset: Int) throws(PVHLoadError) -> T {
        guard offset >= 0, offset <= bytes.count - MemoryLayout<T>.size else {
            throw .malformed("field at offset \(offset) lies beyond the end of the file")
        }
        var value: T = 0
        for index in (0 ..< MemoryLayout<T>.size).reversed() { value = value << 8 | T(bytes[offset + index]) }
        return value
    }
}

func appendLittleEndian<T: FixedWidthInteger>(_ value: T, to bytes: inout [UInt8]) {
    withUnsafeBytes(of: value.littleEndian) { bytes += $0 }
}
