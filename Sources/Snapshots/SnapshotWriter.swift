import Foundation
import Glibc
import LinuxSystem
import MigrationEngine
import MigrationWire
import PageCodec
import Synchronization
import Threads

/// What a diff snapshot is taken on top of: its parent's identity, and the hash of every page as the parent
/// left it, so that the diff's memory digest follows from the pages it stores without reading the rest.
///
/// Sendable: `unsaved` is Locked, and `pageHashes` is updated only by the one save that owns the base at a time
/// (SnapshotService runs one per VM).
public final class SnapshotBase: @unchecked Sendable {
    public let id: SnapshotID
    public let memoryDigest: [UInt8]
    /// Where the parent was written; kept in the diff as a hint for finding it.
    public let path: String
    public let layout: GuestMemoryLayout
    let pageHashes: DigestTracker
    /// Frames a failed diff save took from the dirty log; the next diff saves them too.
    let unsaved = Locked<Set<UInt64>>([])

    init(id: SnapshotID, memoryDigest: [UInt8], path: String, layout: GuestMemoryLayout, pageHashes: DigestTracker) {
        self.id = id
        self.memoryDigest = memoryDigest
        self.path = path
        self.layout = layout
        self.pageHashes = pageHashes
    }
}

extension SnapshotBase {
    /// The base of the next diff of a guest restored from `chain`, whose dirty tracking started before it ran:
    /// the chain's newest file, found from the files rather than remembered by whoever saved them (a daemon
    /// restarted since, another host). Reads and hashes every data page of the chain once, and checks the result
    /// against the digest the file records.
    public convenience init(restoredFrom chain: SnapshotChain) throws(SnapshotError) {
        let top = chain.top
        let pageHashes = DigestTracker(regions: top.layout.digestRegions)
        let reader = ChainReader(chain)
        let runPages = 256
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: runPages * SnapshotFormat.pageSize, alignment: 4096)
        defer { buffer.deallocate() }
        try chain.forEachDataRun(maximumPages: runPages) { (file, first, count) throws(SnapshotError) in
            try reader.read(file: file, firstIndex: first, count: count, into: buffer.baseAddress!)
            for k in 0 ..< count {
                let page = UnsafeRawBufferPointer(rebasing: buffer[k * SnapshotFormat.pageSize ..< (k + 1) * SnapshotFormat.pageSize])
                pageHashes.update(frame: top.frames.frame(at: first + k), page: page)
            }
        }
        guard pageHashes.digest == top.memoryDigest else {
            throw .digestMismatch(expected: "\(top.memoryDigest)", actual: "\(pageHashes.digest)")
        }
        self.init(id: top.header.id, memoryDigest: top.header.memoryDigest, path: top.path, layout: top.layout, pageHashes: pageHashes)
    }
}

/// Writes one snapshot file. Pages go to a temporary file beside the destination; `finish` adds the
/// metadata parts and the header, syncs, and renames the file into place, so the destination either does not
/// exist or holds a complete snapshot. `discard` (or a failure in `finish`) removes the temporary file.
///
/// Plain files take pages in any order, any number of times (a live save rewrites pages the guest dirtied
/// again). Compressed files take each page once, in frame order, and build blocks as they go.
public final class SnapshotWriter {
    public let path: String
    public let layout: GuestMemoryLayout
    public let kind: SnapshotKind
    public let memoryFormat: SnapshotMemoryFormat
    public let id: SnapshotID
    let frames: FrameIndex
    private let parent: (id: SnapshotID, digest: [UInt8], name: String)?
    private let temporaryPath: String
    private let file: OwnedFileDescriptor
    private var pageMap: [UInt8]
    /// CRC32C per frame while pages may still be rewritten; the file keeps those of data pages only.
    private var checksums: [UInt32]
    /// Page hashes for the memory digest; nil when the caller supplies the digest (converting a diff).
    private let pageHashes: DigestTracker?
    private let memoryOffset: UInt64
    private var finished = false
    // Compressed files only.
    private var batch: BlockBatch?
    private var blocks: [BlockEntry] = []
    private var memoryEnd: UInt64
    private var lastIndexWritten = -1
    private var bytesSinceWriteback = 0
    private let writeback = WritebackState()
    /// How long `finish` waited in fsync: a save's time to the page cache and its time to the disk differ.
    public private(set) var syncSeconds = 0.0

    public enum Compression: String, Sendable, Codable { case lz4, zstd }

    /// A new snapshot of a guest with `layout`. A diff needs `base` (the parent, with its page hashes) or,
    /// when converting an existing diff, `parent` and the digest given to `finish`.
    public init(path: String, layout: GuestMemoryLayout, kind: SnapshotKind, memoryFormat: SnapshotMemoryFormat = .plain,
                compression: Compression = .zstd, base: SnapshotBase? = nil,
                parent: (id: SnapshotID, digest: [UInt8], name: String)? = nil, id: SnapshotID = .random(),
                overwrite: Bool = false) throws(SnapshotError) {
        self.path = path
        self.id = id
        self.layout = layout
        self.kind = kind
        self.memoryFormat = memoryFormat
        frames = FrameIndex(layout: layout)
        guard frames.count > 0, UInt64(frames.count) <= SnapshotFormat.maximumFrames else {
            throw .unsupported("a guest of \(frames.count) pages")
        }
        if let base {
            guard base.layout == layout else { throw .chain("the parent's memory layout differs from the guest's") }
            self.parent = (base.id, base.memoryDigest, base.path)
            pageHashes = DigestTracker(copying: base.pageHashes)
        } else {
            self.parent = parent
            pageHashes = parent == nil ? DigestTracker(regions: layout.digestRegions) : nil
        }
        guard (kind == .diff) == (self.parent != nil) else {
            throw .chain(kind == .diff ? "a diff snapshot needs a parent" : "a full snapshot has no parent")
        }
        if !overwrite, FileManager.default.fileExists(atPath: path) {
            throw .io("\(path) exists; refusing to overwrite it")
        }
        let url = URL(fileURLWithPath: path)
        let temporary = url.deletingLastPathComponent().appendingPathComponent(".\(url.lastPathComponent).partial-\(getpid())-\(UInt32.random(in: 0 ... .max))").path
        temporaryPath = temporary
        file = try fileOperation("creating \(temporary)") {
            try OwnedFileDescriptor(opening: temporary, flags: O_RDWR | O_CREAT | O_EXCL, mode: 0o644)
        }
        pageMap = [UInt8](repeating: PageState.absent.rawValue, count: frames.count)
        checksums = [UInt32](repeating: 0, count: frames.count)
        let pageSize = UInt64(SnapshotFormat.pageSize)
        switch memoryFormat {
        case .plain:
            // Memory comes after room for the page map and checksums, so that every frame has its place.
            let metadata = UInt64(frames.count) * 5 + 2 * pageSize
            memoryOffset = UInt64(SnapshotFormat.headerLength) + alignUp(metadata, pageSize)
            memoryEnd = memoryOffset + UInt64(frames.count) * pageSize
        case .compressed:
            memoryOffset = UInt64(SnapshotFormat.headerLength)
            memoryEnd = memoryOffset
            do { batch = try BlockBatch(compression == .lz4 ? .lz4(acceleration: 1) : .zstd(level: 3)) } catch {
                discard()
                throw .io("compressor: \(error)")
            }
        }
    }

    deinit {
        if !finished { unlink(temporaryPath) }
    }

    /// Records `pages` (whole pages) as the contents of the frames at indices `firstIndex ...`. Zero pages
    /// are not stored: they are absent from a full snapshot and marked zero in a diff.
    public func write(pages: UnsafeRawBufferPointer, firstIndex: Int) throws(SnapshotError) {
        let count = pages.count / SnapshotFormat.pageSize
        precondition(count * SnapshotFormat.pageSize == pages.count && firstIndex >= 0 && firstIndex + count <= frames.count)
        var runStart: Int?
        for k in 0 ... count {
            var isData = false
            if k < count {
                let index = firstIndex + k
                let page = UnsafeRawBufferPointer(rebasing: pages[k * SnapshotFormat.pageSize ..< (k + 1) * SnapshotFormat.pageSize])
                isData = record(page, at: index)
                if memoryFormat == .compressed { try appendCompressed(page, at: index, isData: isData) }
            }
            // Plain files store each run of data pages with one write, at the run's fixed place.
            if memoryFormat == .plain {
                if isData, runStart == nil { runStart = k }
                if !isData, let start = runStart {
                    let run = UnsafeRawBufferPointer(rebasing: pages[start * SnapshotFormat.pageSize ..< k * SnapshotFormat.pageSize])
                    try fileOperation("writing \(temporaryPath)") {
                        try file.write(all: run, at: Int64(memoryOffset) + Int64(firstIndex + start) * Int64(SnapshotFormat.pageSize))
                    }
                    wrote(run.count)
                    runStart = nil
                }
            }
        }
    }

    /// Records that the frame at `index` is zero (a diff keeps this; in a full snapshot it is the default).
    public func writeZero(at index: Int) throws(SnapshotError) {
        precondition(index >= 0 && index < frames.count)
        pageMap[index] = (kind == .full ? PageState.absent : PageState.zero).rawValue
        checksums[index] = 0
        pageHashes?.updateZero(frame: frames.frame(at: index))
        if memoryFormat == .compressed { try checkOrder(index) }
    }

    /// Updates the page map, checksum and digest for one page; returns whether it holds data.
    private func record(_ page: UnsafeRawBufferPointer, at index: Int) -> Bool {
        let frame = frames.frame(at: index)
        if ZeroPage.isZero(page) {
            pageMap[index] = (kind == .full ? PageState.absent : PageState.zero).rawValue
            checksums[index] = 0
            pageHashes?.updateZero(frame: frame)
            return false
        }
        pageMap[index] = PageState.data.rawValue
        checksums[index] = FastCRC32C.update(0, page)
        pageHashes?.update(frame: frame, page: page)
        return true
    }

    private func checkOrder(_ index: Int) throws(SnapshotError) {
        guard index > lastIndexWritten else {
            throw .unsupported("a compressed snapshot takes each page once, in order (page \(index) after \(lastIndexWritten))")
        }
        lastIndexWritten = index
    }

    private func appendCompressed(_ page: UnsafeRawBufferPointer, at index: Int, isData: Bool) throws(SnapshotError) {
        try checkOrder(index)
        guard isData, let batch else { return }
        batch.append(page)
        if batch.isFull { try flushBlocks() }
    }

    /// Compresses the gathered pages and appends their blocks to MEMORY.
    private func flushBlocks() throws(SnapshotError) {
        try batch?.flush { (block) throws(SnapshotError) in
            try fileOperation("writing \(temporaryPath)") { try file.write(all: block.bytes, at: Int64(memoryEnd)) }
            blocks.append(BlockEntry(offset: memoryEnd - memoryOffset, length: UInt32(block.bytes.count), encoding: block.encoding,
                                     checksum: FastCRC32C.update(0, block.bytes)))
            memoryEnd += UInt64(block.bytes.count)
            wrote(block.bytes.count)
        }
    }

    /// Starts writeback every 64 MiB, so that the disk works while pages are still being written and the
    /// final fsync has little left to do. It is started from a thread of its own: sync_file_range blocks
    /// while the disk's queue is full, and the writer may be working for a paused guest.
    private func wrote(_ bytes: Int) {
        bytesSinceWriteback += bytes
        guard bytesSinceWriteback >= 64 << 20, !writeback.pending.exchange(true, ordering: .acquiringAndReleasing) else { return }
        bytesSinceWriteback = 0
        let (file, writeback) = (self.file, self.writeback)
        DispatchQueue.global(qos: .utility).async {
            try? file.startWriteback()
            writeback.pending.store(false, ordering: .releasing)
        }
    }

    /// Writes the metadata and the header, syncs the file and moves it into place; returns its header.
    /// `memoryDigest` is needed only when the writer has no page hashes (a diff written without its base).
    @discardableResult
    public func finish(deviceState: [DeviceState], memoryDigest: [UInt8]? = nil) throws(SnapshotError) -> SnapshotHeader {
        precondition(!finished, "finish called twice")
        do {
            let header = try writeMetadata(deviceState: deviceState, memoryDigest: memoryDigest)
            let syncStart = monotonicSeconds()
            try fileOperation("syncing \(temporaryPath)") { try file.sync() }
            syncSeconds = monotonicSeconds() - syncStart
            try fileOperation("renaming \(temporaryPath) to \(path)") {
                _ = try systemCall("rename") { rename(temporaryPath, path) }
            }
            finished = true
            syncDirectory(of: path)
            return header
        } catch {
            discard()
            throw error
        }
    }

    private func writeMetadata(deviceState: [DeviceState], memoryDigest: [UInt8]?) throws(SnapshotError) -> SnapshotHeader {
        let pageSize = UInt64(SnapshotFormat.pageSize)
        var parts: [Part] = []
        var next: UInt64
        func put(_ type: PartType, _ bytes: [UInt8], at offset: UInt64) throws(SnapshotError) {
            try fileOperation("writing \(temporaryPath)") { try bytes.withUnsafeBytes { try file.write(all: $0, at: Int64(offset)) } }
            parts.append(Part(type: type, offset: offset, length: UInt64(bytes.count), checksum: crc32c(bytes)))
        }
        // One checksum per data page, in frame order; little-endian hosts only (x86-64).
        let checksumBytes = zip(pageMap, checksums).filter { $0.0 == PageState.data.rawValue }.map(\.1).withUnsafeBytes { Array($0) }
        switch memoryFormat {
        case .plain:
            // The places reserved in front of memory: page map, then checksums.
            next = UInt64(SnapshotFormat.headerLength)
            try put(.pageMap, pageMap, at: next)
            next = alignUp(next + UInt64(pageMap.count), pageSize)
            try put(.pageChecksums, checksumBytes, at: next)
            parts.append(Part(type: .memory, offset: memoryOffset, length: UInt64(frames.count) * pageSize, checksum: 0))
            next = memoryEnd
        case .compressed:
            try flushBlocks()
            parts.append(Part(type: .memory, offset: memoryOffset, length: memoryEnd - memoryOffset, checksum: 0))
            next = alignUp(memoryEnd, pageSize)
            try put(.pageMap, pageMap, at: next)
            next = alignUp(next + UInt64(pageMap.count), pageSize)
            try put(.pageChecksums, checksumBytes, at: next)
            next = alignUp(next + UInt64(checksumBytes.count), pageSize)
            let index = BlockEntry.encode(blocks)
            try put(.blockIndex, index, at: next)
            next += UInt64(index.count)
        }
        next = alignUp(next, pageSize)
        let layoutBytes = LayoutPart.encode(layout)
        try put(.layout, layoutBytes, at: next)
        next = alignUp(next + UInt64(layoutBytes.count), pageSize)
        let devices = DevicesPart.encode(deviceState)
        try put(.devices, devices, at: next)
        // The file's length covers the last part even when memory ends in a hole.
        try fileOperation("sizing \(temporaryPath)") { try file.truncate(to: Int64(next + UInt64(devices.count))) }

        guard let digest = pageHashes?.digest.bytes ?? memoryDigest else { preconditionFailure("a diff written without its base needs its digest") }
        let header = SnapshotHeader(
            kind: kind, memoryFormat: memoryFormat, id: id, parentID: parent?.id ?? .none,
            parentDigest: parent?.digest ?? [UInt8](repeating: 0, count: 16), memoryDigest: digest,
            createdNanoseconds: UInt64(Date().timeIntervalSince1970 * 1e9), frameCount: UInt64(frames.count),
            dataPages: UInt64(pageMap.lazy.filter { $0 == PageState.data.rawValue }.count),
            zeroPages: UInt64(pageMap.lazy.filter { $0 == PageState.zero.rawValue }.count),
            parentName: parent?.name ?? "", parts: parts)
        try fileOperation("writing \(temporaryPath)") { try header.encoded().withUnsafeBytes { try file.write(all: $0, at: 0) } }
        return header
    }

    /// What a diff of this snapshot needs; valid after `finish`.
    public func base(header: SnapshotHeader) -> SnapshotBase? {
        guard let pageHashes else { return nil }
        return SnapshotBase(id: header.id, memoryDigest: header.memoryDigest, path: path, layout: layout, pageHashes: pageHashes)
    }

    /// Removes the temporary file; the destination is left as it was.
    public func discard() {
        if !finished { unlink(temporaryPath) }
        finished = true
    }
}

func alignUp(_ value: UInt64, _ alignment: UInt64) -> UInt64 { (value + alignment - 1) / alignment * alignment }

/// Makes a rename durable: the directory entry is synced too. Failure here is not worth failing a snapshot
/// that is already complete and in place.
private func syncDirectory(of path: String) {
    let directory = URL(fileURLWithPath: path).deletingLastPathComponent().path
    let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    guard fd >= 0 else { return }
    fsync(fd)
    close(fd)
}

/// Whether a writeback request of a writer is under way (one at a time is enough).
private final class WritebackState: Sendable {
    let pending = Atomic<Bool>(false)
}
