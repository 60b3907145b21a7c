import Foundation
import MigrationEngine

/// A full snapshot and the diffs on top of it, opened and checked link by link: each diff's parent must have
/// the id and the memory digest the diff records, and the same memory layout.
public final class SnapshotChain: Sendable {
    /// Base (full) first, the snapshot that was asked for last.
    public let files: [SnapshotFile]
    /// For each frame index, the position in `files` of the newest file that stores the page as data, or
    /// `Self.zero` when the page is zero in the chain's memory.
    public let owner: [UInt8]
    public static let zero: UInt8 = 0xFF
    /// How many pages of the chain's memory hold data.
    public let dataPages: Int

    public var top: SnapshotFile { files.last! }
    public var base: SnapshotFile { files.first! }

    public init(files: [SnapshotFile]) throws(SnapshotError) {
        precondition(!files.isEmpty)
        guard files.count <= SnapshotFormat.maximumChainLength else { throw .chain("more than \(SnapshotFormat.maximumChainLength) snapshots") }
        guard files[0].header.kind == .full else { throw .chain("\(files[0].path) is a diff, and its parent was not found") }
        for (parent, child) in zip(files, files.dropFirst()) {
            try Self.checkLink(parent: parent, child: child)
        }
        self.files = files
        var owner = [UInt8](repeating: Self.zero, count: files[0].frames.count)
        for (position, file) in files.enumerated() {
            for (index, state) in file.pageMap.enumerated() {
                switch PageState(rawValue: state)! {
                case .data: owner[index] = UInt8(position)
                case .zero: owner[index] = Self.zero
                case .absent: break
                }
            }
        }
        self.owner = owner
        dataPages = owner.lazy.filter { $0 != Self.zero }.count
    }

    /// Opens `path` and its parents. Parents are taken from `parents` (nearest first) when given, else found
    /// through each diff's parent hint: the path it was saved with, or a file of that name beside the diff.
    public static func open(_ path: String, parents: [String] = []) throws(SnapshotError) -> SnapshotChain {
        var chain = [try SnapshotFile(path: path)]
        var explicit = parents[...]
        while chain[0].header.kind == .diff {
            guard chain.count < SnapshotFormat.maximumChainLength else { throw .chain("more than \(SnapshotFormat.maximumChainLength) snapshots") }
            let child = chain[0]
            let candidate: String
            if let next = explicit.popFirst() {
                candidate = next
            } else if let found = locateParent(of: child) {
                candidate = found
            } else {
                throw .chain("the parent of \(child.path) (id \(child.header.parentID), saved as \"\(child.header.parentName)\") was not found")
            }
            let parent = try SnapshotFile(path: candidate)
            try checkLink(parent: parent, child: child)
            chain.insert(parent, at: 0)
        }
        return try SnapshotChain(files: chain)
    }

    private static func locateParent(of child: SnapshotFile) -> String? {
        let hint = child.header.parentName
        guard !hint.isEmpty else { return nil }
        let directory = URL(fileURLWithPath: child.path).deletingLastPathComponent()
        let candidates = [
            hint.hasPrefix("/") ? hint : directory.appendingPathComponent(hint).path,
            directory.appendingPathComponent(URL(fileURLWithPath: hint).lastPathComponent).path,
        ]
        return candidates.first { FileManager.default.fileExists(atPath: $0) }
    }

    static func checkLink(parent: SnapshotFile, child: SnapshotFile) throws(SnapshotError) {
        guard child.header.kind == .diff else { throw .chain("\(child.path) is a full snapshot, not a diff of \(parent.path)") }
        guard parent.header.id == child.header.parentID else {
            throw .chain("\(child.path) was taken on top of snapshot \(child.header.parentID), but \(parent.path) is snapshot \(parent.header.id)")
        }
        guard parent.header.memoryDigest == child.header.parentDigest else {
            throw .chain("\(parent.path) has id \(parent.header.id) but memory digest \(hex(parent.header.memoryDigest)), not the \(hex(child.header.parentDigest)) that \(child.path) was taken on")
        }
        guard parent.layout == child.layout else { throw .chain("\(parent.path) and \(child.path) have different memory layouts") }
    }


}

extension SnapshotChain {
    /// Calls `visit(file, firstIndex, count)` for each run of consecutive data pages that one file of the chain
    /// supplies, at most `maximumPages` long and never crossing a region boundary (so that the run is
    /// contiguous in a guest's host memory too).
    public func forEachDataRun(maximumPages: Int, _ visit: (Int, Int, Int) throws(SnapshotError) -> Void) throws(SnapshotError) {
        let frames = files[0].frames
        for region in frames.runs {
            var index = region.firstIndex
            let end = region.firstIndex + region.count
            while index < end {
                let file = owner[index]
                guard file != Self.zero else { index += 1; continue }
                var length = 1
                while index + length < end, length < maximumPages, owner[index + length] == file { length += 1 }
                try visit(Int(file), index, length)
                index += length
            }
        }
    }
}

/// Reads checked pages of a chain's memory: each from the newest file that holds it. One per thread.
public final class ChainReader {
    public let chain: SnapshotChain
    private let readers: [PageReader]

    public init(_ chain: SnapshotChain) {
        self.chain = chain
        readers = chain.files.map { PageReader($0) }
    }

    /// Reads `count` consecutive data pages from `firstIndex` that file `file` of the chain supplies.
    public func read(file: Int, firstIndex: Int, count: Int, into destination: UnsafeMutableRawPointer) throws(SnapshotError) {
        let reader = readers[file]
        if reader.snapshot.header.memoryFormat == .plain {
            try reader.readPlain(firstIndex: firstIndex, count: count, into: destination)
        } else {
            for k in 0 ..< count {
                try reader.readPage(index: firstIndex + k, into: destination + k * SnapshotFormat.pageSize)
            }
        }
    }

    /// The page at frame index `index` as the chain restores it, into `destination`; returns false (and
    /// leaves `destination` alone) for a zero page.
    public func readPage(index: Int, into destination: UnsafeMutableRawPointer) throws(SnapshotError) -> Bool {
        let file = chain.owner[index]
        guard file != SnapshotChain.zero else { return false }
        try read(file: Int(file), firstIndex: index, count: 1, into: destination)
        return true
    }
}
