import Foundation
import MigrationEngine
import MigrationWire
import PageCodec

/// The snapshot file format, versions 1 and 2 (protocol/snapshot.md); version 2 adds DICTIONARY.
///
/// ```
///  offset 0      header (4096 bytes): magic, version, kind, ids, digests, counts, part table, CRC32C
///  4096 ...      parts, each at a multiple of 4096, each listed in the part table with its CRC32C:
///                LAYOUT          memory regions
///                PAGE_MAP        one byte per guest frame: absent / zero / data
///                PAGE_CHECKSUMS  CRC32C of each data page, 4 bytes per frame
///                MEMORY          plain: frame i at MEMORY + i * 4096 (sparse, mappable)
///                                compressed: blocks of data pages, lz4 or zstd
///                BLOCK_INDEX     compressed only: where each block lies, and its CRC32C
///                DICTIONARY      compressed, version 2 only: sample pages that zstd blocks may refer to
///                DEVICES         device-state components, the VM configuration among them
/// ```
/// Every part but MEMORY carries a CRC32C in the part table; MEMORY is covered page by page (plain) or
/// block by block and page by page (compressed). The header names the snapshot (random id), the memory
/// digest of the guest it restores to, and, for a diff snapshot, its parent's id and memory digest.
public enum SnapshotFormat {
    public static let magic: [UInt8] = Array("MIGSNAP1".utf8)
    /// The newest version this build reads. It writes version 2 only for a file with a DICTIONARY, which a
    /// reader of version 1 would misread; every other file stays version 1, readable by older builds.
    public static let version: UInt32 = 2
    /// The longest DICTIONARY a reader accepts.
    public static let maximumDictionaryLength = 1 << 20
    public static let pageSize = 4096
    public static let headerLength = 4096
    /// Fixed offset of the part table inside the header, and how many parts fit.
    static let partTableOffset = 512
    static let partEntryLength = 32
    static let maximumParts = 16
    static let parentNameOffset = 128
    static let parentNameLength = 384
    /// Pages per compressed block: 256 KiB, large enough for zstd to find repeats across pages, small
    /// enough that a lazy restore decompresses little more than the page it was asked for.
    public static let blockPages = 64
    /// The largest guest a snapshot may describe (1 TiB): bounds every table read from a file.
    public static let maximumFrames: UInt64 = 1 << 28
    /// How many parents a chain may have; bounds the work a hostile chain can cause.
    public static let maximumChainLength = 64
}

public enum SnapshotKind: UInt16, Sendable, Codable, CustomStringConvertible {
    /// Every page of guest memory that is not zero.
    case full = 1
    /// Only the pages that changed since the parent: written ones as data, cleared ones as zero.
    case diff = 2

    public var description: String { self == .full ? "full" : "diff" }
}

public enum SnapshotMemoryFormat: UInt16, Sendable, Codable, CustomStringConvertible {
    /// Page-aligned at fixed offsets: a restore can map or read any page directly.
    case plain = 1
    /// Compressed blocks of data pages: smaller, read block by block.
    case compressed = 2

    public var description: String { self == .plain ? "plain" : "compressed" }
}

/// What PAGE_MAP says of one frame.
public enum PageState: UInt8, Sendable {
    /// Not in this file: zero in a full snapshot, unchanged from the parent in a diff.
    case absent = 0
    /// Zero (a diff records a page that became zero this way).
    case zero = 1
    /// Stored in MEMORY, with its CRC32C in PAGE_CHECKSUMS.
    case data = 2
}

public enum PartType: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    case layout = 1, pageMap = 2, pageChecksums = 3, memory = 4, blockIndex = 5, devices = 6, dictionary = 7

    public var description: String {
        switch self {
        case .layout: "layout"
        case .pageMap: "page map"
        case .pageChecksums: "page checksums"
        case .memory: "memory"
        case .blockIndex: "block index"
        case .devices: "devices"
        case .dictionary: "dictionary"
        }
    }
}

/// One entry of the part table.
public struct Part: Sendable, Equatable {
    public var type: PartType
    public var offset: UInt64
    public var length: UInt64
    /// CRC32C of the part's bytes; zero for MEMORY, which is checked page by page.
    public var checksum: UInt32
}

/// A snapshot's identity: 16 random bytes.
public struct SnapshotID: Hashable, Sendable, CustomStringConvertible, Codable {
    public var bytes: [UInt8]

    public init(bytes: [UInt8]) {
        precondition(bytes.count == 16)
        self.bytes = bytes
    }

    public static func random() -> SnapshotID {
        var generator = SystemRandomNumberGenerator()
        return SnapshotID(bytes: (0 ..< 16).map { _ in UInt8.random(in: 0 ... 255, using: &generator) })
    }

    public static let none = SnapshotID(bytes: [UInt8](repeating: 0, count: 16))
    public var description: String { hex(bytes) }
}

/// The header: everything but the parts.
public struct SnapshotHeader: Sendable, Equatable {
    public var kind: SnapshotKind
    public var memoryFormat: SnapshotMemoryFormat
    public var id: SnapshotID
    public var parentID: SnapshotID
    /// The parent's `memoryDigest`: a diff applies only on top of exactly that memory.
    public var parentDigest: [UInt8]
    /// page_sum_128 (stream.md §7) of all guest memory as this snapshot restores it, parents included.
    public var memoryDigest: [UInt8]
    public var createdNanoseconds: UInt64
    public var frameCount: UInt64
    public var dataPages: UInt64
    public var zeroPages: UInt64
    /// Where the parent was when this snapshot was taken (a hint for finding it; id and digest decide).
    public var parentName: String
    public var parts: [Part]

    public func part(_ type: PartType) -> Part? { parts.first { $0.type == type } }

    /// The version this header is written as: the oldest that has every part it lists.
    public var version: UInt32 { part(.dictionary) == nil ? 1 : 2 }

    /// The 4096 header bytes, checksum included.
    func encoded() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: SnapshotFormat.headerLength)
        var field = FieldWriter()
        field.bytes(SnapshotFormat.magic)
        field.u32(version)
        field.u16(kind.rawValue)
        field.u16(memoryFormat.rawValue)
        field.u32(UInt32(SnapshotFormat.pageSize))
        field.u32(UInt32(parts.count))
        field.bytes(id.bytes)
        field.bytes(parentID.bytes)
        field.bytes(parentDigest)
        field.bytes(memoryDigest)
        field.u64(createdNanoseconds)
        field.u64(frameCount)
        field.u64(dataPages)
        field.u64(zeroPages)
        bytes.replaceSubrange(0 ..< field.bytes.count, with: field.bytes)
        let name = Array(parentName.utf8.prefix(SnapshotFormat.parentNameLength - 1))
        bytes.replaceSubrange(SnapshotFormat.parentNameOffset ..< SnapshotFormat.parentNameOffset + name.count, with: name)
        var table = FieldWriter()
        for part in parts {
            table.u32(part.type.rawValue)
            table.u32(0)
            table.u64(part.offset)
            table.u64(part.length)
            table.u32(part.checksum)
            table.u32(0)
        }
        bytes.replaceSubrange(SnapshotFormat.partTableOffset ..< SnapshotFormat.partTableOffset + table.bytes.count, with: table.bytes)
        let crc = crc32c(bytes[0 ..< SnapshotFormat.headerLength - 4])
        withUnsafeBytes(of: crc.littleEndian) { bytes.replaceSubrange(SnapshotFormat.headerLength - 4 ..< SnapshotFormat.headerLength, with: $0) }
        return bytes
    }

    /// Decodes and checks a header; `fileSize` bounds the parts.
    static func decode(_ bytes: [UInt8], fileSize: UInt64) throws(SnapshotError) -> SnapshotHeader {
        guard bytes.count == SnapshotFormat.headerLength else { throw .truncated("the header needs \(SnapshotFormat.headerLength) bytes, the file has \(bytes.count)") }
        guard Array(bytes[0 ..< 8]) == SnapshotFormat.magic else { throw .notASnapshot("bad magic \(hex(Array(bytes[0 ..< 8])))") }
        var field = FieldReader(bytes, part: "header")
        field.skip(8)
        let version = try field.u32()
        guard version >= 1, version <= SnapshotFormat.version else {
            throw .unsupported("version \(version); this build reads version 1 to \(SnapshotFormat.version)")
        }
        let stored = UInt32(littleEndian: bytes.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: SnapshotFormat.headerLength - 4, as: UInt32.self) })
        guard stored == crc32c(bytes[0 ..< SnapshotFormat.headerLength - 4]) else { throw .checksumMismatch(part: "header", detail: "header checksum") }
        let kindValue = try field.u16(), formatValue = try field.u16()
        guard let kind = SnapshotKind(rawValue: kindValue) else { throw .corrupt(part: "header", "unknown kind \(kindValue)") }
        guard let format = SnapshotMemoryFormat(rawValue: formatValue) else { throw .corrupt(part: "header", "unknown memory format \(formatValue)") }
        let pageSize = try field.u32()
        guard pageSize == SnapshotFormat.pageSize else { throw .unsupported("page size \(pageSize)") }
        let partCount = try field.u32()
        guard partCount <= SnapshotFormat.maximumParts else { throw .corrupt(part: "header", "\(partCount) parts (at most \(SnapshotFormat.maximumParts))") }
        var header = SnapshotHeader(
            kind: kind, memoryFormat: format, id: SnapshotID(bytes: try field.bytes(16)),
            parentID: SnapshotID(bytes: try field.bytes(16)), parentDigest: try field.bytes(16), memoryDigest: try field.bytes(16),
            createdNanoseconds: try field.u64(), frameCount: try field.u64(), dataPages: try field.u64(), zeroPages: try field.u64(),
            parentName: "", parts: [])
        let nameField = bytes[SnapshotFormat.parentNameOffset ..< SnapshotFormat.parentNameOffset + SnapshotFormat.parentNameLength]
        let nameBytes = nameField.prefix { $0 != 0 }
        header.parentName = String(decoding: nameBytes, as: UTF8.self)
        let tableEnd = SnapshotFormat.partTableOffset + Int(partCount) * SnapshotFormat.partEntryLength
        guard bytes[field.position ..< SnapshotFormat.parentNameOffset].allSatisfy({ $0 == 0 }),
              nameField.dropFirst(nameBytes.count).allSatisfy({ $0 == 0 }),
              bytes[tableEnd ..< SnapshotFormat.headerLength - 4].allSatisfy({ $0 == 0 }) else {
            throw .corrupt(part: "header", "reserved bytes are not zero")
        }
        guard header.frameCount > 0, header.frameCount <= SnapshotFormat.maximumFrames else {
            throw .corrupt(part: "header", "\(header.frameCount) frames (1 to \(SnapshotFormat.maximumFrames))")
        }
        guard header.dataPages + header.zeroPages <= header.frameCount else { throw .corrupt(part: "header", "more data and zero pages than frames") }
        guard (kind == .full) == (header.parentID == .none) else {
            throw .corrupt(part: "header", kind == .full ? "a full snapshot with a parent" : "a diff snapshot without a parent")
        }
        var table = FieldReader(Array(bytes[SnapshotFormat.partTableOffset...]), part: "part table")
        for _ in 0 ..< partCount {
            let typeValue = try table.u32()
            try table.reserved(4)
            let part = Part(type: try PartType(rawValue: typeValue).orThrow(.corrupt(part: "part table", "unknown part type \(typeValue)")),
                            offset: try table.u64(), length: try table.u64(), checksum: try table.u32())
            try table.reserved(4)
            guard header.part(part.type) == nil else { throw .corrupt(part: "part table", "two \(part.type) parts") }
            guard part.offset % UInt64(SnapshotFormat.pageSize) == 0, part.offset >= UInt64(SnapshotFormat.headerLength) else {
                throw .corrupt(part: "part table", "\(part.type) at offset \(part.offset), not after the header on a page boundary")
            }
            let (end, overflow) = part.offset.addingReportingOverflow(part.length)
            guard !overflow, end <= fileSize else {
                throw .truncated("the \(part.type) part ends at byte \(part.offset &+ part.length), the file has \(fileSize)")
            }
            header.parts.append(part)
        }
        let sorted = header.parts.sorted { $0.offset < $1.offset }
        for (a, b) in zip(sorted, sorted.dropFirst()) where a.offset + a.length > b.offset {
            throw .corrupt(part: "part table", "\(a.type) and \(b.type) overlap")
        }
        var required: [PartType] = [.layout, .pageMap, .pageChecksums, .memory, .devices]
        if format == .compressed { required.append(.blockIndex) }
        for type in required where header.part(type) == nil { throw .corrupt(part: "part table", "no \(type) part") }
        if let dictionary = header.part(.dictionary) {
            guard version >= 2, format == .compressed else {
                throw .corrupt(part: "part table", "a dictionary in a \(format) file of version \(version)")
            }
            guard dictionary.length >= 4, dictionary.length <= UInt64(SnapshotFormat.maximumDictionaryLength) else {
                throw .corrupt(part: "dictionary", "\(dictionary.length) bytes (4 to \(SnapshotFormat.maximumDictionaryLength))")
            }
        }
        return header
    }
}

extension Optional {
    func orThrow(_ error: SnapshotError) throws(SnapshotError) -> Wrapped {
        guard let self else { throw error }
        return self
    }
}

// MARK: small field codecs for the metadata parts

struct FieldWriter {
    var bytes: [UInt8] = []
    mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func bytes(_ b: [UInt8]) { bytes.append(contentsOf: b) }
    mutating func pad(to alignment: Int) { while bytes.count % alignment != 0 { bytes.append(0) } }
}

/// Reads little-endian fields, throwing instead of reading past the end.
struct FieldReader {
    private let data: [UInt8]
    private let part: String
    private(set) var position = 0

    init(_ data: [UInt8], part: String) { self.data = data; self.part = part }

    var remaining: Int { data.count - position }
    mutating func skip(_ n: Int) { position += n }

    /// Reserved bytes, which must be zero: a later version may give them a meaning, and must fail safe here.
    mutating func reserved(_ n: Int) throws(SnapshotError) {
        let at = position
        guard try bytes(n).allSatisfy({ $0 == 0 }) else { throw .corrupt(part: part, "reserved bytes at offset \(at) are not zero") }
    }

    mutating func bytes(_ n: Int) throws(SnapshotError) -> [UInt8] {
        guard n >= 0, n <= remaining else { throw .corrupt(part: part, "needs \(n) bytes at offset \(position), has \(max(remaining, 0))") }
        defer { position += n }
        return Array(data[position ..< position + n])
    }

    private mutating func integer<T: FixedWidthInteger>(_: T.Type) throws(SnapshotError) -> T {
        let size = MemoryLayout<T>.size
        guard size <= remaining else { throw .corrupt(part: part, "needs \(size) bytes at offset \(position), has \(max(remaining, 0))") }
        defer { position += size }
        return T(littleEndian: data.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: position, as: T.self) })
    }

    mutating func u16() throws(SnapshotError) -> UInt16 { try integer(UInt16.self) }
    mutating func u32() throws(SnapshotError) -> UInt32 { try integer(UInt32.self) }
    mutating func u64() throws(SnapshotError) -> UInt64 { try integer(UInt64.self) }
}

// MARK: metadata part bodies

enum LayoutPart {
    /// The body of the stream's MEMORY_LAYOUT record (stream.md §6.3).
    static func encode(_ layout: GuestMemoryLayout) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: layout.encodedLength)
        bytes.withUnsafeMutableBytes { buffer in
            var writer = ByteWriter(buffer)
            layout.encode(into: &writer)
        }
        return bytes
    }

    static func decode(_ bytes: [UInt8], frameCount: UInt64) throws(SnapshotError) -> GuestMemoryLayout {
        var field = FieldReader(bytes, part: "layout")
        let count = try field.u32()
        try field.reserved(4)
        guard count >= 1, Int(count) * 24 == field.remaining else { throw .corrupt(part: "layout", "\(count) regions in \(bytes.count) bytes") }
        var regions: [MemoryRegion] = []
        for _ in 0 ..< count {
            regions.append(MemoryRegion(guestPhysicalAddress: try field.u64(), size: try field.u64(), flags: RegionFlags(rawValue: try field.u32())))
            try field.reserved(4)
        }
        let layout = GuestMemoryLayout(regions: regions)
        if let bad = layout.firstInvalidRegion(pageSize: UInt32(SnapshotFormat.pageSize)) {
            throw .corrupt(part: "layout", "region \(bad) is not page aligned, sorted and disjoint")
        }
        guard layout.totalBytes / UInt64(SnapshotFormat.pageSize) == frameCount else {
            throw .corrupt(part: "layout", "regions hold \(layout.totalBytes / 4096) frames, the header says \(frameCount)")
        }
        return layout
    }
}

enum DevicesPart {
    static func encode(_ states: [DeviceState]) -> [UInt8] {
        var field = FieldWriter()
        field.u32(UInt32(states.count))
        field.u32(0)
        for state in states {
            field.u32(state.componentID)
            field.u32(state.instance)
            field.u32(state.componentVersion)
            field.u32(0)
            field.u64(UInt64(state.blob.count))
            field.bytes(state.blob.bytes)
            field.pad(to: 8)
        }
        return field.bytes
    }

    static func decode(_ bytes: [UInt8]) throws(SnapshotError) -> [DeviceState] {
        var field = FieldReader(bytes, part: "devices")
        let count = try field.u32()
        try field.reserved(4)
        // Each component takes at least 24 bytes, so the count is bounded by the part's (checked) length.
        guard Int(count) * 24 <= field.remaining else { throw .corrupt(part: "devices", "\(count) components in \(bytes.count) bytes") }
        var states: [DeviceState] = []
        for _ in 0 ..< count {
            let id = try field.u32(), instance = try field.u32(), version = try field.u32()
            try field.reserved(4)
            let length = try field.u64()
            guard length <= UInt64(field.remaining) else { throw .corrupt(part: "devices", "component of \(length) bytes, \(field.remaining) left") }
            let blob = try field.bytes(Int(length))
            try field.reserved((8 - Int(length) % 8) % 8)
            states.append(DeviceState(componentID: id, instance: instance, componentVersion: version, blob: ByteSlice(blob)))
        }
        return states
    }
}

/// One compressed block: where it lies in MEMORY, how it is encoded, and its CRC32C.
struct BlockEntry: Equatable {
    enum Encoding: UInt16 { case raw = 0, lz4 = 1, zstd = 2, zstdDictionary = 3 }
    var offset: UInt64
    var length: UInt32
    var encoding: Encoding
    var checksum: UInt32

    static let encodedLength = 24

    static func encode(_ entries: [BlockEntry]) -> [UInt8] {
        var field = FieldWriter()
        for entry in entries {
            field.u64(entry.offset)
            field.u32(entry.length)
            field.u16(entry.encoding.rawValue)
            field.u16(0)
            field.u32(entry.checksum)
            field.u32(0)
        }
        return field.bytes
    }

    static func decode(_ bytes: [UInt8], blocks: Int, memoryLength: UInt64) throws(SnapshotError) -> [BlockEntry] {
        guard bytes.count == blocks * encodedLength else {
            throw .corrupt(part: "block index", "\(bytes.count) bytes for \(blocks) blocks")
        }
        var field = FieldReader(bytes, part: "block index")
        var entries: [BlockEntry] = []
        entries.reserveCapacity(blocks)
        for index in 0 ..< blocks {
            let offset = try field.u64(), length = try field.u32(), encodingValue = try field.u16()
            try field.reserved(2)
            let checksum = try field.u32()
            try field.reserved(4)
            guard let encoding = Encoding(rawValue: encodingValue) else { throw .corrupt(part: "block index", "block \(index): unknown encoding \(encodingValue)") }
            guard offset + UInt64(length) <= memoryLength, length <= UInt32(SnapshotFormat.blockPages * SnapshotFormat.pageSize) else {
                throw .corrupt(part: "block index", "block \(index) (\(length) bytes at \(offset)) lies outside memory")
            }
            entries.append(BlockEntry(offset: offset, length: length, encoding: encoding, checksum: checksum))
        }
        return entries
    }
}

func crc32c<C: Collection>(_ bytes: C) -> UInt32 where C.Element == UInt8 {
    if let crc = bytes.withContiguousStorageIfAvailable({ FastCRC32C.update(0, UnsafeRawBufferPointer($0)) }) { return crc }
    return Array(bytes).withUnsafeBytes { FastCRC32C.update(0, $0) }
}

