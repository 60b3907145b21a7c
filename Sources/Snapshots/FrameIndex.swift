import MigrationWire

/// Numbers the frames of a memory layout 0, 1, 2, ... across its regions, in order: the index of a frame in
/// PAGE_MAP, PAGE_CHECKSUMS and the plain MEMORY part.
public struct FrameIndex: Sendable {
    public struct Run: Sendable {
        public var firstFrame: UInt64
        public var firstIndex: Int
        public var count: Int
    }

    public let runs: [Run]
    public let count: Int

    public init(layout: GuestMemoryLayout) {
        var runs: [Run] = []
        var total = 0
        for region in layout.regions {
            let frames = Int(region.size >> 12)
            runs.append(Run(firstFrame: region.guestPhysicalAddress >> 12, firstIndex: total, count: frames))
            total += frames
        }
        self.runs = runs
        count = total
    }

    /// The index of guest frame `frame`, or nil when no region holds it.
    public func index(of frame: UInt64) -> Int? {
        for run in runs where frame >= run.firstFrame && frame - run.firstFrame < UInt64(run.count) {
            return run.firstIndex + Int(frame - run.firstFrame)
        }
        return nil
    }

    /// The guest frame at index `index` (which must be below `count`).
    public func frame(at index: Int) -> UInt64 {
        let run = runs.last { $0.firstIndex <= index }!
        return run.firstFrame + UInt64(index - run.firstIndex)
    }
}
