import Foundation
import Glibc
import MigrationWire
import Threads

/// What a reader is prepared to accept beyond the format's own checks.
public struct XenReaderLimits: Sendable {
    /// Most guest RAM a configuration may declare: the reader allocates a frame table for it.
    public var maxGuestMemory: UInt64 = 1 << 40
    /// Largest xl optional data (configuration and carried state).
    public var maxOptionalData = 64 << 20
    public init() {}
}

/// A record the reader does not know but the format lets it skip (bit 31 set), kept for whoever wants it.
public struct XenOptionalRecord: Equatable, Sendable {
    public enum Stream: Sendable { case libxl, libxc }
    public var stream: Stream
    public var type: UInt32
    public var body: [UInt8]
}

/// An EMULATOR_XENSTORE_DATA or EMULATOR_CONTEXT record.
public struct XenEmulatorRecord: Equatable, Sendable {
    public var type: LibxlStream.Record
    public var emulatorID: UInt32
    public var index: UInt32
    public var data: [UInt8]
}

/// A parsed `xl save` image of an x86 HVM guest. Page contents stay in the file's bytes (a read-only
/// mapping for files): `page(frame:)` points into them, the last copy of a frame in the stream winning.
public final class XenImage {
    public let configuration: XenDomainConfiguration
    public let configurationJSON: [UInt8]
    public let layout: GuestMemoryLayout
    public let xenVersion: (major: UInt32, minor: UInt32)
    public let domainState: XenDomainState
    /// The device states our writer carried in the xl optional data, when present and intact.
    public let carriedState: [DeviceState]?
    public let emulatorRecords: [XenEmulatorRecord]
    public let optionalRecords: [XenOptionalRecord]
    /// Pages of the toolstack's special frames (xenstore, console, ...), outside RAM.
    public let specialPages: [UInt64: UnsafeRawPointer]
    /// Special frames the image only allocates (XALLOC, no copy with data), ascending.
    public let specialAllocateOnlyFrames: [UInt64]
    /// PAGE_DATA entries read, data pages among them, and frames marked XALLOC.
    public let pageEntries: Int, dataPages: Int, allocateOnlyFrames: Int
    public let fileSize: UInt64

    private let bytes: UnsafeRawBufferPointer
    private let owner: Owner
    private var prefetcher: Prefetcher?
    /// Per frame below the layout's end: 0 = no data (zero), else the byte offset of its last copy + 1.
    private let frameTable: UnsafeMutablePointer<UInt64>
    private let frameTableBytes: Int

    /// How the bytes are held: a file mapping, or a copy.
    private enum Owner {
        case mapping(UnsafeMutableRawPointer, Int)
        case copy(UnsafeMutableRawBufferPointer)
    }

    /// Reads the image file at `path`.
    public convenience init(path: String, limits: XenReaderLimits = XenReaderLimits()) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw XenFileError(operation: "open \(path)", errno: errno) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw XenFileError(operation: "fstat \(path)", errno: errno) }
        let size = Int(st.st_size)
        guard size > 0 else { throw XenImageError(offset: 0, "empty file") }
        guard let base = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0), base != MAP_FAILED else {
            throw XenFileError(operation: "mmap \(path)", errno: errno)
        }
        // The check reads only record headers and pfn lists: no readahead of the pages between them.
        madvise(base, size, MADV_RANDOM)
        do {
            try self.init(bytes: UnsafeRawBufferPointer(start: base, count: size), owner: .mapping(base, size), limits: limits)
            // Pages are read front to back from here on. A helper thread faults the file in ahead of the
            // reader, so the disk reads overlap the copying instead of taking turns with it.
            madvise(base, size, MADV_SEQUENTIAL)
            prefetcher = Prefetcher(base: base, size: size)
        } catch {
            munmap(base, size)
            throw error
        }
    }

    /// Parses an image held in memory; the bytes are copied.
    public convenience init(bytes: UnsafeRawBufferPointer, limits: XenReaderLimits = XenReaderLimits()) throws {
        let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes.count, 1), alignment: 16)
        if let base = bytes.baseAddress { copy.baseAddress!.copyMemory(from: base, byteCount: bytes.count) }
        do {
            try self.init(bytes: UnsafeRawBufferPointer(rebasing: copy[0 ..< bytes.count]), owner: .copy(copy), limits: limits)
        } catch {
            copy.deallocate()
            throw error
        }
    }

    private init(bytes: UnsafeRawBufferPointer, owner: Owner, limits: XenReaderLimits) throws {
        self.bytes = bytes
        self.owner = owner
        fileSize = UInt64(bytes.count)
        var parser = Parser(bytes: bytes, limits: limits)
        try parser.xlHeader()
        configuration = parser.configuration!
        configurationJSON = parser.configurationJSON
        carriedState = parser.carriedState
        layout = configuration.layout
        let frames = Int(layout.regions.last.map { ($0.guestPhysicalAddress + $0.size) >> 12 } ?? 0)
        frameTableBytes = max(frames * 8, 8)
        // An anonymous mapping: frames never written cost nothing.
        guard let table = mmap(nil, frameTableBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              table != MAP_FAILED else { throw XenFileError(operation: "mmap frame table", errno: errno) }
        frameTable = table.bindMemory(to: UInt64.self, capacity: max(frames, 1))
        do {
            try parser.libxlStream(frameTable: frameTable, layout: layout)
        } catch {
            munmap(table, frameTableBytes)
            throw error
        }
        xenVersion = parser.xenVersion
        domainState = XenDomainState(hvmContext: parser.hvmContext!, hvmParams: parser.hvmParams,
                                     cpuidPolicy: parser.cpuidPolicy, msrPolicy: parser.msrPolicy,
                                     tscInfo: parser.tscInfo ?? XenTSCInfo(khz: 0, nanoseconds: 0))
        emulatorRecords = parser.emulatorRecords
        optionalRecords = parser.optionalRecords
        specialPages = parser.specialPages.mapValues { bytes.baseAddress! + $0 }
        specialAllocateOnlyFrames = parser.specialAllocated.subtracting(parser.specialPages.keys).sorted()
        pageEntries = parser.pageEntries
        dataPages = parser.dataPages
        allocateOnlyFrames = parser.allocateOnlyFrames
    }

    deinit {
        prefetcher?.finish()
        munmap(UnsafeMutableRawPointer(frameTable), frameTableBytes)
        switch owner {
        case .mapping(let base, let size): munmap(base, size)
        case .copy(let copy): copy.deallocate()
        }
    }

    /// The contents of `frame`'s last copy in the image, or nil when the image holds none (the page is zero).
    public func page(frame: UInt64) -> UnsafeRawPointer? {
        guard frame < UInt64(frameTableBytes / 8), case let offset = frameTable[Int(frame)], offset != 0 else { return nil }
        return bytes.baseAddress! + Int(offset - 1)
    }

    /// Calls `visit` with every RAM frame the image holds data for, in ascending order.
    public func forEachDataFrame(_ visit: (UInt64) throws -> Void) rethrows {
        for region in layout.regions {
            for frame in (region.guestPhysicalAddress >> 12) ..< ((region.guestPhysicalAddress + region.size) >> 12)
            where frameTable[Int(frame)] != 0 {
                try visit(frame)
            }
        }
    }
}

/// Faults a file mapping in, front to back, 16 MiB at a time, on its own thread; stops early when asked.
///
/// Sendable: `stopped` is guarded by `lock`; the mapping it faults in is only read.
private final class Prefetcher: @unchecked Sendable {
    private let base: UnsafeMutableRawPointer
    private let size: Int
    private let lock = NSLock()
    private var stopped = false
    private let done = DispatchSemaphore(value: 0)

    init(base: UnsafeMutableRawPointer, size: Int) {
        self.base = base
        self.size = size
        startThread(named: "xen-image-prefetch") { [self] in run() }
    }

    private func run() {
        var offset = 0
        while offset < size, !lock.withLock({ stopped }) {
            let n = min(16 << 20, size - offset)
            madvise(base + offset, n, 22)  // MADV_POPULATE_READ (Linux 5.14); fails harmlessly before
            offset += n
        }
        done.signal()
    }

    /// Returns once the thread no longer touches the mapping.
    func finish() {
        lock.withLock { stopped = true }
        done.wait()
    }
}

/// The reader proper: one pass over the bytes, every length checked before it is used.
private struct Parser {
    let bytes: UnsafeRawBufferPointer
    let limits: XenReaderLimits
    var position = 0

    var configuration: XenDomainConfiguration?
    var configurationJSON: [UInt8] = []
    var carriedState: [DeviceState]?
    var xenVersion: (major: UInt32, minor: UInt32) = (0, 0)
    var hvmContext: HVMContext?
    var hvmParams: [(index: UInt64, value: UInt64)] = []
    var cpuidPolicy: [XenCPUIDLeaf] = []
    var msrPolicy: [XenMSREntry] = []
    var tscInfo: XenTSCInfo?
    var emulatorRecords: [XenEmulatorRecord] = []
    var optionalRecords: [XenOptionalRecord] = []
    var specialPages: [UInt64: Int] = [:]
    /// Special frames named by XALLOC, whether or not they also have data (`specialPages` wins).
    var specialAllocated: Set<UInt64> = []
    var pageEntries = 0, dataPages = 0, allocateOnlyFrames = 0

    init(bytes: UnsafeRawBufferPointer, limits: XenReaderLimits) {
        self.bytes = bytes
        self.limits = limits
    }

    func fail(_ reason: String, at offset: Int) -> XenImageError { XenImageError(offset: UInt64(offset), reason) }

    /// A reader over the rest of the file from the current position.
    var rest: FieldReader { FieldReader(UnsafeRawBufferPointer(rebasing: bytes[position...]), base: UInt64(position)) }

    // MARK: xl header

    mutating func xlHeader() throws {
        var r = rest
        let magic = try r.bytes(32, "xl header magic")
        guard magic.elementsEqual(XLHeader.magic) else { throw fail("bad magic: not an xl save file", at: 0) }
        let order = try r.le(UInt32.self, "byte order")
        guard order == XLHeader.byteOrderMarker else {
            throw fail("byte order 0x\(String(order, radix: 16)): the image was saved on a host of the other byte order", at: 32)
        }
        let mandatory = try r.le(UInt32.self, "mandatory flags")
        guard mandatory & ~XLHeader.knownMandatory == 0 else {
            throw fail("unknown mandatory flags 0x\(String(mandatory & ~XLHeader.knownMandatory, radix: 16))", at: 36)
        }
        guard mandatory & XLHeader.mandatoryStreamV2 != 0 else { throw fail("legacy (pre-v2) stream: not supported", at: 36) }
        let optionalFlags = try r.le(UInt32.self, "optional flags")
        guard optionalFlags == 0 else { throw fail("unknown optional flags 0x\(String(optionalFlags, radix: 16))", at: 40) }
        let optionalLength = try r.le(UInt32.self, "optional data length")
        guard Int(optionalLength) <= limits.maxOptionalData else {
            throw fail("optional data of \(optionalLength) bytes exceeds the limit of \(limits.maxOptionalData)", at: 44)
        }
        let optional = try r.bytes(Int(optionalLength), "xl optional data")
        var o = FieldReader(optional, base: 48)
        guard optionalLength >= 4 else { throw fail("no domain configuration in the xl header", at: 48) }
        let configLength = try o.le(UInt32.self, "configuration length")
        guard Int(configLength) <= o.remaining else {
            throw fail("configuration of \(configLength) bytes overruns the optional data (\(o.remaining) left)", at: 48)
        }
        configurationJSON = Array(try o.bytes(Int(configLength), "configuration"))
        guard mandatory & XLHeader.mandatoryJSON != 0,
              let parsed = XenDomainConfiguration.parse(json: configurationJSON) else {
            throw fail("the domain configuration is not libxl JSON", at: 52)
        }
        guard let memoryKiB = parsed.memoryKiB, memoryKiB > 0, memoryKiB % 4 == 0 else {
            throw fail("the domain configuration names no memory size (b_info.max_memkb)", at: 52)
        }
        guard memoryKiB <= limits.maxGuestMemory / 1024 else {
            throw fail("guest memory of \(memoryKiB) KiB exceeds the reader's limit", at: 52)
        }
        let holeKiB = parsed.holeKiB ?? XenDomainConfiguration.defaultMMIOHole / 1024
        guard holeKiB % 4 == 0, holeKiB > 0, holeKiB < 4 << 20 else { throw fail("mmio hole of \(holeKiB) KiB", at: 52) }
        configuration = XenDomainConfiguration(name: parsed.name ?? "", vcpus: parsed.vcpus ?? 1,
                                               memoryBytes: memoryKiB * 1024, mmioHoleBytes: holeKiB * 1024)
        // What follows the configuration is for whoever understands it; xl skips it. Ours starts with a tag.
        if o.remaining >= 16, try o.bytes(8, "tag").elementsEqual(XLHeader.kvmStateTag) {
            carriedState = try Self.carriedStates(&o)
        }
        position = 48 + Int(optionalLength)
    }

    static func carriedStates(_ o: inout FieldReader) throws(XenImageError) -> [DeviceState] {
        let count = try o.le(UInt32.self, "carried state count")
        let crc = try o.le(UInt32.self, "carried state checksum")
        let body = UnsafeRawBufferPointer(rebasing: o.bytes[o.position...])
        guard CRC32C.update(0, body) == crc else { throw o.error("carried KVM state fails its CRC32C") }
        guard Int(count) <= body.count / 16 else { throw o.error("\(count) carried states cannot fit in \(body.count) bytes") }
        var states: [DeviceState] = []
        for _ in 0 ..< count {
            let component = try o.le(UInt32.self, "component"), instance = try o.le(UInt32.self, "instance")
            let version = try o.le(UInt32.self, "version"), length = try o.le(UInt32.self, "length")
            let blob = try o.bytes(Int(length), "carried state blob")
            states.append(DeviceState(componentID: component, instance: instance, componentVersion: version, blob: ByteSlice(blob)))
        }
        guard o.remaining == 0 else { throw o.error("\(o.remaining) bytes after the carried states") }
        return states
    }

    // MARK: libxl stream

    /// One record of either stream at the current position: (type, body, body offset). Checks the padding.
    mutating func record(streamStart: Int, what: String) throws -> (type: UInt32, body: UnsafeRawBufferPointer, at: Int) {
        let at = position
        precondition((at - streamStart) % 8 == 0)
        var r = rest
        let type = try r.le(UInt32.self, "\(what) record type")
        let length = Int(try r.le(UInt32.self, "\(what) record length"))
        let body = try r.bytes(length, "\(what) record body (type 0x\(String(type, radix: 16)))")
        let pad = try r.bytes(padding8(length), "\(what) record padding")
        if let bad = pad.firstIndex(where: { $0 != 0 }) {
            throw fail("non-zero padding after a \(what) record of type 0x\(String(type, radix: 16))", at: at + 8 + length + bad)
        }
        position = at + 8 + length + pad.count
        return (type, body, at + 8)
    }

    mutating func libxlStream(frameTable: UnsafeMutablePointer<UInt64>, layout: GuestMemoryLayout) throws {
        let start = position
        var r = rest
        let ident = try r.be(UInt64.self, "libxl header ident")
        guard ident == LibxlStream.ident else { throw fail("bad magic: libxl stream ident 0x\(String(ident, radix: 16))", at: start) }
        let version = try r.be(UInt32.self, "libxl header version")
        guard version == LibxlStream.version else { throw fail("libxl stream version \(version), expected 2", at: start + 8) }
        let options = try r.be(UInt32.self, "libxl header options")
        guard options & LibxlStream.optionBigEndian == 0 else { throw fail("big-endian libxl stream: not supported", at: start + 12) }
        guard options & ~(LibxlStream.optionBigEndian | LibxlStream.optionLegacy) == 0 else {
            throw fail("reserved libxl header options 0x\(String(options, radix: 16))", at: start + 12)
        }
        position = start + 16
        var sawLibxc = false
        while true {
            let rec = try record(streamStart: start, what: "libxl")
            switch LibxlStream.Record(rawValue: rec.type) {
            case .end:
                guard rec.body.isEmpty else { throw fail("libxl END with a body", at: rec.at - 8) }
                guard sawLibxc else { throw fail("libxl stream ends without a libxc stream", at: rec.at - 8) }
                guard position == bytes.count else { throw fail("\(bytes.count - position) bytes after the libxl END", at: position) }
                return
            case .libxcContext:
                guard rec.body.isEmpty else { throw fail("LIBXC_CONTEXT with a body", at: rec.at - 8) }
                guard !sawLibxc else { throw fail("second LIBXC_CONTEXT: checkpointed streams are not supported", at: rec.at - 8) }
                sawLibxc = true
                try libxcStream(frameTable: frameTable, layout: layout)
            case .emulatorXenstoreData, .emulatorContext:
                guard rec.body.count >= 8 else { throw fail("emulator record of \(rec.body.count) bytes, needs 8", at: rec.at) }
                emulatorRecords.append(XenEmulatorRecord(type: LibxlStream.Record(rawValue: rec.type)!,
                                                         emulatorID: rec.body.le(UInt32.self, at: 0), index: rec.body.le(UInt32.self, at: 4),
                                                         data: Array(rec.body[8...])))
            case .checkpointEnd:
                guard rec.body.isEmpty else { throw fail("CHECKPOINT_END with a body", at: rec.at - 8) }
            case .checkpointState:
                throw fail("CHECKPOINT_STATE (COLO) is not supported", at: rec.at - 8)
            case nil:
                guard rec.type & optionalRecordBit != 0 else {
                    throw fail("unknown mandatory libxl record type 0x\(String(rec.type, radix: 16))", at: rec.at - 8)
                }
                optionalRecords.append(XenOptionalRecord(stream: .libxl, type: rec.type, body: Array(rec.body)))
            }
        }
    }

    // MARK: libxc stream

    mutating func libxcStream(frameTable: UnsafeMutablePointer<UInt64>, layout: GuestMemoryLayout) throws {
        let start = position
        var r = rest
        let marker = try r.be(UInt64.self, "libxc image header marker")
        guard marker == LibxcStream.marker else { throw fail("bad magic: libxc marker 0x\(String(marker, radix: 16))", at: start) }
        let ident = try r.be(UInt32.self, "libxc image header id")
        guard ident == LibxcStream.ident else { throw fail("bad magic: libxc id 0x\(String(ident, radix: 16))", at: start + 8) }
        let version = try r.be(UInt32.self, "libxc image header version")
        guard version == 2 || version == 3 else { throw fail("libxc stream version \(version), expected 2 or 3", at: start + 12) }
        let options = try r.be(UInt16.self, "libxc options")
        guard options & 1 == 0 else { throw fail("big-endian libxc stream: not supported", at: start + 16) }
        guard options == 0 else { throw fail("reserved libxc options 0x\(String(options, radix: 16))", at: start + 16) }
        let reserved1 = try r.be(UInt16.self, "libxc reserved"), reserved2 = try r.be(UInt32.self, "libxc reserved")
        guard reserved1 == 0 && reserved2 == 0 else { throw fail("reserved libxc image header bytes are not zero", at: start + 18) }
        let domainType = try r.le(UInt32.self, "domain type")
        guard domainType == LibxcStream.domainTypeHVM else {
            throw fail(domainType == 1 ? "x86 PV guests are not supported" : "unknown domain type \(domainType)", at: start + 24)
        }
        let pageShift = try r.le(UInt16.self, "page shift")
        guard pageShift == LibxcStream.pageShift else { throw fail("page shift \(pageShift), expected 12", at: start + 28) }
        guard try r.le(UInt16.self, "domain header reserved") == 0 else { throw fail("reserved domain header bytes are not zero", at: start + 30) }
        xenVersion = (try r.le(UInt32.self, "xen major"), try r.le(UInt32.self, "xen minor"))
        position = start + 40

        // A version 2 stream has no STATIC_DATA_END: its first page marks the end of static data.
        var staticDone = false
        let pfnLimit = max(UInt64(frameTableBytesFrames(layout)), 1 << 20)
        while true {
            let rec = try record(streamStart: start, what: "libxc")
            let header = rec.at - 8
            func empty(_ name: String) throws {
                guard rec.body.isEmpty else { throw fail("\(name) with a body of \(rec.body.count) bytes", at: header) }
            }
            func dynamic(_ name: String) throws {
                if !staticDone {
                    guard version == 2 else { throw fail("\(name) before STATIC_DATA_END", at: header) }
                    staticDone = true
                }
            }
            switch LibxcStream.Record(rawValue: rec.type) {
            case .end:
                try empty("libxc END")
                guard staticDone else { throw fail("libxc stream ends without STATIC_DATA_END", at: header) }
                guard hvmContext != nil else { throw fail("libxc stream ends without HVM_CONTEXT", at: header) }
                return
            case .staticDataEnd:
                try empty("STATIC_DATA_END")
                guard version == 3 else { throw fail("STATIC_DATA_END in a version 2 stream", at: header) }
                guard !staticDone else { throw fail("second STATIC_DATA_END", at: header) }
                staticDone = true
            case .x86CPUIDPolicy, .x86MSRPolicy:
                let isCPUID = rec.type == LibxcStream.Record.x86CPUIDPolicy.rawValue
                let size = isCPUID ? 24 : 16
                guard version == 3, !staticDone else { throw fail("CPU policy record after static data", at: header) }
                guard !rec.body.isEmpty, rec.body.count % size == 0 else {
                    throw fail("CPU policy record of \(rec.body.count) bytes, not a multiple of \(size)", at: header)
                }
                for i in stride(from: 0, to: rec.body.count, by: size) {
                    let w = { (k: Int) in rec.body.le(UInt32.self, at: i + 4 * k) }
                    if isCPUID {
                        cpuidPolicy.append(XenCPUIDLeaf(leaf: w(0), subleaf: w(1), eax: w(2), ebx: w(3), ecx: w(4), edx: w(5)))
                    } else {
                        msrPolicy.append(XenMSREntry(index: w(0), flags: w(1), value: rec.body.le(UInt64.self, at: i + 8)))
                    }
                }
            case .pageData:
                try dynamic("PAGE_DATA")
                try pageData(rec.body, at: rec.at, frameTable: frameTable, layout: layout, pfnLimit: pfnLimit)
            case .x86TSCInfo:
                try dynamic("X86_TSC_INFO")
                guard rec.body.count == 24 else { throw fail("X86_TSC_INFO of \(rec.body.count) bytes, expected 24", at: header) }
                guard rec.body.le(UInt32.self, at: 20) == 0 else { throw fail("reserved X86_TSC_INFO bytes are not zero", at: rec.at + 20) }
                tscInfo = XenTSCInfo(mode: rec.body.le(UInt32.self, at: 0), khz: rec.body.le(UInt32.self, at: 4),
                                     nanoseconds: rec.body.le(UInt64.self, at: 8), incarnation: rec.body.le(UInt32.self, at: 16))
            case .hvmContext:
                try dynamic("HVM_CONTEXT")
                guard hvmContext == nil else { throw fail("second HVM_CONTEXT", at: header) }
                guard !rec.body.isEmpty else { throw fail("empty HVM_CONTEXT", at: header) }
                hvmContext = try HVMContext.parse(rec.body, base: UInt64(rec.at))
            case .hvmParams:
                try dynamic("HVM_PARAMS")
                // Xen 4.6-4.8 could write an empty one: tolerated, as the spec's errata ask.
                if rec.body.isEmpty { continue }
                guard rec.body.count >= 8 else { throw fail("HVM_PARAMS of \(rec.body.count) bytes", at: header) }
                let count = Int(rec.body.le(UInt32.self, at: 0))
                guard rec.body.le(UInt32.self, at: 4) == 0 else { throw fail("reserved HVM_PARAMS bytes are not zero", at: rec.at + 4) }
                guard count <= (rec.body.count - 8) / 16, rec.body.count == 8 + 16 * count else {
                    throw fail("HVM_PARAMS count \(count) disagrees with its length \(rec.body.count)", at: rec.at)
                }
                for i in 0 ..< count {
                    hvmParams.append((rec.body.le(UInt64.self, at: 8 + 16 * i), rec.body.le(UInt64.self, at: 16 + 16 * i)))
                }
            case .verify:
                // Pages after VERIFY repeat memory for comparison; applying them is harmless.
                try empty("VERIFY")
            case .checkpoint, .checkpointDirtyPFNList:
                throw fail("checkpointed (Remus/COLO) streams are not supported", at: header)
            case .x86PVInfo, .x86PVP2MFrames, .x86PVVCPUBasic, .x86PVVCPUExtended, .x86PVVCPUXsave, .x86PVVCPUMSRs, .sharedInfo:
                throw fail("PV record type \(rec.type) in an HVM stream", at: header)
            case .toolstack:
                throw fail("deprecated TOOLSTACK record", at: header)
            case nil:
                guard rec.type & optionalRecordBit != 0 else {
                    throw fail("unknown mandatory libxc record type 0x\(String(rec.type, radix: 16))", at: header)
                }
                optionalRecords.append(XenOptionalRecord(stream: .libxc, type: rec.type, body: Array(rec.body)))
            }
        }
    }

    func frameTableBytesFrames(_ layout: GuestMemoryLayout) -> Int {
        Int(layout.regions.last.map { ($0.guestPhysicalAddress + $0.size) >> 12 } ?? 0)
    }

    mutating func pageData(_ body: UnsafeRawBufferPointer, at: Int, frameTable: UnsafeMutablePointer<UInt64>,
                           layout: GuestMemoryLayout, pfnLimit: UInt64) throws {
        guard body.count >= 16 else { throw fail("PAGE_DATA of \(body.count) bytes", at: at - 8) }
        let count = Int(body.le(UInt32.self, at: 0))
        guard count > 0 else { throw fail("PAGE_DATA with a count of 0", at: at) }
        guard body.le(UInt32.self, at: 4) == 0 else { throw fail("reserved PAGE_DATA bytes are not zero", at: at + 4) }
        guard count <= (body.count - 8) / 8 else {
            throw fail("PAGE_DATA count \(count) needs \(8 * count) bytes of pfns, the record has \(body.count - 8)", at: at)
        }
        var withData = 0
        for i in 0 ..< count {
            let word = body.le(UInt64.self, at: 8 + 8 * i)
            guard word & LibxcStream.pfnReservedMask == 0 else { throw fail("reserved bits set in pfn entry \(i)", at: at + 8 + 8 * i) }
            guard let type = LibxcStream.PageType(rawValue: word >> 60) else {
                throw fail("unknown page type \(word >> 60) in pfn entry \(i)", at: at + 8 + 8 * i)
            }
            if type.hasData { withData += 1 }
        }
        let dataStart = 8 + 8 * count
        guard body.count - dataStart == withData * LibxcStream.pageSize else {
            throw fail("PAGE_DATA count inconsistent: \(withData) pages with data need \(withData * LibxcStream.pageSize) bytes, the record has \(body.count - dataStart)", at: at)
        }
        var page = 0
        for i in 0 ..< count {
            let word = body.le(UInt64.self, at: 8 + 8 * i)
            let pfn = word & LibxcStream.pfnMask
            let type = LibxcStream.PageType(rawValue: word >> 60)!
            let inRAM = layout.contains(frame: pfn, pageShift: 12)
            if type.hasData {
                let offset = at + dataStart + page * LibxcStream.pageSize
                page += 1
                if inRAM {
                    frameTable[Int(pfn)] = UInt64(offset) + 1
                } else if xenSpecialPageFrames.contains(pfn) {
                    specialPages[pfn] = offset
                } else {
                    throw fail("pfn 0x\(String(pfn, radix: 16)) outside the guest's RAM", at: at + 8 + 8 * i)
                }
                dataPages += 1
            } else {
                guard pfn < pfnLimit else { throw fail("pfn 0x\(String(pfn, radix: 16)) outside the guest", at: at + 8 + 8 * i) }
                if type == .allocateOnly {
                    guard inRAM || xenSpecialPageFrames.contains(pfn) else {
                        throw fail("XALLOC pfn 0x\(String(pfn, radix: 16)) outside the guest's RAM", at: at + 8 + 8 * i)
                    }
                    allocateOnlyFrames += 1
                    if !inRAM { specialAllocated.insert(pfn) }
                }
                // XALLOC only allocates: an earlier copy stays. XTAB and BROKEN take the frame away, so it
                // reads as zero.
                if type != .allocateOnly {
                    if inRAM { frameTable[Int(pfn)] = 0 } else { specialPages[pfn] = nil; specialAllocated.remove(pfn) }
                }
            }
        }
        pageEntries += count
    }
}
