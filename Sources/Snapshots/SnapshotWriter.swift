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
/// again), from several threads at once. Compressed files build blocks as the pages come in frame order; a
/// page that comes again, or out of order, waits in a side file until `finish` patches it into its block.
///
/// Sendable: only so that several threads can call `write` on a plain file for different frames; that path
/// touches the page map, checksums, page hashes and writeback count under `shared` only, and writes to
/// disjoint places of the file. Every other method is called by one thread at a time, with no write under way.
public final class SnapshotWriter: @unchecked Sendable {
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
    /// The frame index of each data page written so far, in order: data page `n` is page `n % 64` of block `n / 64`.
    private var dataIndices: [Int] = []
    private var decompressors: [BlockEntry.Encoding: BlockCompressor] = [:]
    private let compression: Compression
    /// What zstd blocks are compressed against (`useDictionary`); the file keeps it in DICTIONARY.
    private var dictionary: [UInt8]?
    /// Pages written again, waiting for `finish` (`stage`).
    private var staged: OwnedFileDescriptor?
    private var stagedIndices: Set<Int> = []
    private var memoryEnd: UInt64
    private var lastIndexWritten = -1
    private var bytesSinceWriteback = 0
    private let writeback = WritebackState()
    /// Guards `pageMap`, `checksums`, `pageHashes` and `bytesSinceWriteback` while plain writes run on several threads.
    private let shared = Locked(())
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
        self.compression = compression
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
    /// are not stored: they are absent from a full snapshot and marked zero in a diff. Plain files take calls
    /// from several threads at once, for different frames.
    public func write(pages: UnsafeRawBufferPointer, firstIndex: Int) throws(SnapshotError) {
        let count = pages.count / SnapshotFormat.pageSize
        precondition(count * SnapshotFormat.pageSize == pages.count && firstIndex >= 0 && firstIndex + count <= frames.count)
        switch memoryFormat {
        case .plain: try writePlain(pages, firstIndex: firstIndex, count: count)
        case .compressed:
            for k in 0 ..< count {
                let page = UnsafeRawBufferPointer(rebasing: pages[k * SnapshotFormat.pageSize ..< (k + 1) * SnapshotFormat.pageSize])
                guard firstIndex + k > lastIndexWritten else {
                    try stage(page, at: firstIndex + k)
                    continue
                }
                let summary = summarize(page, at: firstIndex + k)
                shared.withLock { _ in record(summary, at: firstIndex + k) }
                try appendCompressed(page, at: firstIndex + k, isData: summary.isData)
            }
        }
    }

    /// Compressed files: a page written again (a live save's later passes), or out of order, waits in a side
    /// file at its frame's place until `finish` builds again the blocks that hold such pages (`rewrite`).
    private func stage(_ page: UnsafeRawBufferPointer, at index: Int) throws(SnapshotError) {
        if staged == nil {
            staged = try fileOperation("creating a side file beside \(temporaryPath)") {
                // Without a name (O_TMPFILE), it goes when it is closed, whatever happens. A file system without
                // O_TMPFILE gets a named file, unlinked at once.
                let directory = URL(fileURLWithPath: temporaryPath).deletingLastPathComponent().path
                if let nameless = try? OwnedFileDescriptor(opening: directory, flags: O_RDWR | Self.temporaryFile, mode: 0o600) { return nameless }
                let named = try OwnedFileDescriptor(opening: temporaryPath + ".side", flags: O_RDWR | O_CREAT | O_EXCL, mode: 0o600)
                unlink(temporaryPath + ".side")
                return named
            }
        }
        try fileOperation("writing a side file beside \(temporaryPath)") {
            try staged!.write(all: page, at: Int64(index) * Int64(SnapshotFormat.pageSize))
        }
        stagedIndices.insert(index)
    }

    /// O_TMPFILE (which includes O_DIRECTORY), which Glibc's headers here do not name.
    private static let temporaryFile: Int32 = 0o20_200_000

    /// Builds again the blocks that hold staged pages; the side file goes.
    private func mergeStaged() throws(SnapshotError) {
        guard let staged else { return }
        defer { self.staged = nil }
        let indices = stagedIndices.sorted()
        stagedIndices = []
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: SnapshotFormat.pageSize, alignment: 4096)
        defer { buffer.deallocate() }
        try rewrite(indices: indices) { (k) throws(SnapshotError) in
            try fileOperation("reading a side file beside \(temporaryPath)") {
                try staged.read(all: buffer, at: Int64(indices[k]) * Int64(SnapshotFormat.pageSize))
            }
            return UnsafeRawBufferPointer(buffer)
        }
    }

    /// Plain files: allocates the file's blocks for the frames at `indices` (sorted) before their pages are
    /// written, one call per stretch of consecutive frames, so that the writes, which ext4 serialises on the
    /// file's lock, do not each reserve space for delayed allocation on the way. Best effort: a file system
    /// that cannot allocate ahead allocates as it writes.
    public func allocate(indices: [Int]) {
        guard memoryFormat == .plain, !indices.isEmpty else { return }
        let pageSize = Int64(SnapshotFormat.pageSize)
        var start = 0
        for k in 1 ... indices.count where k == indices.count || indices[k] != indices[k - 1] + 1 {
            try? file.allocate(at: Int64(memoryOffset) + Int64(indices[start]) * pageSize, length: Int64(k - start) * pageSize)
            start = k
        }
    }

    /// Checks and hashes the pages with no lock held, stores each run of data pages with one write at its fixed
    /// place (the places of different frames are disjoint), then records the pages under `shared`: the checks,
    /// which are most of the work besides the copy into the page cache, run on every writing thread at once.
    private func writePlain(_ pages: UnsafeRawBufferPointer, firstIndex: Int, count: Int) throws(SnapshotError) {
        let pageSize = SnapshotFormat.pageSize
        let summaries = (0 ..< count).map { k in
            summarize(UnsafeRawBufferPointer(rebasing: pages[k * pageSize ..< (k + 1) * pageSize]), at: firstIndex + k)
        }
        var runStart: Int?
        var written = 0
        for k in 0 ... count {
            let isData = k < count && summaries[k].isData
            if isData, runStart == nil { runStart = k }
            if !isData, let start = runStart {
                let run = UnsafeRawBufferPointer(rebasing: pages[start * pageSize ..< k * pageSize])
                try fileOperation("writing \(temporaryPath)") {
                    try file.write(all: run, at: Int64(memoryOffset) + Int64(firstIndex + start) * Int64(pageSize))
                }
                written += run.count
                runStart = nil
            }
        }
        let startWriteback = shared.withLock { _ in
            for (k, summary) in summaries.enumerated() { record(summary, at: firstIndex + k) }
            return wrote(written)
        }
        if startWriteback { self.startWriteback() }
    }

    /// Records that the frame at `index` is zero (a diff keeps this; in a full snapshot it is the default).
    public func writeZero(at index: Int) throws(SnapshotError) {
        precondition(index >= 0 && index < frames.count)
        shared.withLock { _ in record(PageSummary(isData: false, checksum: 0, hash: .zero), at: index) }
        if memoryFormat == .compressed { try checkOrder(index) }
    }

    /// What the page map, checksums and digest need to know of one page; computed without a lock.
    private struct PageSummary {
        var isData: Bool
        var checksum: UInt32
        var hash: PageHash
    }

    private func summarize(_ page: UnsafeRawBufferPointer, at index: Int) -> PageSummary {
        if ZeroPage.isZero(page) { return PageSummary(isData: false, checksum: 0, hash: .zero) }
        return PageSummary(isData: true, checksum: FastCRC32C.update(0, page),
                           hash: pageHashes == nil ? .zero : PageHash.of(frame: frames.frame(at: index), page: page))
    }

    /// Updates the page map, checksum and digest for one page; called holding `shared`.
    private func record(_ summary: PageSummary, at index: Int) {
        let frame = frames.frame(at: index)
        if !summary.isData {
            pageMap[index] = (kind == .full ? PageState.absent : PageState.zero).rawValue
            checksums[index] = 0
            pageHashes?.updateZero(frame: frame)
            return
        }
        pageMap[index] = PageState.data.rawValue
        checksums[index] = summary.checksum
        pageHashes?.update(frame: frame, hash: summary.hash)
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
        dataIndices.append(index)
        batch.append(page)
        if batch.isFull { try flushBlocks() }
    }

    /// Compressed zstd files: compresses every block against `bytes` (see `BlockDictionary`), which the file
    /// keeps; called before the first page is written. Makes the file version 2. Other files ignore it.
    public func useDictionary(_ bytes: [UInt8]) throws(SnapshotError) {
        guard memoryFormat == .compressed, compression == .zstd, let batch else { return }
        precondition(blocks.isEmpty && batch.pages == 0 && dictionary == nil, "a dictionary comes before the first page")
        // Level 1: against a dictionary of the same guest's pages, the fast match finder finds most of what level
        // 3 finds, at nearly twice the speed (`zstd -b1 -e3 -B262144 -D` on the benchmark guest's pages: ratio 65
        // at 2.3 GB/s against 79 at 1.3 GB/s).
        do { self.batch = try BlockBatch(.zstd(level: 1), dictionary: bytes) } catch { throw .io("compressor: \(error)") }
        dictionary = bytes
    }

    /// Compresses the gathered pages and appends their blocks to MEMORY and to BLOCK_INDEX.
    private func flushBlocks() throws(SnapshotError) { blocks += try flushBatch() }

    /// Compresses the gathered pages and appends their blocks to MEMORY; returns their entries.
    private func flushBatch() throws(SnapshotError) -> [BlockEntry] {
        var entries: [BlockEntry] = []
        try batch?.flush { (block) throws(SnapshotError) in
            try fileOperation("writing \(temporaryPath)") { try file.write(all: block.bytes, at: Int64(memoryEnd)) }
            entries.append(BlockEntry(offset: memoryEnd - memoryOffset, length: UInt32(block.bytes.count), encoding: block.encoding,
                                      checksum: FastCRC32C.update(0, block.bytes)))
            memoryEnd += UInt64(block.bytes.count)
            if wrote(block.bytes.count) { startWriteback() }
        }
        return entries
    }

    /// Compressed files: `page(k)` is the new content of the frame at `indices[k]` (sorted, no repeats), which
    /// the file may or may not hold already; the pointer it returns need only last until the next call. Each
    /// block holding one of them is read back, patched, compressed and appended to MEMORY again, and BLOCK_INDEX
    /// points at the new copy (the old one stays behind, unused, as protocol/snapshot.md §5 allows). A page that
    /// becomes data where there was none moves every data page after it to a later place, so the blocks from its
    /// block on are cut again; a data page that became zero stays a data page, of zeros, so that nothing moves.
    private func rewrite(indices: [Int], page: (Int) throws(SnapshotError) -> UnsafeRawBufferPointer) throws(SnapshotError) {
        let pageSize = SnapshotFormat.pageSize
        precondition(memoryFormat == .compressed)
        guard !indices.isEmpty, let batch else { return }
        try flushBlocks() // the first pass's last pages
        var summaries: [PageSummary] = []
        var changed: [Int: Int] = [:] // frame index -> position in `indices`
        var inserted: [Int] = []
        var touchedBlocks: [Int] = []
        for (k, index) in indices.enumerated() {
            precondition(index >= 0 && index < frames.count && (k == 0 || indices[k - 1] < index))
            var summary = summarize(try page(k), at: index)
            if let ordinal = ordinal(of: index) {
                if !summary.isData { summary = PageSummary(isData: true, checksum: Self.zeroPageChecksum, hash: .zero) }
                if touchedBlocks.last != ordinal / SnapshotFormat.blockPages { touchedBlocks.append(ordinal / SnapshotFormat.blockPages) }
            } else if summary.isData {
                inserted.append(index)
            }
            summaries.append(summary)
            changed[index] = k
        }
        // Blocks from `cut` on are cut again; those before it are patched in place.
        let cut = inserted.first.map { firstOrdinal(atOrAfter: $0) / SnapshotFormat.blockPages } ?? blocks.count
        let oldBlocks = blocks
        let oldData = dataIndices
        let scratch = BlockScratch()
        func oldPage(ordinal: Int) throws(SnapshotError) -> UnsafeRawBufferPointer {
            let block = ordinal / SnapshotFormat.blockPages
            let pages = try readBack(block: block, of: oldBlocks, dataPages: oldData.count, scratch: scratch)
            let offset = (ordinal % SnapshotFormat.blockPages) * pageSize
            return UnsafeRawBufferPointer(rebasing: pages[offset ..< offset + pageSize])
        }
        // In place: each block before the cut that holds a changed page, in order, whole blocks into the batch.
        var targets: [Int] = []
        var placed: [BlockEntry] = []
        for block in touchedBlocks where block < cut {
            let first = block * SnapshotFormat.blockPages
            for ordinal in first ..< min(first + SnapshotFormat.blockPages, oldData.count) {
                if let k = changed[oldData[ordinal]] { batch.append(try page(k)) } else { batch.append(try oldPage(ordinal: ordinal)) }
            }
            targets.append(block)
            if batch.isFull { placed += try flushBatch() }
        }
        placed += try flushBatch()
        for (block, entry) in zip(targets, placed) { blocks[block] = entry }
        // From the cut: the old data pages and the new ones, merged in frame order, cut into blocks again.
        if cut < oldBlocks.count || !inserted.isEmpty {
            var tail: [Int] = []
            var old = cut * SnapshotFormat.blockPages
            var new = 0
            var rebuilt: [BlockEntry] = []
            while old < oldData.count || new < inserted.count {
                let takeNew = old == oldData.count || (new < inserted.count && inserted[new] < oldData[old])
                let index = takeNew ? inserted[new] : oldData[old]
                if let k = changed[index] { batch.append(try page(k)) } else { batch.append(try oldPage(ordinal: old)) }
                tail.append(index)
                if takeNew { new += 1 } else { old += 1 }
                if batch.isFull { rebuilt += try flushBatch() }
            }
            rebuilt += try flushBatch()
            blocks = Array(blocks[..<cut]) + rebuilt
            dataIndices = Array(dataIndices[..<(cut * SnapshotFormat.blockPages)]) + tail
        }
        shared.withLock { _ in
            for (k, summary) in summaries.enumerated() { record(summary, at: indices[k]) }
        }
    }

    /// Reads back and decompresses block `block` of `entries` (a file of `dataPages` data pages), unless it is the
    /// one `scratch` holds already; returns its pages.
    private func readBack(block: Int, of entries: [BlockEntry], dataPages: Int, scratch: BlockScratch) throws(SnapshotError) -> UnsafeRawBufferPointer {
        let count = min(SnapshotFormat.blockPages, dataPages - block * SnapshotFormat.blockPages)
        let output = UnsafeMutableRawBufferPointer(rebasing: scratch.pages[0 ..< count * SnapshotFormat.pageSize])
        if scratch.block != block {
            let entry = entries[block]
            let stored = UnsafeMutableRawBufferPointer(rebasing: scratch.stored[0 ..< Int(entry.length)])
            try fileOperation("reading back \(temporaryPath)") { try file.read(all: stored, at: Int64(memoryOffset + entry.offset)) }
            scratch.block = nil
            try entry.decode(UnsafeRawBufferPointer(stored), into: output, decompressors: &decompressors, dictionary: dictionary,
                              name: "memory block \(block) of \(temporaryPath)")
            scratch.block = block
        }
        return UnsafeRawBufferPointer(output)
    }

    /// The data page `ordinal` of frame index `index`, if the file holds one.
    private func ordinal(of index: Int) -> Int? {
        let low = firstOrdinal(atOrAfter: index)
        return low < dataIndices.count && dataIndices[low] == index ? low : nil
    }

    private func firstOrdinal(atOrAfter index: Int) -> Int {
        var low = 0, high = dataIndices.count
        while low < high {
            let middle = (low + high) / 2
            if dataIndices[middle] < index { low = middle + 1 } else { high = middle }
        }
        return low
    }

    private static let zeroPageChecksum = [UInt8](repeating: 0, count: SnapshotFormat.pageSize).withUnsafeBytes { FastCRC32C.update(0, $0) }

    /// Starts writeback every 64 MiB, so that the disk works while pages are still being written and the
    /// final fsync has little left to do. It is started from a thread of its own: sync_file_range blocks
    /// while the disk's queue is full, and the writer may be working for a paused guest. Returns whether to
    /// start it now; called holding `shared`.
    private func wrote(_ bytes: Int) -> Bool {
        bytesSinceWriteback += bytes
        guard bytesSinceWriteback >= 64 << 20, !writeback.pending.exchange(true, ordering: .acquiringAndReleasing) else { return false }
        bytesSinceWriteback = 0
        return true
    }

    private func startWriteback() {
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
        if memoryFormat == .compressed {
            try flushBlocks()
            try mergeStaged()
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
            parts.append(Part(type: .memory, offset: memoryOffset, length: memoryEnd - memoryOffset, checksum: 0))
            next = alignUp(memoryEnd, pageSize)
            try put(.pageMap, pageMap, at: next)
            next = alignUp(next + UInt64(pageMap.count), pageSize)
            try put(.pageChecksums, checksumBytes, at: next)
            next = alignUp(next + UInt64(checksumBytes.count), pageSize)
            let index = BlockEntry.encode(blocks)
            try put(.blockIndex, index, at: next)
            next += UInt64(index.count)
            if let dictionary {
                next = alignUp(next, pageSize)
                try put(.dictionary, dictionary, at: next)
                next += UInt64(dictionary.count)
            }
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

/// One block's worth of buffers for reading blocks back, and which block they hold.
private final class BlockScratch {
    let stored = UnsafeMutableRawBufferPointer.allocate(byteCount: BlockBatch.blockBytes, alignment: 64)
    let pages = UnsafeMutableRawBufferPointer.allocate(byteCount: BlockBatch.blockBytes, alignment: 4096)
    var block: Int?

    deinit {
        stored.deallocate()
        pages.deallocate()
    }
}

/// Whether a writeback request of a writer is under way (one at a time is enough).
private final class WritebackState: Sendable {
    let pending = Atomic<Bool>(false)
}
