// The migration half of the control API. These are the API's own documents, kept apart from the engine's
// MigrationEngine.MigrationOptions/Progress/Report so that the HTTP contract stays stable while the engine
// changes, and so that migratectl does not link the engine. The daemon's MigrationService maps between them.

/// How pages are compressed on the wire.
public enum MigrationCompression: String, Codable, Sendable, CaseIterable {
    case none, lz4, zstd, adaptive
}

/// Whether the channels to the peer are mutually authenticated TLS 1.3 or plain. Plain must be asked for by name.
public enum MigrationSecurity: String, Codable, Sendable, CaseIterable {
    case tls, plaintext
}

/// `POST /vms/{id}/migrate`.
public struct MigrationRequest: Codable, Sendable, Equatable, StrictlyDecodable {
    /// The destination daemon's migration listener: `host:port`, `[v6addr]:port` or `unix:/path`.
    public var peer: String
    /// Parallel channels, 1...16.
    public var channels: Int
    public var compression: MigrationCompression
    public var security: MigrationSecurity
    /// Cap on wire bytes per second over all channels; nil for none.
    public var bandwidthLimitBytesPerSecond: UInt64?
    /// The longest pause of the guest the switchover may cause.
    public var downtimeLimitMs: UInt64
    /// Throttle the guest when it dirties memory faster than the link carries it, instead of giving up.
    public var autoConverge: Bool
    /// Finish in post-copy when pre-copy alone would not meet `downtimeLimitMs` (where it would throttle the guest or
    /// give up), or after `postcopyAfterPasses` passes: the destination starts the guest before it has every page and
    /// asks the source for each one the guest touches. The destination daemon must offer it (shared-memory guests).
    public var postcopy: Bool
    /// With `postcopy`: switch to post-copy after this many pre-copy passes at the latest, 1 or more; nil to switch
    /// only when pre-copy alone would not meet the downtime limit.
    public var postcopyAfterPasses: Int?
    /// Carry on the VM's broken migration instead of starting one: its post-copy whose link broke (phase
    /// `postcopy-paused`), over new connections to the same destination; or else its last migration, when that failed
    /// before the switchover and its destination keeps what it received (`MigrationReportDocument.resumable`), as a new
    /// migration with that one's settings that sends only what the destination lacks. The other fields, `peer`
    /// included, may be omitted and are ignored.
    public var resume: Bool

    /// Do not migrate: measure the guest and the link, and answer with a `MigrationPrediction` (control-api.md §4.1.1).
    public var dryRun: Bool

    public static let fieldNames: Set<String> = [
        "peer", "channels", "compression", "security", "bandwidth_limit_bytes_per_second", "downtime_limit_ms", "auto_converge",
        "postcopy", "postcopy_after_passes", "dry_run", "resume",
    ]
    public static let channelRange = 1 ... 16

    public init(peer: String, channels: Int = 1, compression: MigrationCompression = .lz4, security: MigrationSecurity = .tls,
                bandwidthLimitBytesPerSecond: UInt64? = nil, downtimeLimitMs: UInt64 = 300, autoConverge: Bool = true,
                postcopy: Bool = false, postcopyAfterPasses: Int? = nil, dryRun: Bool = false, resume: Bool = false) {
        self.peer = peer
        self.channels = channels
        self.compression = compression
        self.security = security
        self.bandwidthLimitBytesPerSecond = bandwidthLimitBytesPerSecond
        self.downtimeLimitMs = downtimeLimitMs
        self.autoConverge = autoConverge
        self.postcopy = postcopy
        self.postcopyAfterPasses = postcopyAfterPasses
        self.dryRun = dryRun
        self.resume = resume
    }

    /// Asks to resume the VM's broken migration.
    public static var resuming: MigrationRequest { MigrationRequest(peer: "", resume: true) }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        resume = try c.decodeIfPresent(Bool.self, forKey: .resume) ?? false
        // A resume goes where the paused migration went.
        peer = resume ? try c.decodeIfPresent(String.self, forKey: .peer) ?? "" : try c.decode(String.self, forKey: .peer)
        channels = try c.decodeIfPresent(Int.self, forKey: .channels) ?? 1
        compression = try c.decodeIfPresent(MigrationCompression.self, forKey: .compression) ?? .lz4
        security = try c.decodeIfPresent(MigrationSecurity.self, forKey: .security) ?? .tls
        bandwidthLimitBytesPerSecond = try c.decodeIfPresent(UInt64.self, forKey: .bandwidthLimitBytesPerSecond)
        downtimeLimitMs = try c.decodeIfPresent(UInt64.self, forKey: .downtimeLimitMs) ?? 300
        autoConverge = try c.decodeIfPresent(Bool.self, forKey: .autoConverge) ?? true
        // Absent from the requests of clients that predate post-copy.
        postcopy = try c.decodeIfPresent(Bool.self, forKey: .postcopy) ?? false
        postcopyAfterPasses = try c.decodeIfPresent(Int.self, forKey: .postcopyAfterPasses)
        dryRun = try c.decodeIfPresent(Bool.self, forKey: .dryRun) ?? false
    }

    /// The checks that need no engine: nil when the request is well formed, else why not.
    public func problem() -> String? {
        if resume { return nil }
        if PeerAddress(peer) == nil { return "peer '\(peer)' is not host:port, [v6-address]:port or unix:/path" }
        if !Self.channelRange.contains(channels) { return "channels must be in \(Self.channelRange), not \(channels)" }
        if bandwidthLimitBytesPerSecond == 0 { return "bandwidth_limit_bytes_per_second must be positive (omit it for no cap)" }
        if downtimeLimitMs == 0 { return "downtime_limit_ms must be positive" }
        if let passes = postcopyAfterPasses {
            if passes < 1 { return "postcopy_after_passes must be 1 or more, not \(passes)" }
            // Said without postcopy, it would be ignored without a word: the client meant something else.
            if !postcopy { return "postcopy_after_passes needs \"postcopy\": true" }
        }
        return nil
    }
}

/// `POST /vms/{id}/migrate` with `dry_run`: what the migration would do, measured and predicted without migrating.
public struct MigrationPrediction: Codable, Sendable, Equatable {
    public var vm: String
    public var peer: String
    /// How long the guest's dirty log was sampled (it ran throughout), and what it dirtied.
    public var sampleSeconds: Double
    /// Bytes per second the guest dirtied over the whole sample, as distinct pages.
    public var dirtyRateBytesPerSecond: Double
    /// Distinct bytes the guest dirtied in windows of growing length from the start of the sample.
    public var dirtyWindows: [DirtyWindow]
    /// How the link was measured, in words.
    public var link: String
    /// Guest bytes with data per second the probe moved end to end (encoding, link, the destination writing them),
    /// and wire bytes per guest page after compression.
    public var rateBytesPerSecond: Double
    public var wireBytesPerPage: Double
    /// Guest memory that holds data (not zero): what pass 0 will send.
    public var dataBytes: UInt64
    /// The probe's setup (connection, TLS handshake, capabilities), which the migration's will resemble.
    public var setupSeconds: Double
    /// The fixed cost of the switchover, which a dry run cannot measure without pausing the guest: assumed.
    public var assumedSwitchoverMs: Double
    /// Whether the migration will converge under the request's options, and if not, why not.
    public var converges: Bool
    public var reason: String?
    /// From the start of the migration until the destination runs the guest (or until it gives up).
    public var totalSeconds: Double
    /// nil when it will not converge.
    public var downtimeMs: Double?
    /// The pre-copy passes, then the final pass with the guest paused.
    public var passes: [PredictedPass]
    public var finalPages: UInt64
    /// The heaviest auto-converge throttle the migration will need; 0 for none.
    public var throttle: Double

    public struct DirtyWindow: Codable, Sendable, Equatable {
        public var seconds: Double
        public var bytes: UInt64

        public init(seconds: Double, bytes: UInt64) {
            self.seconds = seconds
            self.bytes = bytes
        }
    }

    public struct PredictedPass: Codable, Sendable, Equatable {
        public var pass: Int
        public var pages: UInt64
        public var seconds: Double
        /// Pages the guest dirties meanwhile: the next pass's work.
        public var dirtyPages: UInt64
        public var throttle: Double

        public init(pass: Int, pages: UInt64, seconds: Double, dirtyPages: UInt64, throttle: Double) {
            self.pass = pass
            self.pages = pages
            self.seconds = seconds
            self.dirtyPages = dirtyPages
            self.throttle = throttle
        }
    }

    public init(vm: String, peer: String, sampleSeconds: Double, dirtyRateBytesPerSecond: Double, dirtyWindows: [DirtyWindow], link: String,
                rateBytesPerSecond: Double, wireBytesPerPage: Double, dataBytes: UInt64, setupSeconds: Double, assumedSwitchoverMs: Double,
                converges: Bool, reason: String?, totalSeconds: Double, downtimeMs: Double?, passes: [PredictedPass], finalPages: UInt64,
                throttle: Double) {
        self.vm = vm
        self.peer = peer
        self.sampleSeconds = sampleSeconds
        self.dirtyRateBytesPerSecond = dirtyRateBytesPerSecond
        self.dirtyWindows = dirtyWindows
        self.link = link
        self.rateBytesPerSecond = rateBytesPerSecond
        self.wireBytesPerPage = wireBytesPerPage
        self.dataBytes = dataBytes
        self.setupSeconds = setupSeconds
        self.assumedSwitchoverMs = assumedSwitchoverMs
        self.converges = converges
        self.reason = reason
        self.totalSeconds = totalSeconds
        self.downtimeMs = downtimeMs
        self.passes = passes
        self.finalPages = finalPages
        self.throttle = throttle
    }
}

/// Where a migration stands.
///
/// `postcopy` comes after `precopy` in a migration that finishes in post-copy (`MigrationRequest.postcopy`): the
/// source is paused, the destination runs the guest and receives the pages it still lacks; it ends when the last has
/// come and the digests agree.
public enum MigrationPhase: String, Codable, Sendable, CaseIterable {
    case setup, precopy, switchover, postcopy, completed, failed, cancelled
    /// The post-copy's link broke: the destination's guest runs, the threads that touch missing pages wait, the source
    /// keeps the guest's memory; both wait `MigrationStatus.postcopyPause` for a resume (`"resume": true`).
    case postcopyPaused = "postcopy-paused"

    /// No further change will come.
    public var isFinal: Bool { self == .completed || self == .failed || self == .cancelled }
}

/// `GET /vms/{id}/migration`: live progress, and the report once the migration has ended.
public struct MigrationStatus: Codable, Sendable, Equatable {
    public var vm: String
    public var peer: String
    public var phase: MigrationPhase
    /// Pre-copy pass, from 0.
    public var pass: Int
    /// Of the current pass, 0...100; in the `postcopy` phase, of the pages the destination lacked when it started.
    public var percent: Double
    public var bytesOnWire: UInt64
    /// Wire bytes per second, recently.
    public var rateBytesPerSecond: Double
    /// Bytes per second the guest dirties.
    public var dirtyRateBytesPerSecond: Double
    /// What the downtime would be if the guest were paused now.
    public var expectedDowntimeMs: Double
    /// Fraction of the time the guest is held back by auto-converge, 0...1.
    public var throttle: Double
    public var elapsedSeconds: Double
    /// Seconds to completion as the engine's convergence prediction has it, made again after every pass; before
    /// the first pass has ended, the rest of that pass at its pace so far. nil when the engine cannot tell, or when
    /// its prediction is that the migration will give up.
    public var etaSeconds: Double?
    /// The downtime the engine's latest prediction expects; nil before its first.
    public var predictedDowntimeMs: Double?
    /// Set once `phase` is final.
    public var report: MigrationReportDocument?
    /// Set while `phase` is `postcopy-paused`.
    public var postcopyPause: PostCopyPause?

    public init(vm: String, peer: String, phase: MigrationPhase, pass: Int = 0, percent: Double = 0, bytesOnWire: UInt64 = 0,
                rateBytesPerSecond: Double = 0, dirtyRateBytesPerSecond: Double = 0, expectedDowntimeMs: Double = 0,
                throttle: Double = 0, elapsedSeconds: Double = 0, etaSeconds: Double? = nil, predictedDowntimeMs: Double? = nil,
                report: MigrationReportDocument? = nil, postcopyPause: PostCopyPause? = nil) {
        self.predictedDowntimeMs = predictedDowntimeMs
        self.vm = vm
        self.peer = peer
        self.phase = phase
        self.pass = pass
        self.percent = percent
        self.bytesOnWire = bytesOnWire
        self.rateBytesPerSecond = rateBytesPerSecond
        self.dirtyRateBytesPerSecond = dirtyRateBytesPerSecond
        self.expectedDowntimeMs = expectedDowntimeMs
        self.throttle = throttle
        self.elapsedSeconds = elapsedSeconds
        self.etaSeconds = etaSeconds
        self.report = report
        self.postcopyPause = postcopyPause
    }
}

/// A post-copy whose link broke and which waits for a resume (phase `postcopy-paused` at the source,
/// `VMInfo.postcopyPause` at the destination); when the wait ends without one, the destination stops the guest as
/// failed and the source's VM stays paused, in doubt.
public struct PostCopyPause: Codable, Sendable, Equatable {
    /// Why the link broke, as this side saw it; nil when this side cannot tell.
    public var reason: String?
    /// Seconds this side will still wait for a resume.
    public var waitSecondsLeft: Double

    public init(reason: String?, waitSecondsLeft: Double) {
        self.reason = reason
        self.waitSecondsLeft = waitSecondsLeft
    }
}

/// The final account of a migration.
public struct MigrationReportDocument: Codable, Sendable, Equatable {
    public var succeeded: Bool
    /// Why it failed or was cancelled.
    public var error: String?
    /// The switchover was committed: the destination was told to start the guest. With `succeeded` false, the
    /// outcome is in doubt and the source stays paused (`VMInfo.inDoubt`).
    public var committed: Bool
    public var totalSeconds: Double
    public var setupSeconds: Double
    /// From the source's pause to the destination's start; nil when the switchover was not reached.
    public var downtimeMs: Double?
    public var wireBytes: UInt64
    public var pagesSent: UInt64
    public var compression: MigrationCompression
    public var channels: Int
    public var passes: [Pass]
    /// Set when the migration finished in post-copy (`MigrationRequest.postcopy`); then `downtimeMs` is from the
    /// source's pause to the destination's start, which came before the destination had every page.
    public var postCopy: PostCopy?
    /// The migration failed before the switchover, and its destination agreed to keep what it received for a while:
    /// `"resume": true` carries it on, sending only what the destination lacks (control-api.md §4.6.2).
    public var resumable: Bool?
    /// For a resumed pre-copy (`"resume": true`): whether the destination still held the broken migration's memory.
    public var resumedPrecopy: ResumedPreCopy?

    /// How a resumed pre-copy went.
    public struct ResumedPreCopy: Codable, Sendable, Equatable {
        /// The destination held the broken migration's memory, and this migration carried on from it.
        public var resumed: Bool
        /// Pages the destination held; those it held in the guest's current version were not sent again (pass 0's
        /// `unchanged_pages`).
        public var heldPages: UInt64
        /// Why all of memory was sent after all, when it was.
        public var reason: String?

        public init(resumed: Bool, heldPages: UInt64, reason: String?) {
            self.resumed = resumed
            self.heldPages = heldPages
            self.reason = reason
        }
    }

    /// Secondary channels that failed during pre-copy and whose pages the others took over (`protocol/stream.md`
    /// §6.16); the migration went on over the rest of `channels`. Absent when none was lost.
    public var lostChannels: [LostChannel]?

    /// A channel lost during pre-copy.
    public struct LostChannel: Codable, Sendable, Equatable {
        /// Its index, 1 or more: the main channel, 0, cannot be lost.
        public var channel: Int
        /// The pass during which it was lost; the next pass sent its pages again.
        public var pass: Int
        /// What failed, as the source saw it.
        public var reason: String

        public init(channel: Int, pass: Int, reason: String) {
            self.channel = channel
            self.pass = pass
            self.reason = reason
        }
    }

    /// The post-copy phase, as the source saw it.
    public struct PostCopy: Codable, Sendable, Equatable {
        /// Pages the destination lacked when its guest started.
        public var missingPages: UInt64
        /// Of those, pages the destination's guest touched before the background push had sent them, which it asked
        /// the source for; and the requests that asked.
        public var requestedPages: UInt64
        public var requests: UInt64
        public var wireBytes: UInt64
        /// From the destination's start until it had the last page and the digests agreed.
        public var seconds: Double

        public init(missingPages: UInt64, requestedPages: UInt64, requests: UInt64, wireBytes: UInt64, seconds: Double) {
            self.missingPages = missingPages
            self.requestedPages = requestedPages
            self.requests = requests
            self.wireBytes = wireBytes
            self.seconds = seconds
        }
    }

    public struct Pass: Codable, Sendable, Equatable {
        public var pass: Int
        public var pagesSent: UInt64
        public var zeroPages: UInt64
        public var compressedPages: UInt64
        /// Pages the destination already held as they were, sent as a descriptor without payload (stream.md §6.4.1).
        /// Absent from the reports of daemons that predate it.
        public var unchangedPages: UInt64?
        public var wireBytes: UInt64
        public var seconds: Double
        public var dirtyRateBytesPerSecond: Double
        public var rateBytesPerSecond: Double
        public var expectedDowntimeMs: Double
        public var throttle: Double

        public init(pass: Int, pagesSent: UInt64, zeroPages: UInt64, compressedPages: UInt64, unchangedPages: UInt64? = nil,
                    wireBytes: UInt64, seconds: Double, dirtyRateBytesPerSecond: Double, rateBytesPerSecond: Double,
                    expectedDowntimeMs: Double, throttle: Double) {
            self.pass = pass
            self.pagesSent = pagesSent
            self.zeroPages = zeroPages
            self.compressedPages = compressedPages
            self.unchangedPages = unchangedPages
            self.wireBytes = wireBytes
            self.seconds = seconds
            self.dirtyRateBytesPerSecond = dirtyRateBytesPerSecond
            self.rateBytesPerSecond = rateBytesPerSecond
            self.expectedDowntimeMs = expectedDowntimeMs
            self.throttle = throttle
        }
    }

    public init(succeeded: Bool, error: String?, committed: Bool, totalSeconds: Double, setupSeconds: Double, downtimeMs: Double?,
                wireBytes: UInt64, pagesSent: UInt64, compression: MigrationCompression, channels: Int, passes: [Pass],
                postCopy: PostCopy? = nil, resumable: Bool? = nil, resumedPrecopy: ResumedPreCopy? = nil,
                lostChannels: [LostChannel]? = nil) {
        self.succeeded = succeeded
        self.error = error
        self.committed = committed
        self.totalSeconds = totalSeconds
        self.setupSeconds = setupSeconds
        self.downtimeMs = downtimeMs
        self.wireBytes = wireBytes
        self.pagesSent = pagesSent
        self.compression = compression
        self.channels = channels
        self.passes = passes
        self.postCopy = postCopy
        self.resumable = resumable
        self.resumedPrecopy = resumedPrecopy
        self.lostChannels = lostChannels
    }
}

// Requests and the daemon's configuration name peers with `PeerAddress`.
@_exported import NetworkAddress

/// How a migration into this daemon ended.
public enum IncomingOutcome: String, Codable, Sendable, CaseIterable {
    /// The guest passed the digest check, started and runs here. In post-copy it started before the check, which
    /// came once the last page had.
    case received
    /// Nothing was started: whatever had arrived was discarded and its memory reservation given back. In post-copy
    /// the guest may have run here before the migration failed; it was then stopped (its VM is listed as `failed`).
    case failed
}

/// One migration into this daemon, once it has ended: an element of `GET /migrations/incoming`.
public struct IncomingMigrationRecord: Codable, Sendable, Equatable {
    /// The sending host, as its connection came from.
    public var peer: String
    /// The VM's id here once received; for a failure, its id at the source when its configuration had arrived.
    public var vm: String?
    public var outcome: IncomingOutcome
    /// Why it failed; for a received guest, what broke after it started (the source may then show it in doubt).
    public var error: String?
    /// Guest memory the migration had reserved here, and gave back when it failed; 0 when it failed before that.
    public var memoryBytes: UInt64
    /// ISO 8601, UTC.
    public var finishedAt: String
    /// Set for a guest received in post-copy: it ran here before its memory was complete.
    public var postCopy: IncomingPostCopy?

    public init(peer: String, vm: String?, outcome: IncomingOutcome, error: String?, memoryBytes: UInt64, finishedAt: String,
                postCopy: IncomingPostCopy? = nil) {
        self.peer = peer
        self.vm = vm
        self.outcome = outcome
        self.error = error
        self.memoryBytes = memoryBytes
        self.finishedAt = finishedAt
        self.postCopy = postCopy
    }
}

/// The post-copy phase of a migration into this daemon, as the receiver saw it.
public struct IncomingPostCopy: Codable, Sendable, Equatable {
    /// Pages the guest lacked when it started here.
    public var missingPages: UInt64
    /// Of those, pages the guest touched before they had come, each asked of the source once.
    public var requestedPages: UInt64
    /// From the guest's start here until the last page had come and the digests agreed.
    public var seconds: Double

    public init(missingPages: UInt64, requestedPages: UInt64, seconds: Double) {
        self.missingPages = missingPages
        self.requestedPages = requestedPages
        self.seconds = seconds
    }
}

/// `GET /migrations/incoming`: the latest incoming migrations that ended, oldest first.
public struct IncomingMigrationList: Codable, Sendable, Equatable {
    public var migrations: [IncomingMigrationRecord]
    public init(migrations: [IncomingMigrationRecord]) { self.migrations = migrations }
}
