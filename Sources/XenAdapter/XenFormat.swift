// Constants of the three nested layers of an `xl save` image (protocol/xen.md):
//
//   file    := xl-header optional-data libxl-stream
//   libxl   := header(16, big-endian) record*            record := type:u32 length:u32 body pad-to-8
//   libxc   := image-header(24, big-endian) domain-header(16) record*   (inside LIBXC_CONTEXT's place)
//
// Record alignment is counted from the start of each stream, not of the file: the libxl stream begins
// wherever the xl header's optional data ends.

/// Constants of the xl save-file header.
public enum XLHeader {
    public static let magic: [UInt8] = Array("Xen saved domain, xl format\n \0 \r".utf8)
    public static let length = 48
    /// The byte-order word, written in the saving host's order: reads back as this value on a same-order host.
    public static let byteOrderMarker: UInt32 = 0x0102_0304
    public static let mandatoryJSON: UInt32 = 1 << 0
    public static let mandatoryStreamV2: UInt32 = 1 << 1
    public static let knownMandatory: UInt32 = mandatoryJSON | mandatoryStreamV2
    /// Tag of our own chunk in the optional data, after the domain configuration: the original KVM state.
    /// xl skips optional data it does not understand, so Xen tools ignore it.
    public static let kvmStateTag: [UInt8] = Array("MIGRKVM1".utf8)
}

/// Constants of the libxl migration stream, version 2.
public enum LibxlStream {
    public static let ident: UInt64 = 0x4C69_6278_6C46_6D74  // "LibxlFmt"
    public static let version: UInt32 = 2
    public static let optionBigEndian: UInt32 = 1 << 0
    public static let optionLegacy: UInt32 = 1 << 1

    public enum Record: UInt32, Sendable {
        case end = 0, libxcContext = 1, emulatorXenstoreData = 2, emulatorContext = 3
        case checkpointEnd = 4, checkpointState = 5
    }
}

/// Constants of the libxc migration stream (version 3; version 2 is read too).
public enum LibxcStream {
    public static let marker: UInt64 = 0xFFFF_FFFF_FFFF_FFFF
    public static let ident: UInt32 = 0x5845_4E46  // "XENF"
    public static let version: UInt32 = 3
    public static let domainTypeHVM: UInt32 = 2
    public static let pageShift = 12
    public static let pageSize = 1 << pageShift
    /// Pages per PAGE_DATA record that libxc writes; we write the same.
    public static let batchSize = 1024

    public enum Record: UInt32 {
        case end = 0, pageData = 1, x86PVInfo = 2, x86PVP2MFrames = 3, x86PVVCPUBasic = 4
        case x86PVVCPUExtended = 5, x86PVVCPUXsave = 6, sharedInfo = 7, x86TSCInfo = 8
        case hvmContext = 9, hvmParams = 10, toolstack = 11, x86PVVCPUMSRs = 12, verify = 13
        case checkpoint = 14, checkpointDirtyPFNList = 15, staticDataEnd = 16
        case x86CPUIDPolicy = 17, x86MSRPolicy = 18
    }

    /// The page type in bits 60-63 of a PAGE_DATA pfn word.
    public enum PageType: UInt64 {
        case normal = 0x0, l1 = 0x1, l2 = 0x2, l3 = 0x3, l4 = 0x4
        case l1Pinned = 0x9, l2Pinned = 0xA, l3Pinned = 0xB, l4Pinned = 0xC
        case broken = 0xD, allocateOnly = 0xE, invalid = 0xF

        /// BROKEN, XALLOC and XTAB entries carry no page contents.
        public var hasData: Bool { rawValue <= 0x4 || (0x9 ... 0xC).contains(rawValue) }
    }
    public static let pfnMask: UInt64 = (1 << 52) - 1
    public static let pfnReservedMask: UInt64 = ((1 << 60) - 1) & ~pfnMask
}

/// Bit 31 of a record type, in both streams: a reader that does not know the record may skip it.
let optionalRecordBit: UInt32 = 0x8000_0000

/// Xen's HVM parameters that a converted image carries (xen/include/public/hvm/params.h).
public enum HVMParam {
    public static let storePFN: UInt64 = 1
    public static let consolePFN: UInt64 = 17
    public static let x87FIPWidth: UInt64 = 36
}

/// The toolstack's special pages (xenstore, console, ioreq and friends) sit just below 0xff000 in a real
/// HVM guest's p2m, in the MMIO hole: outside RAM, but legitimately in an image.
public let xenSpecialPageFrames: Range<UInt64> = 0xFEFF0 ..< 0xFF000

/// Why an image was refused, and where: `offset` is a byte offset in the file.
public struct XenImageError: Error, CustomStringConvertible, Equatable {
    public let offset: UInt64
    public let reason: String
    public init(offset: UInt64, _ reason: String) {
        self.offset = offset
        self.reason = reason
    }
    public var description: String { "Xen image rejected at byte \(offset): \(reason)" }
}

/// Reads fixed-width fields from a buffer, refusing to read past its end. `base` is the buffer's offset
/// in the file, so errors name file offsets.
struct FieldReader {
    let bytes: UnsafeRawBufferPointer
    let base: UInt64
    var position = 0

    init(_ bytes: UnsafeRawBufferPointer, base: UInt64) {
        self.bytes = bytes
        self.base = base
    }

    var remaining: Int { bytes.count - position }
    var fileOffset: UInt64 { base + UInt64(position) }

    func error(_ reason: String, at position: Int? = nil) -> XenImageError {
        XenImageError(offset: base + UInt64(position ?? self.position), reason)
    }

    mutating func need(_ count: Int, _ what: String) throws(XenImageError) {
        guard count >= 0, count <= remaining else {
            throw error("truncated: \(what) needs \(count) bytes, \(remaining) left")
        }
    }

    mutating func bytes(_ count: Int, _ what: String) throws(XenImageError) -> UnsafeRawBufferPointer {
        try need(count, what)
        defer { position += count }
        return UnsafeRawBufferPointer(rebasing: bytes[position ..< position + count])
    }

    mutating func le<T: FixedWidthInteger>(_: T.Type, _ what: String) throws(XenImageError) -> T {
        let raw = try bytes(MemoryLayout<T>.size, what)
        return T(littleEndian: raw.loadUnaligned(as: T.self))
    }

    mutating func be<T: FixedWidthInteger>(_: T.Type, _ what: String) throws(XenImageError) -> T {
        let raw = try bytes(MemoryLayout<T>.size, what)
        return T(bigEndian: raw.loadUnaligned(as: T.self))
    }
}

extension UnsafeRawBufferPointer {
    func le<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T {
        T(littleEndian: loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}

/// Bytes padding a record body of `length` bytes to a multiple of 8.
@inline(__always) func padding8(_ length: Int) -> Int { (8 - length & 7) & 7 }

/// A growable little-endian byte buffer for the small records.
struct LEBytes {
    var bytes: [UInt8] = []
    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    mutating func be32(_ v: UInt32) { withUnsafeBytes(of: v.bigEndian) { bytes += $0 } }
    mutating func be64(_ v: UInt64) { withUnsafeBytes(of: v.bigEndian) { bytes += $0 } }
    mutating func raw(_ b: UnsafeRawBufferPointer) { bytes += b }
    mutating func raw(_ b: [UInt8]) { bytes += b }
    mutating func zeros(_ n: Int) { bytes += repeatElement(0, count: n) }
}
