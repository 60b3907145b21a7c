import Foundation
import Glibc
import LinuxSystem
import MigrationEngine
import MigrationWire
import PageCodec

/// An open snapshot file whose header and metadata parts have been read and checked: magic, version,
/// header checksum, part bounds against the file's size, and the CRC32C of every part but MEMORY. Memory
/// pages are checked as they are read (`PageReader`), or all at once by `SnapshotVerifier`.
public final class SnapshotFile: Sendable {
    public let path: String
    public let header: SnapshotHeader
    public let layout: GuestMemoryLayout
    public let frames: FrameIndex
    public let pageMap: [UInt8]
    /// CRC32C of each data page, in data-page order (see `dataIndices`).
    public let checksums: [UInt32]
    public let deviceState: [DeviceState]
    /// Frame indices of the data pages, in order (a data page's ordinal is its position here).
    public let dataIndices: [Int]
    let blocks: [BlockEntry]
    /// What zstd blocks of encoding 3 are compressed against (version 2).
    let dictionary: [UInt8]?
    let memory: Part
    let file: OwnedFileDescriptor
    public let fileSize: UInt64

    public init(path: String) throws(SnapshotError) {
        let file = try fileOperation("opening \(path)") { try OwnedFileDescriptor(opening: path, flags: O_RDONLY) }
        let fileSize = UInt64(try fileOperation("reading \(path)") { try file.size() })
        guard fileSize >= UInt64(SnapshotFormat.headerLength) else {
            if fileSize >= 8, let magic = try? Self.read(file, at: 0, count: 8, path: path), magic != SnapshotFormat.magic {
                throw .notASnapshot("bad magic \(hex(magic))")
            }
            throw .truncated("\(fileSize) bytes, shorter than the \(SnapshotFormat.headerLength)-byte header")
        }
        let header = try SnapshotHeader.decode(try Self.read(file, at: 0, count: SnapshotFormat.headerLength, path: path), fileSize: fileSize)
        let frameCount = Int(header.frameCount)
        func checkedPart(_ type: PartType) throws(SnapshotError) -> [UInt8] {
            let part = header.part(type)!
            // Metadata parts are small next to memory: bounded by the frame count, which is bounded itself.
            guard part.length <= UInt64(frameCount) * 24 + (1 << 20) else { throw .corrupt(part: "\(type)", "\(part.length) bytes for \(frameCount) frames") }
            let bytes = try Self.read(file, at: part.offset, count: Int(part.length), path: path)
            guard crc32c(bytes) == part.checksum else { throw .checksumMismatch(part: "\(type)", detail: "CRC32C of \(part.length) bytes at offset \(part.offset)") }
            return bytes
        }
        let layout = try LayoutPart.decode(try checkedPart(.layout), frameCount: header.frameCount)
        let pageMap = try checkedPart(.pageMap)
        guard pageMap.count == frameCount else { throw .corrupt(part: "page map", "\(pageMap.count) entries for \(frameCount) frames") }
        var data: [Int] = []
        data.reserveCapacity(Int(header.dataPages))
        var zero = 0
        for (index, state) in pageMap.enumerated() {
            switch PageState(rawValue: state) {
            case .data: data.append(index)
            case .zero: zero += 1
            case .absent: break
            case nil: throw .corrupt(part: "page map", "frame index \(index) has state \(state)")
            }
        }
        guard data.count == header.dataPages, zero == header.zeroPages else {
            throw .corrupt(part: "page map", "\(data.count) data and \(zero) zero pages, the header says \(header.dataPages) and \(header.zeroPages)")
        }
        let checksumBytes = try checkedPart(.pageChecksums)
        guard checksumBytes.count == data.count * 4 else { throw .corrupt(part: "page checksums", "\(checksumBytes.count) bytes for \(data.count) data pages") }
        let memory = header.part(.memory)!
        switch header.memoryFormat {
        case .plain:
            guard memory.length == header.frameCount * UInt64(SnapshotFormat.pageSize) else {
                throw .corrupt(part: "memory", "\(memory.length) bytes for \(frameCount) frames")
            }
            blocks = []
        case .compressed:
            let count = (data.count + SnapshotFormat.blockPages - 1) / SnapshotFormat.blockPages
            let entries = try BlockEntry.decode(try checkedPart(.blockIndex), blocks: count, memoryLength: memory.length)
            if header.part(.dictionary) == nil, let block = entries.firstIndex(where: { $0.encoding == .zstdDictionary }) {
                throw .corrupt(part: "block index", "block \(block) needs a dictionary, and the file has none")
            }
            blocks = entries
        }
        dictionary = header.part(.dictionary) == nil ? nil : try checkedPart(.dictionary)
        deviceState = try DevicesPart.decode(try checkedPart(.devices))
        checksums = checksumBytes.withUnsafeBytes { raw in (0 ..< data.count).map { UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: $0 * 4, as: UInt32.self)) } }
        self.path = path
        self.file = file
        self.fileSize = fileSize
        self.header = header
        self.layout = layout
        self.pageMap = pageMap
        self.memory = memory
        frames = FrameIndex(layout: layout)
        dataIndices = data
    }

    private static func read(_ file: OwnedFileDescriptor, at offset: UInt64, count: Int, path: String) throws(SnapshotError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try fileOperation("reading \(count) bytes at \(offset) of \(path)") {
            try bytes.withUnsafeMutableBytes { try file.read(all: $0, at: Int64(offset)) }
        }
        return bytes
    }

    public var memoryDigest: MemoryDigest { MemoryDigest(bytes: header.memoryDigest) }

    /// A digest field as `vmsnap` and the logs show it (high half first, as `MemoryDigest` prints).
    public static func digestText(_ bytes: [UInt8]) -> String { "\(MemoryDigest(bytes: bytes))" }

    public func state(at index: Int) -> PageState { PageState(rawValue: pageMap[index])! }

    /// The block holding data page ordinal `ordinal` (compressed files).
    func block(ofOrdinal ordinal: Int) -> Int { ordinal / SnapshotFormat.blockPages }

    /// The ordinal of the data page at frame index `index`, by binary search over `dataIndices`.
    func ordinal(ofIndex index: Int) -> Int? {
        let low = firstOrdinal(atOrAfter: index)
        return low < dataIndices.count && dataIndices[low] == index ? low : nil
    }

    /// The ordinal of the first data page at frame index `index` or later.
    func firstOrdinal(atOrAfter index: Int) -> Int {
        var low = 0, high = dataIndices.count
        while low < high {
            let middle = (low + high) / 2
            if dataIndices[middle] < index { low = middle + 1 } else { high = middle }
        }
        return low
    }

    /// The CRC32C of the data page at frame index `index`, or nil when this file holds no data for it.
    public func checksum(ofIndex index: Int) -> UInt32? { ordinal(ofIndex: index).map { checksums[$0] } }

    /// Names a page in errors the way an operator can look it up: guest-physical address and frame index.
    func pageName(_ index: Int) -> String {
        "memory page at guest address 0x\(String(frames.frame(at: index) << 12, radix: 16)) (frame index \(index)) of \(path)"
    }
}

extension MemoryDigest {
    init(bytes: [UInt8]) {
        self.init()
        bytes.withUnsafeBytes { raw in
            low = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
            high = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        }
    }
}

/// Reads checked memory pages out of one snapshot file. One per thread: it owns buffers and a decompressor.
public final class PageReader {
    public let snapshot: SnapshotFile
    private let blockBuffer: UnsafeMutableRawBufferPointer
    private let compressedBuffer: UnsafeMutableRawBufferPointer
    private var decompressors: [BlockEntry.Encoding: BlockCompressor] = [:]
    /// The block now in `blockBuffer`, so that neighbouring pages cost one decompression.
    private var cachedBlock: Int?

    public init(_ snapshot: SnapshotFile) {
        self.snapshot = snapshot
        let blockBytes = SnapshotFormat.blockPages * SnapshotFormat.pageSize
        blockBuffer = .allocate(byteCount: blockBytes, alignment: 4096)
        compressedBuffer = .allocate(byteCount: blockBytes, alignment: 64)
    }

    deinit {
        blockBuffer.deallocate()
        compressedBuffer.deallocate()
    }

    /// Reads `count` consecutive frames from index `firstIndex` of a plain file into `destination`, and checks
    /// the data pages among them. Pages that are not data in this file are left as read (holes read as zero).
    public func readPlain(firstIndex: Int, count: Int, into destination: UnsafeMutableRawPointer) throws(SnapshotError) {
        precondition(snapshot.header.memoryFormat == .plain)
        let pageSize = SnapshotFormat.pageSize
        try fileOperation("reading \(snapshot.path)") {
            try snapshot.file.read(all: UnsafeMutableRawBufferPointer(start: destination, count: count * pageSize),
                                   at: Int64(snapshot.memory.offset) + Int64(firstIndex) * Int64(pageSize))
        }
        var ordinal = snapshot.firstOrdinal(atOrAfter: firstIndex)
        for k in 0 ..< count where snapshot.pageMap[firstIndex + k] == PageState.data.rawValue {
            try check(UnsafeRawBufferPointer(start: destination + k * pageSize, count: pageSize), index: firstIndex + k, ordinal: ordinal)
            ordinal += 1
        }
    }

    /// Decompresses and checks block `block` of a compressed file; returns its pages, in data-page order.
    public func readBlock(_ block: Int) throws(SnapshotError) -> UnsafeRawBufferPointer {
        let pageSize = SnapshotFormat.pageSize
        let first = block * SnapshotFormat.blockPages
        let count = min(SnapshotFormat.blockPages, snapshot.dataIndices.count - first)
        let output = UnsafeMutableRawBufferPointer(rebasing: blockBuffer[0 ..< count * pageSize])
        if cachedBlock == block { return UnsafeRawBufferPointer(output) }
        cachedBlock = nil
        let entry = snapshot.blocks[block]
        let stored = UnsafeMutableRawBufferPointer(rebasing: compressedBuffer[0 ..< Int(entry.length)])
        try fileOperation("reading \(snapshot.path)") { try snapshot.file.read(all: stored, at: Int64(snapshot.memory.offset + entry.offset)) }
        try entry.decode(UnsafeRawBufferPointer(stored), into: output, decompressors: &decompressors, dictionary: snapshot.dictionary,
                         name: "memory block \(block) of \(snapshot.path)")
        for k in 0 ..< count {
            try check(UnsafeRawBufferPointer(rebasing: output[k * pageSize ..< (k + 1) * pageSize]), index: snapshot.dataIndices[first + k], ordinal: first + k)
        }
        cachedBlock = block
        return UnsafeRawBufferPointer(output)
    }

    /// Copies the data page at frame index `index` into `destination`, checked.
    public func readPage(index: Int, into destination: UnsafeMutableRawPointer) throws(SnapshotError) {
        switch snapshot.header.memoryFormat {
        case .plain:
            try readPlain(firstIndex: index, count: 1, into: destination)
        case .compressed:
            guard let ordinal = snapshot.ordinal(ofIndex: index) else { preconditionFailure("frame index \(index) holds no data") }
            let pages = try readBlock(snapshot.block(ofOrdinal: ordinal))
            let offset = (ordinal % SnapshotFormat.blockPages) * SnapshotFormat.pageSize
            destination.copyMemory(from: pages.baseAddress! + offset, byteCount: SnapshotFormat.pageSize)
        }
    }

    /// Checks the page at frame index `index`, data page number `ordinal`, against its CRC32C.
    private func check(_ page: UnsafeRawBufferPointer, index: Int, ordinal: Int) throws(SnapshotError) {
        let actual = FastCRC32C.update(0, page)
        guard actual == snapshot.checksums[ordinal] else {
            throw .checksumMismatch(part: snapshot.pageName(index), detail: String(format: "CRC32C %08x, expected %08x", actual, snapshot.checksums[ordinal]))
        }
    }
}

extension PageReader {
    /// Calls `visit(index, page)` for every data page of this file, in frame order, each checked.
    public func forEachDataPage(_ visit: (Int, UnsafeRawBufferPointer) throws(SnapshotError) -> Void) throws(SnapshotError) {
        let pageSize = SnapshotFormat.pageSize
        let indices = snapshot.dataIndices
        switch snapshot.header.memoryFormat {
        case .plain:
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: SnapshotRestore.runPages * pageSize, alignment: 4096)
            defer { buffer.deallocate() }
            var position = 0
            while position < indices.count {
                var count = 1
                while position + count < indices.count, count < SnapshotRestore.runPages, indices[position + count] == indices[position] + count { count += 1 }
                try readPlain(firstIndex: indices[position], count: count, into: buffer.baseAddress!)
                for k in 0 ..< count { try visit(indices[position + k], UnsafeRawBufferPointer(rebasing: buffer[k * pageSize ..< (k + 1) * pageSize])) }
                position += count
            }
        case .compressed:
            for block in 0 ..< snapshot.blocks.count {
                let pages = try readBlock(block)
                let first = block * SnapshotFormat.blockPages
                for k in 0 ..< pages.count / pageSize {
                    try visit(indices[first + k], UnsafeRawBufferPointer(rebasing: pages[k * pageSize ..< (k + 1) * pageSize]))
                }
            }
        }
    }
}
