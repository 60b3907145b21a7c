import PageCodec
import MigrationWire

/// How a migration runs; set per migration.
public struct MigrationOptions: Sendable, Codable, Equatable {
    public enum Compression: String, Sendable, Codable, Equatable {
        case none, lz4, zstd, adaptive
    }

    /// Parallel channels; pages are partitioned among them so that a page's versions always share one.
    public var channels: Int = 1
    public var compression: Compression = .lz4
    /// zstd level (negative levels trade ratio for speed).
    public var zstdLevel: Int32 = 1
    /// The longest pause of the guest the switchover may cause, in seconds.
    public var downtimeLimit: Double = 0.3
    /// Bytes per second on the wire over all channels; nil for no cap.
    public var bandwidthLimit: Double?
    /// Give up after this many pre-copy passes, or after this many seconds, when the guest has not converged.
    public var maxPasses: Int = 30
    public var timeLimit: Double = 300
    /// Seconds the sender waits, after commit, for the receiver's `started`. Starting is spawning vCPU threads, so
    /// a longer wait means a destination that hangs or vanished; the source then stays paused, in doubt.
    public var startedTimeout: Double = 30
    /// Throttle the guest step by step when it dirties memory faster than the link can carry it.
    public var autoConverge: Bool = true
    public var throttleInitial: Double = 0.2
    public var throttleIncrement: Double = 0.1
    public var throttleMaximum: Double = 0.99
    /// Pages per batch record.
    public var batchPages: Int = 256
    /// Offer to send pages of later passes that the receiver already holds as they are as `unchanged` descriptors
    /// (stream.md §6.4.1). It costs a copy of every page sent (the hash must be of the bytes that go), and saves the
    /// page wherever a guest rewrites memory with what it held.
    public var unchangedPages: Bool = true
    /// Finish in post-copy (stream.md §6.13) when pre-copy alone would not meet `downtimeLimit`: where the convergence
    /// policy would throttle the guest or give up, or after `postCopyAfterPasses` passes. The destination starts the
    /// guest with the pages it lacks and asks for each one the guest touches; the source stays paused until the last
    /// has come and the digests agree. The destination must agree to it.
    public var postCopy: Bool = false
    public var postCopyAfterPasses: Int?
    /// How long a post-copy whose link broke waits for `MigrationSender.resume` before it gives up (the source stays
    /// paused, in doubt), when the destination agreed to resume.
    public var postCopyRecoveryTimeout: Double = 60
    /// Resume the pre-copy that left its memory at the destination under this ticket (the failed migration's
    /// `MigrationReport.resumeTicket`, stream.md §6.15): only what the destination lacks, or holds in another version,
    /// is sent. A destination that kept nothing for it gets all of memory, and the report says why.
    public var resumeTicket: ResumeTicket?

    public init() {}
}

/// One pre-copy pass, as measured by the sender.
public struct PassStatistics: Sendable, Codable, Equatable {
    public var pass: Int
    public var pagesSent: Int = 0
    public var zeroPages: Int = 0
    public var rawPages: Int = 0
    public var compressedPages: Int = 0
    /// Of `pagesSent`, pages the receiver already held as they were: sent as a descriptor without payload, or, in the
    /// first pass of a resumed pre-copy, not sent at all.
    public var unchangedPages: Int = 0
    public var payloadBytes: Int = 0
    public var wireBytes: Int = 0
    public var seconds: Double = 0
    /// Pages dirtied while this pass ran (the next pass's work).
    public var dirtyPages: Int = 0
    /// Bytes per second the guest dirtied during the pass.
    public var dirtyRate: Double = 0
    /// Wire bytes per second during the pass.
    public var bandwidth: Double = 0
    /// What the downtime would be if the guest were paused now.
    public var expectedDowntime: Double = 0
    public var throttle: Double = 0

    public init(pass: Int) { self.pass = pass }

    /// Fills in what the convergence policy reads, once `seconds` and `dirtyPages` are set: the dirty rate, the
    /// rate of the link (or file) over all passes so far, `totalBytes` in `earlier` and this pass' seconds (a
    /// short pass alone says more about latency than bandwidth), and the pause that sending the dirty pages, at
    /// `bytesPerDirtyPage` each, would take at that rate.
    public mutating func estimate(totalBytes: Int, bytesPerDirtyPage: Double, earlier: [PassStatistics]) {
        dirtyRate = seconds > 0 ? Double(dirtyPages * 4096) / seconds : 0
        let allSeconds = earlier.reduce(seconds) { $0 + $1.seconds }
        bandwidth = allSeconds > 0 ? Double(totalBytes) / allSeconds : 0
        expectedDowntime = bandwidth > 0 ? Double(dirtyPages) * bytesPerDirtyPage / bandwidth : .infinity
    }
}

/// Where a running migration stands, for progress displays.
public struct MigrationProgress: Sendable, Codable, Equatable {
    public enum Phase: String, Sendable, Codable {
        case setup, precopy, switchover, postcopy, completed, failed, cancelled
        /// Post-copy whose link broke, waiting for a resume.
        case postcopyPaused = "postcopy-paused"
    }
    public var phase: Phase
    public var pass: Int
    /// Of the current pass; in post-copy, of the pages the destination lacked (`pagesTotal`), those sent since the
    /// start of post-copy or its last resume.
    public var pagesDone: Int
    public var pagesTotal: Int
    public var bytesOnWire: Int
    public var bandwidth: Double
    public var dirtyRate: Double
    public var expectedDowntime: Double
    public var throttle: Double
    public var elapsed: Double
    /// Seconds left in the current pass at its pace so far; nil between passes.
    public var passSecondsLeft: Double?
    /// Secondary channels lost so far (stream.md §6.16): the migration goes on over the others.
    public var lostChannels: Int
    /// Seconds until the destination runs the guest, as the latest `ConvergencePrediction` has it (made before the
    /// first pass from measurements taken beforehand, if any, and after every pass); nil before there is one, or
    /// when it says the migration will give up.
    public var predictedSecondsLeft: Double?
    /// The downtime the latest prediction expects; nil as `predictedSecondsLeft`.
    public var predictedDowntime: Double?

    public init(phase: Phase, pass: Int, pagesDone: Int, pagesTotal: Int, bytesOnWire: Int, bandwidth: Double, dirtyRate: Double,
                expectedDowntime: Double, throttle: Double, elapsed: Double, passSecondsLeft: Double?, lostChannels: Int = 0,
                predictedSecondsLeft: Double? = nil, predictedDowntime: Double? = nil) {
        self.predictedSecondsLeft = predictedSecondsLeft
        self.predictedDowntime = predictedDowntime
        self.phase = phase
        self.pass = pass
        self.pagesDone = pagesDone
        self.pagesTotal = pagesTotal
        self.bytesOnWire = bytesOnWire
        self.bandwidth = bandwidth
        self.dirtyRate = dirtyRate
        self.expectedDowntime = expectedDowntime
        self.throttle = throttle
        self.elapsed = elapsed
        self.passSecondsLeft = passSecondsLeft
        self.lostChannels = lostChannels
    }
}

/// The final account of a migration, as JSON for scripts.
public struct MigrationReport: Sendable, Codable, Equatable {
    public var succeeded: Bool
    public var error: String?
    /// The sender committed the switchover (stream.md §6.11). With `succeeded` false, the destination did not
    /// confirm that it started, but may have: the source was left paused, and only a look at the destination
    /// tells whether it may run again.
    public var committed: Bool
    public var totalSeconds: Double
    public var setupSeconds: Double
    /// From the source's pause to the destination's start, as seen by the sender.
    public var downtimeSeconds: Double?
    public var passes: [PassStatistics]
    public var wireBytes: Int
    public var pagesSent: Int
    public var compression: String
    /// Channels opened; those of `lostChannels` were lost during pre-copy, and the migration finished on the others.
    public var channels: Int
    /// Secondary channels that failed during pre-copy, whose pages the others took over (stream.md §6.16).
    public var lostChannels: [LostChannel] = []
    /// Dirty-log harvests of the source during pre-copy, and the seconds they took in all.
    public var harvests: Int
    public var harvestSeconds: Double
    /// How post-copy went, when the migration finished in it.
    public var postCopy: PostCopyReport?
    /// Every prediction of the migration's end made while it ran, oldest first (`ConvergencePrediction.afterPass`
    /// says when each was made).
    public var predictions: [ConvergencePrediction] = []
    /// After a failure before commit, the ticket under which the destination may keep the memory it received, for its
    /// grace period: `MigrationOptions.resumeTicket` of a migration that carries on from there. Nil when the destination
    /// did not agree to keep memory.
    public var resumeTicket: ResumeTicket?
    /// For a migration that asked to resume: whether it did, from how many pages.
    public var resumedPreCopy: ResumedPreCopyReport?
}

/// How a migration that asked to resume a pre-copy went (stream.md §6.15).
public struct ResumedPreCopyReport: Sendable, Codable, Equatable {
    /// The destination still held memory of the broken migration, and this one carried on from it.
    public var resumed: Bool
    /// Pages the destination held; those it held in the guest's current version were not sent again (the first pass's
    /// `unchangedPages`).
    public var heldPages: Int
    /// Why the migration sent all of memory after all, when it did.
    public var reason: String?
}

/// The post-copy phase of a migration, as the sender saw it.
public struct PostCopyReport: Sendable, Codable, Equatable {
    /// Pages missing at the destination when its guest started.
    public var missingPages: Int
    /// Of those, pages the destination's guest asked for (it touched them before the push sent them), and the
    /// PAGE_REQUEST records that asked.
    public var requestedPages: Int
    public var requests: Int
    public var wireBytes: Int
    /// From the destination's start until it verified the last page.
    public var seconds: Double
}

/// The median, 99th percentile and maximum of some measurements (seconds), and how many there were.
public struct Percentiles: Sendable, Codable, Equatable {
    public var count: Int
    public var p50: Double
    public var p99: Double
    public var max: Double

    /// Nil when there are none.
    public init?(_ values: [Double]) {
        guard !values.isEmpty else { return nil }
        let sorted = values.sorted()
        func at(_ fraction: Double) -> Double { sorted[min(sorted.count - 1, Int((Double(sorted.count) * fraction).rounded(.down)))] }
        count = sorted.count
        p50 = at(0.5)
        p99 = at(0.99)
        max = sorted[sorted.count - 1]
    }
}
