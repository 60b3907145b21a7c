import Foundation
import Glibc
import MigrationWire

/// The domain configuration xl stores in the image, as the JSON of libxl_domain_config. Xen derives the
/// guest's RAM layout from it: RAM fills [0, 4 GiB - mmio hole) and continues at 4 GiB.
public struct XenDomainConfiguration: Equatable, Sendable {
    public var name: String
    public var vcpus: Int
    public var memoryBytes: UInt64
    public var mmioHoleBytes: UInt64

    public static let fourGiB: UInt64 = 4 << 30
    /// libxl's default hole for HVM guests, when the configuration names none.
    public static let defaultMMIOHole: UInt64 = 256 << 20

    public init(name: String, vcpus: Int, memoryBytes: UInt64, mmioHoleBytes: UInt64) {
        self.name = name
        self.vcpus = vcpus
        self.memoryBytes = memoryBytes
        self.mmioHoleBytes = mmioHoleBytes
    }

    /// The configuration whose RAM layout is `layout`, or nil when Xen cannot express it (RAM must start at
    /// 0, be at most two regions, and the second must start at 4 GiB).
    public init?(layout: GuestMemoryLayout, name: String, vcpus: Int) {
        let r = layout.regions
        guard let first = r.first, first.guestPhysicalAddress == 0, first.size % 4096 == 0 else { return nil }
        let hole: UInt64
        switch r.count {
        case 1 where first.size <= Self.fourGiB - Self.defaultMMIOHole:
            // Any hole at least this big gives the same layout; MicroVM's 1 GiB keeps it stable as RAM grows.
            hole = first.size <= 3 << 30 ? 1 << 30 : Self.fourGiB - first.size
        case 2 where r[1].guestPhysicalAddress == Self.fourGiB && first.size < Self.fourGiB:
            hole = Self.fourGiB - first.size
        default: return nil
        }
        self.init(name: name, vcpus: vcpus, memoryBytes: layout.totalBytes, mmioHoleBytes: hole)
    }

    public var layout: GuestMemoryLayout {
        let lowEnd = Self.fourGiB - mmioHoleBytes
        var regions = [MemoryRegion(guestPhysicalAddress: 0, size: min(memoryBytes, lowEnd))]
        if memoryBytes > lowEnd {
            regions.append(MemoryRegion(guestPhysicalAddress: Self.fourGiB, size: memoryBytes - lowEnd))
        }
        return GuestMemoryLayout(regions: regions)
    }

    /// libxl's JSON form; the keyed union of build info is written as "type.hvm".
    public func json() -> [UInt8] {
        let escaped = name.unicodeScalars.map { c -> String in
            c == "\"" || c == "\\" ? "\\\(c)" : (c.value < 0x20 ? String(format: "\\u%04x", c.value) : String(c))
        }.joined()
        let kib = memoryBytes / 1024
        let text = """
        {"c_info":{"type":"hvm","name":"\(escaped)"},\
        "b_info":{"max_vcpus":\(vcpus),"avail_vcpus":[\((0 ..< vcpus).map(String.init).joined(separator: ","))],\
        "max_memkb":\(kib),"target_memkb":\(kib),\
        "type.hvm":{"mmio_hole_memkb":\(mmioHoleBytes / 1024)}}}
        """
        return Array(text.utf8) + [0]
    }

    /// Reads the fields we use from libxl's JSON; nil fields were absent.
    static func parse(json: [UInt8]) -> (name: String?, vcpus: Int?, memoryKiB: UInt64?, holeKiB: UInt64?)? {
        let trimmed = json.last == 0 ? Array(json.dropLast()) : json
        guard let object = try? JSONSerialization.jsonObject(with: Data(trimmed)) as? [String: Any] else { return nil }
        let cInfo = object["c_info"] as? [String: Any]
        let bInfo = object["b_info"] as? [String: Any]
        let hvm = bInfo?["type.hvm"] as? [String: Any]
        func number(_ any: Any?) -> UInt64? { (any as? NSNumber).flatMap { $0.int64Value >= 0 ? UInt64($0.int64Value) : nil } }
        return (cInfo?["name"] as? String, number(bInfo?["max_vcpus"]).map(Int.init),
                number(bInfo?["max_memkb"]), number(hvm?["mmio_hole_memkb"]))
    }
}

/// Writes an `xl save` image of an x86 HVM guest to a file descriptor, front to back: the headers when
/// created, then static data, pages (any number of times: a live stream repeats them and the last copy
/// wins), the domain state, emulator records, and `finish`. protocol/xen.md describes the bytes.
public final class XenImageWriter {
    public let fileDescriptor: Int32
    private let buffer: UnsafeMutableRawPointer
    private let capacity = 8 << 20
    private var used = 0
    public private(set) var bytesWritten: UInt64 = 0
    private var libxcDone = false

    /// Writes the xl header, with `configuration` and our chunk of device states (the lossless copy of the
    /// guest's own state) in its optional data, the libxl header, LIBXC_CONTEXT and libxc's two headers.
    public init(fileDescriptor: Int32, configuration: XenDomainConfiguration, carriedState: [DeviceState],
                xenVersion: (major: UInt32, minor: UInt32) = (4, 17)) throws {
        self.fileDescriptor = fileDescriptor
        buffer = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096)
        let config = configuration.json()
        var optional = LEBytes()
        optional.u32(UInt32(config.count))
        optional.raw(config)
        if !carriedState.isEmpty { optional.raw(Self.carriedStateChunk(carriedState)) }
        var out = LEBytes()
        out.raw(XLHeader.magic)
        out.u32(XLHeader.byteOrderMarker)
        out.u32(XLHeader.mandatoryStreamV2 | XLHeader.mandatoryJSON)
        out.u32(0)
        out.u32(UInt32(optional.bytes.count))
        out.raw(optional.bytes)
        // libxl stream, big-endian header
        out.be64(LibxlStream.ident)
        out.be32(LibxlStream.version)
        out.be32(0)
        out.u32(LibxlStream.Record.libxcContext.rawValue)
        out.u32(0)
        // libxc stream: image header (big-endian) and domain header
        out.be64(LibxcStream.marker)
        out.be32(LibxcStream.ident)
        out.be32(LibxcStream.version)
        out.bytes += [0, 0]  // options: little-endian
        out.zeros(6)
        out.u32(LibxcStream.domainTypeHVM)
        out.u16(UInt16(LibxcStream.pageShift))
        out.u16(0)
        out.u32(xenVersion.major)
        out.u32(xenVersion.minor)
        try append(out.bytes)
    }

    deinit { buffer.deallocate() }

    /// The optional-data chunk: tag, count, CRC32C of what follows, then per state component, instance,
    /// version, length and blob.
    static func carriedStateChunk(_ states: [DeviceState]) -> [UInt8] {
        var body = LEBytes()
        for s in states {
            body.u32(s.componentID)
            body.u32(s.instance)
            body.u32(s.componentVersion)
            body.u32(UInt32(s.blob.count))
            s.blob.withUnsafeBytes { body.raw($0) }
        }
        var out = LEBytes()
        out.raw(XLHeader.kvmStateTag)
        out.u32(UInt32(states.count))
        out.u32(CRC32C.checksum(body.bytes))
        out.raw(body.bytes)
        return out.bytes
    }

    /// X86_CPUID_POLICY and X86_MSR_POLICY (each left out when empty) and STATIC_DATA_END.
    public func writeStaticData(cpuid: [XenCPUIDLeaf], msrs: [XenMSREntry]) throws {
        if !cpuid.isEmpty {
            var b = LEBytes()
            for l in cpuid { [l.leaf, l.subleaf, l.eax, l.ebx, l.ecx, l.edx].forEach { b.u32($0) } }
            try record(LibxcStream.Record.x86CPUIDPolicy.rawValue, b.bytes)
        }
        if !msrs.isEmpty {
            var b = LEBytes()
            for m in msrs { b.u32(m.index); b.u32(m.flags); b.u64(m.value) }
            try record(LibxcStream.Record.x86MSRPolicy.rawValue, b.bytes)
        }
        try record(LibxcStream.Record.staticDataEnd.rawValue, [])
    }

    /// PAGE_DATA records for `frames` (normal pages, contents from `contents`), batched as libxc does.
    public func writePages(_ frames: some Collection<UInt64>, contents: (UInt64) -> UnsafeRawPointer) throws {
        var batch: [UInt64] = []
        batch.reserveCapacity(LibxcStream.batchSize)
        for frame in frames {
            batch.append(frame)
            if batch.count == LibxcStream.batchSize { try pageRecord(batch, type: .normal, contents: contents); batch.removeAll(keepingCapacity: true) }
        }
        if !batch.isEmpty { try pageRecord(batch, type: .normal, contents: contents) }
    }

    /// PAGE_DATA records marking `frames` with a type that carries no data: XALLOC for RAM that is
    /// allocated but zero, XTAB for frames that stopped being valid.
    public func writeFrames(_ frames: some Collection<UInt64>, type: LibxcStream.PageType) throws {
        precondition(!type.hasData)
        var batch: [UInt64] = []
        for frame in frames {
            batch.append(frame)
            if batch.count == LibxcStream.batchSize { try pageRecord(batch, type: type) { _ in fatalError() }; batch.removeAll(keepingCapacity: true) }
        }
        if !batch.isEmpty { try pageRecord(batch, type: type) { _ in fatalError() } }
    }

    private func pageRecord(_ frames: [UInt64], type: LibxcStream.PageType, contents: (UInt64) -> UnsafeRawPointer) throws {
        let dataBytes = type.hasData ? frames.count * LibxcStream.pageSize : 0
        var head = LEBytes()
        head.bytes.reserveCapacity(16 + 8 * frames.count)
        head.u32(LibxcStream.Record.pageData.rawValue)
        head.u32(UInt32(8 + 8 * frames.count + dataBytes))
        head.u32(UInt32(frames.count))
        head.u32(0)
        for f in frames { head.u64(f & LibxcStream.pfnMask | type.rawValue << 60) }
        try append(head.bytes)
        guard type.hasData else { return }
        // Page contents go to the file straight from where they are, in runs of adjacent pages: one copy
        // fewer than gathering them in the buffer.
        try flush()
        var runs: [iovec] = []
        runs.reserveCapacity(frames.count)
        for f in frames {
            let page = contents(f)
            if let last = runs.last, last.iov_base! + last.iov_len == UnsafeMutableRawPointer(mutating: page) {
                runs[runs.count - 1].iov_len += LibxcStream.pageSize
            } else {
                runs.append(iovec(iov_base: UnsafeMutableRawPointer(mutating: page), iov_len: LibxcStream.pageSize))
            }
        }
        try writeVector(runs)
    }

    /// writev, in groups the kernel accepts, resuming after short writes.
    private func writeVector(_ runs: [iovec]) throws {
        var runs = runs[...]
        while !runs.isEmpty {
            let group = Array(runs.prefix(1024))  // UIO_MAXIOV
            let total = group.reduce(0) { $0 + $1.iov_len }
            let n = group.withUnsafeBufferPointer { Glibc.writev(fileDescriptor, $0.baseAddress, Int32($0.count)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw XenFileError(operation: "writev", errno: errno)
            }
            bytesWritten += UInt64(n)
            if n == total { runs = runs.dropFirst(group.count); continue }
            // A short write: drop what went out and go on from the middle of a run.
            var left = n
            while left >= runs.first!.iov_len { left -= runs.first!.iov_len; runs = runs.dropFirst() }
            runs[runs.startIndex].iov_base = runs[runs.startIndex].iov_base! + left
            runs[runs.startIndex].iov_len -= left
        }
    }

    /// X86_TSC_INFO, HVM_CONTEXT, HVM_PARAMS and the libxc END: the state of the paused guest.
    public func writeDomainState(_ state: XenDomainState) throws {
        var tsc = LEBytes()
        tsc.u32(state.tscInfo.mode)
        tsc.u32(state.tscInfo.khz)
        tsc.u64(state.tscInfo.nanoseconds)
        tsc.u32(state.tscInfo.incarnation)
        tsc.u32(0)
        try record(LibxcStream.Record.x86TSCInfo.rawValue, tsc.bytes)
        // libxc's own order: the context before the parameters.
        try record(LibxcStream.Record.hvmContext.rawValue, state.hvmContext.encoded())
        if !state.hvmParams.isEmpty {
            var params = LEBytes()
            params.u32(UInt32(state.hvmParams.count))
            params.u32(0)
            for p in state.hvmParams { params.u64(p.index); params.u64(p.value) }
            try record(LibxcStream.Record.hvmParams.rawValue, params.bytes)
        }
        try record(LibxcStream.Record.end.rawValue, [])
        libxcDone = true
    }

    /// An EMULATOR_XENSTORE_DATA or EMULATOR_CONTEXT record of the libxl stream.
    public func writeEmulatorRecord(_ type: LibxlStream.Record, emulatorID: UInt32, index: UInt32, data: [UInt8]) throws {
        precondition(libxcDone && (type == .emulatorContext || type == .emulatorXenstoreData))
        var b = LEBytes()
        b.u32(emulatorID)
        b.u32(index)
        b.raw(data)
        try record(type.rawValue, b.bytes)
    }

    /// The libxl END record; flushes. The file is complete after this.
    public func finish() throws {
        precondition(libxcDone, "finish before the domain state")
        try record(LibxlStream.Record.end.rawValue, [])
        try flush()
    }

    /// A record of either stream: both share the framing (type, length, body, zero padding to 8).
    private func record(_ type: UInt32, _ body: [UInt8]) throws {
        var out = LEBytes()
        out.u32(type)
        out.u32(UInt32(body.count))
        out.raw(body)
        out.zeros(padding8(body.count))
        try append(out.bytes)
    }

    private func append(_ bytes: [UInt8]) throws {
        if capacity - used < bytes.count { try flush() }
        if bytes.count > capacity {
            try bytes.withUnsafeBytes { try writeAll($0) }
            return
        }
        bytes.withUnsafeBytes { (buffer + used).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        used += bytes.count
    }

    private func flush() throws {
        try writeAll(UnsafeRawBufferPointer(start: buffer, count: used))
        used = 0
    }

    private func writeAll(_ bytes: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < bytes.count {
            let n = Glibc.write(fileDescriptor, bytes.baseAddress! + done, bytes.count - done)
            if n < 0 {
                if errno == EINTR { continue }
                throw XenFileError(operation: "write", errno: errno)
            }
            done += n
        }
        bytesWritten += UInt64(bytes.count)
    }
}

/// A system call on an image file failed.
public struct XenFileError: Error, CustomStringConvertible {
    public let operation: String
    public let errno: Int32
    public var description: String { "\(operation): \(String(cString: strerror(errno)))" }
}
