import CPageCodec

/// The 128-bit hash of one guest page, keyed by its frame number (stream.md §7).
/// The hash of an all-zero page is defined to be zero, whatever its frame: memory nobody
/// wrote contributes nothing, and neither side has to visit it.
public struct PageHash: Hashable, Sendable {
    public var low: UInt64
    public var high: UInt64
    public init(low: UInt64, high: UInt64) { self.low = low; self.high = high }

    public static let zero = PageHash(low: 0, high: 0)

    /// Hashes `page` (whose length must be a multiple of 64) as frame `frame`.
    public static func of(frame: UInt64, page: UnsafeRawBufferPointer) -> PageHash {
        if ZeroPage.isZero(page) { return .zero }
        var out: (UInt64, UInt64) = (0, 0)
        withUnsafeMutableBytes(of: &out) { o in
            cpc_page_hash(page.baseAddress!, page.count, frame, o.baseAddress!.assumingMemoryBound(to: UInt64.self))
        }
        return PageHash(low: out.0, high: out.1)
    }
}

/// A digest of all guest memory: the sum, modulo 2^64 in each half, of the hashes of all
/// pages. Sums do not depend on order, so pages may be added in any order, on any channel;
/// a page sent again replaces its old hash by subtracting it. Both ends keep one, and compare
/// them at switchover (the end record carries the sender's).
public struct MemoryDigest: Hashable, Sendable, CustomStringConvertible {
    public var low: UInt64 = 0
    public var high: UInt64 = 0
    public init() {}

    public mutating func add(_ h: PageHash) { low &+= h.low; high &+= h.high }
    public mutating func remove(_ h: PageHash) { low &-= h.low; high &-= h.high }
    public mutating func replace(_ old: PageHash, with new: PageHash) { remove(old); add(new) }

    /// 16 bytes, little-endian: low half then high half (the end record's digest field).
    public var bytes: [UInt8] {
        withUnsafeBytes(of: (low.littleEndian, high.littleEndian)) { Array($0) }
    }

    public var description: String {
        String(high, radix: 16).leftPadded(16) + String(low, radix: 16).leftPadded(16)
    }
}

extension String {
    fileprivate func leftPadded(_ n: Int) -> String { String(repeating: "0", count: max(0, n - count)) + self }
}

/// Keeps the memory digest up to date as pages are sent (source) or written (destination):
/// it remembers each page's last hash (16 bytes per page of guest memory), so a page sent
/// again replaces its old contribution without reading the old contents.
public final class DigestTracker {
    public struct Region: Hashable, Sendable {
        public var firstFrame: UInt64
        public var frameCount: Int
        public init(firstFrame: UInt64, frameCount: Int) { self.firstFrame = firstFrame; self.frameCount = frameCount }
    }

    public let regions: [Region]
    public private(set) var digest = MemoryDigest()
    private var hashes: [PageHash]
    private var startIndex: [Int]

    /// `regions` sorted by frame and non-overlapping (as in a validated memory layout).
    /// All pages start as zero pages, whose hash is zero.
    public init(regions: [Region]) {
        self.regions = regions
        var starts: [Int] = []
        var total = 0
        for r in regions { starts.append(total); total += r.frameCount }
        startIndex = starts
        hashes = [PageHash](repeating: .zero, count: total)
    }

    /// A tracker that starts where `other` stands and then goes its own way.
    public init(copying other: DigestTracker) {
        regions = other.regions
        digest = other.digest
        hashes = other.hashes
        startIndex = other.startIndex
    }

    public var frameCount: Int { hashes.count }

    private func index(of frame: UInt64) -> Int? {
        var lo = 0, hi = regions.count
        while lo < hi {
            let mid = (lo + hi) / 2
            let r = regions[mid]
            if frame < r.firstFrame { hi = mid }
            else if frame - r.firstFrame >= UInt64(r.frameCount) { lo = mid + 1 }
            else { return startIndex[mid] + Int(frame - r.firstFrame) }
        }
        return nil
    }

    /// Records that `frame` now holds `page`. Returns false if the frame is in no region.
    @discardableResult
    public func update(frame: UInt64, page: UnsafeRawBufferPointer) -> Bool {
        update(frame: frame, hash: PageHash.of(frame: frame, page: page))
    }

    /// Records a hash computed elsewhere (e.g. on a compression thread).
    @discardableResult
    public func update(frame: UInt64, hash: PageHash) -> Bool {
        guard let i = index(of: frame) else { return false }
        digest.replace(hashes[i], with: hash)
        hashes[i] = hash
        return true
    }

    /// Records that `frame` is now a zero page.
    @discardableResult
    public func updateZero(frame: UInt64) -> Bool { update(frame: frame, hash: .zero) }

    /// Records that `count` frames from `first`, all in one region, are now zero pages (or hold nothing yet). Returns
    /// false, changing nothing, if they are not all in one region.
    @discardableResult
    public func updateZero(frames first: UInt64, count: Int) -> Bool {
        guard count > 0 else { return true }
        guard let start = index(of: first), let last = index(of: first + UInt64(count - 1)), last == start + count - 1 else { return false }
        for i in start ... last {
            digest.remove(hashes[i])
            hashes[i] = .zero
        }
        return true
    }

    /// Visits every frame whose recorded hash is not zero (a page held, not a zero page), in ascending order.
    public func forEachHeld(_ visit: (UInt64, PageHash) throws -> Void) rethrows {
        try forEachHeldRun { first, run in
            for (k, hash) in run.enumerated() { try visit(first + UInt64(k), hash) }
        }
    }

    /// Visits the runs of consecutive frames of one region whose recorded hashes are not zero, in ascending order:
    /// the first frame, and the hashes (valid during the call only).
    public func forEachHeldRun(_ visit: (UInt64, UnsafeBufferPointer<PageHash>) throws -> Void) rethrows {
        try hashes.withUnsafeBufferPointer { all in
            for (r, region) in regions.enumerated() {
                let start = startIndex[r]
                var k = 0
                // Fields compared, not hashes: this loop visits every frame of memory.
                func held(_ i: Int) -> Bool { all[start + i].low | all[start + i].high != 0 }
                while k < region.frameCount {
                    guard held(k) else { k += 1; continue }
                    var end = k + 1
                    while end < region.frameCount && held(end) { end += 1 }
                    try visit(region.firstFrame + UInt64(k), UnsafeBufferPointer(rebasing: all[start + k ..< start + end]))
                    k = end
                }
            }
        }
    }

    /// Records the hashes of `run.count` frames from `first`, all in one region, at once. Returns false, changing
    /// nothing, if they are not all in one region.
    @discardableResult
    public func update(first: UInt64, hashes run: UnsafeBufferPointer<PageHash>) -> Bool {
        guard !run.isEmpty else { return true }
        guard let start = index(of: first), let last = index(of: first + UInt64(run.count - 1)), last == start + run.count - 1 else { return false }
        for (k, hash) in run.enumerated() {
            digest.replace(hashes[start + k], with: hash)
            hashes[start + k] = hash
        }
        return true
    }

    /// Forgets every page, as if none had been recorded: the digest is zero again.
    public func reset() {
        hashes = [PageHash](repeating: .zero, count: hashes.count)
        digest = MemoryDigest()
    }

    /// The last recorded hash of `frame`.
    public func hash(of frame: UInt64) -> PageHash? { index(of: frame).map { hashes[$0] } }

    /// Digest of a whole memory image, computed from scratch (for checks and tests).
    public static func fullDigest(regions: [Region], pageSize: Int,
                                  page: (UInt64) -> UnsafeRawBufferPointer) -> MemoryDigest {
        var d = MemoryDigest()
        for r in regions {
            for k in 0 ..< UInt64(r.frameCount) {
                let frame = r.firstFrame + k
                let p = page(frame)
                precondition(p.count == pageSize)
                d.add(PageHash.of(frame: frame, page: p))
            }
        }
        return d
    }
}
