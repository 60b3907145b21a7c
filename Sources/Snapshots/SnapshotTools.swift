import Foundation
import MigrationEngine
import MigrationWire
import PageCodec

/// What `SnapshotVerifier` checked in one file.
public struct VerifiedFile: Sendable, Codable, Equatable {
    public var path: String
    public var id: String
    public var kind: String
    public var dataPages: Int
    public var memoryDigest: String
}

/// Checks a chain completely: every part's checksum (on opening), every page's CRC32C, and each file's memory
/// digest, recomputed from its pages on top of its parents'. The first failure names the file and the part.
public enum SnapshotVerifier {
    public static func verify(_ chain: SnapshotChain, progress: ((_ done: Int, _ total: Int) -> Void)? = nil) throws(SnapshotError) -> [VerifiedFile] {
        let total = chain.files.reduce(0) { $0 + $1.dataIndices.count }
        var done = 0
        let tracker = DigestTracker(regions: chain.base.frames.runs.map { DigestTracker.Region(firstFrame: $0.firstFrame, frameCount: $0.count) })
        var verified: [VerifiedFile] = []
        for file in chain.files {
            let frames = file.frames
            for (index, state) in file.pageMap.enumerated() where state == PageState.zero.rawValue {
                tracker.updateZero(frame: frames.frame(at: index))
            }
            try PageReader(file).forEachDataPage { (index, page) throws(SnapshotError) in
                tracker.update(frame: frames.frame(at: index), page: page)
                done += 1
                if done % 4096 == 0 { progress?(done, total) }
            }
            guard tracker.digest == file.memoryDigest else {
                throw .digestMismatch(expected: "\(file.memoryDigest) (recorded in \(file.path))", actual: "\(tracker.digest)")
            }
            verified.append(VerifiedFile(path: file.path, id: "\(file.header.id)", kind: "\(file.header.kind)",
                                         dataPages: file.dataIndices.count, memoryDigest: "\(file.memoryDigest)"))
        }
        progress?(done, total)
        return verified
    }
}

/// Rewrites snapshots: one file into the other memory format, or a chain into one full snapshot.
public enum SnapshotConvert {
    /// Writes `source` (one file, full or diff) in `memoryFormat`. The result is the same snapshot, with the
    /// same id, parent and digest, so diffs taken on top of the source apply on top of it too.
    @discardableResult
    public static func convert(_ source: String, to destination: String, memoryFormat: SnapshotMemoryFormat,
                               compression: SnapshotWriter.Compression = .zstd, overwrite: Bool = false,
                               progress: ((Int, Int) -> Void)? = nil) throws(SnapshotError) -> SnapshotHeader {
        let file = try SnapshotFile(path: source)
        let header = file.header
        let writer = try SnapshotWriter(
            path: destination, layout: file.layout, kind: header.kind, memoryFormat: memoryFormat, compression: compression,
            parent: header.kind == .diff ? (header.parentID, header.parentDigest, header.parentName) : nil, id: header.id, overwrite: overwrite)
        do throws(SnapshotError) {
            var done = 0
            let reader = PageReader(file)
            let sampled = UnsafeMutableRawBufferPointer.allocate(byteCount: SnapshotFormat.pageSize, alignment: 4096)
            defer { sampled.deallocate() }
            if let dictionary = try BlockDictionary.sample(count: file.dataIndices.count, page: { (k) throws(SnapshotError) in
                try reader.readPage(index: file.dataIndices[k], into: sampled.baseAddress!)
                return UnsafeRawBufferPointer(sampled)
            }) {
                try writer.useDictionary(dictionary)
            }
            var zeros = file.pageMap.enumerated().lazy.filter { $0.element == PageState.zero.rawValue }.map(\.offset).makeIterator()
            var nextZero = zeros.next()
            try reader.forEachDataPage { (index, page) throws(SnapshotError) in
                // Zero marks go in frame order between the data pages (a compressed writer needs that order).
                while let zero = nextZero, zero < index { try writer.writeZero(at: zero); nextZero = zeros.next() }
                try writer.write(pages: page, firstIndex: index)
                done += 1
                if done % 4096 == 0 { progress?(done, file.dataIndices.count) }
            }
            while let zero = nextZero { try writer.writeZero(at: zero); nextZero = zeros.next() }
            let written = try writer.finish(deviceState: file.deviceState, memoryDigest: header.memoryDigest)
            guard written.memoryDigest == header.memoryDigest else {
                throw SnapshotError.digestMismatch(expected: hex(header.memoryDigest), actual: hex(written.memoryDigest))
            }
            return written
        } catch {
            writer.discard()
            throw error
        }
    }

    /// Collapses `chain` into one full snapshot of the same memory and device state. It keeps the id and
    /// digest of the chain's top, so a diff taken on top of that snapshot applies on top of the merge too.
    @discardableResult
    public static func merge(_ chain: SnapshotChain, to destination: String, memoryFormat: SnapshotMemoryFormat = .plain,
                             compression: SnapshotWriter.Compression = .zstd, overwrite: Bool = false,
                             progress: ((Int, Int) -> Void)? = nil) throws(SnapshotError) -> SnapshotHeader {
        let top = chain.top
        let writer = try SnapshotWriter(path: destination, layout: top.layout, kind: .full, memoryFormat: memoryFormat,
                                        compression: compression, id: top.header.id, overwrite: overwrite)
        do throws(SnapshotError) {
            let reader = ChainReader(chain)
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: SnapshotRestore.runPages * SnapshotFormat.pageSize, alignment: 4096)
            defer { buffer.deallocate() }
            let total = chain.dataPages
            var done = 0
            try chain.forEachDataRun(maximumPages: SnapshotRestore.runPages) { (file, first, count) throws(SnapshotError) in
                try reader.read(file: file, firstIndex: first, count: count, into: buffer.baseAddress!)
                try writer.write(pages: UnsafeRawBufferPointer(rebasing: buffer[0 ..< count * SnapshotFormat.pageSize]), firstIndex: first)
                done += count
                progress?(done, total)
            }
            let written = try writer.finish(deviceState: top.deviceState)
            guard written.memoryDigest == top.header.memoryDigest else {
                throw SnapshotError.digestMismatch(expected: hex(top.header.memoryDigest), actual: hex(written.memoryDigest))
            }
            return written
        } catch {
            writer.discard()
            throw error
        }
    }
}

/// Which pages differ between the memory of two snapshots (each with its chain).
public enum SnapshotCompare {
    /// A run of consecutive differing frames.
    public struct Difference: Sendable, Codable, Equatable {
        public var guestPhysicalAddress: UInt64
        public var pages: Int
    }

    public static func differences(_ a: SnapshotChain, _ b: SnapshotChain) throws(SnapshotError) -> [Difference] {
        guard a.top.layout == b.top.layout else { throw .unsupported("the snapshots have different memory layouts") }
        let readerA = ChainReader(a), readerB = ChainReader(b)
        let pageA = UnsafeMutableRawPointer.allocate(byteCount: SnapshotFormat.pageSize, alignment: 4096)
        let pageB = UnsafeMutableRawPointer.allocate(byteCount: SnapshotFormat.pageSize, alignment: 4096)
        defer { pageA.deallocate(); pageB.deallocate() }
        let frames = a.top.frames
        var differences: [Difference] = []
        for index in 0 ..< frames.count {
            let ownerA = a.owner[index], ownerB = b.owner[index]
            var differs: Bool
            switch (ownerA == SnapshotChain.zero, ownerB == SnapshotChain.zero) {
            case (true, true): differs = false
            case (true, false), (false, true): differs = true // data pages are never zero
            case (false, false):
                // Different checksums settle it without reading; equal ones are confirmed byte by byte.
                differs = a.files[Int(ownerA)].checksum(ofIndex: index) != b.files[Int(ownerB)].checksum(ofIndex: index)
                if !differs {
                    _ = try readerA.readPage(index: index, into: pageA)
                    _ = try readerB.readPage(index: index, into: pageB)
                    differs = memcmp(pageA, pageB, SnapshotFormat.pageSize) != 0
                }
            }
            guard differs else { continue }
            let address = frames.frame(at: index) << 12
            if let last = differences.last, last.guestPhysicalAddress + UInt64(last.pages) * 4096 == address {
                differences[differences.count - 1].pages += 1
            } else {
                differences.append(Difference(guestPhysicalAddress: address, pages: 1))
            }
        }
        return differences
    }
}
