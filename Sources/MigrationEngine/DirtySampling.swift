import Foundation

/// What a running guest dirtied in windows of growing length, measured without migrating it.
public struct DirtySample: Sendable, Codable, Equatable {
    /// Each window, from the start of the sample, and the distinct pages dirtied in it.
    public var windows: [DirtyCurve.Point]
    /// The mean time of one harvest of the dirty log, which each pre-copy pass also pays.
    public var harvestSeconds: Double
    /// The time starting dirty tracking took, which a migration's setup also pays (it grows with the guest's memory).
    public var startSeconds: Double

    public init(windows: [DirtyCurve.Point], harvestSeconds: Double, startSeconds: Double) {
        self.windows = windows
        self.harvestSeconds = harvestSeconds
        self.startSeconds = startSeconds
    }
}

extension GuestSource {
    /// Samples the dirty log of the running guest for `seconds`: tracking on (then `armed` is called), a harvest at
    /// 1/8, 1/4, 1/2 and all of the time, tracking off. The pages of a window are those of every harvest up to its end, each counted once, so
    /// the windows show where the guest's writes start to fall on pages written already. The guest is never paused;
    /// tracking is off again however this returns. Only one user of the dirty log at a time: not during a migration
    /// or a diff snapshot of the same guest.
    ///
    /// Built from the seam's tracking calls, so every source has it: KVM, Xen, the C ABI's VMM sources.
    public func sampleDirtyPages(for seconds: Double, armed: () -> Void) throws -> DirtySample {
        let starting = monotonicSeconds()
        try startDirtyTracking()
        defer { try? stopDirtyTracking() }
        let startSeconds = monotonicSeconds() - starting
        // A harvest right away: the window starts once tracking is armed, whatever the source reports at first.
        try harvestDirtyFrames { _ in }
        armed()
        let start = monotonicSeconds()
        var seen = Set<UInt64>()
        var windows: [DirtyCurve.Point] = []
        var harvestTime = 0.0
        for fraction in [0.125, 0.25, 0.5, 1] {
            let wait = start + seconds * fraction - monotonicSeconds()
            if wait > 0 { Thread.sleep(forTimeInterval: wait) }
            let harvestStart = monotonicSeconds()
            try harvestDirtyFrames { seen.insert($0) }
            let end = monotonicSeconds()
            harvestTime += end - harvestStart
            // The window ends when the harvest began: what came during the harvest is in the next one.
            windows.append(DirtyCurve.Point(seconds: harvestStart - start, pages: Double(seen.count)))
        }
        return DirtySample(windows: windows, harvestSeconds: harvestTime / Double(windows.count), startSeconds: startSeconds)
    }
}
