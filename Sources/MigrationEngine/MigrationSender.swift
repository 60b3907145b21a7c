import Foundation
import MigrationWire
import PageCodec
import Synchronization
import Threads

/// The sending half of a live migration: pre-copy passes over the dirty log, then a verified switchover.
///
/// 1. Setup: every channel opens its stream with the memory layout; the main channel (0) offers capabilities
///    and the receiver answers with the agreed set.
/// 2. Pre-copy: pass 0 sends every non-zero page, each later pass the pages the dirty log reports. After each
///    pass `ConvergencePolicy` chooses: another pass, a heavier throttle, the switchover, or giving up.
/// 3. Switchover: pause the source, send the last dirty pages and the device state, and the digest of all
///    guest memory; the receiver answers `verified` only if its memory has the same digest. Then `commit`,
///    and the receiver starts the guest and answers `started`.
///
/// Until `commit` is sent, any failure (channel, peer, guest, cancel) resumes the source as it was: the
/// caller finds it running. After `commit` the destination may be running, so the source stays paused (throttle
/// lifted, tracking stopped) and the report says `committed`: only someone who can ask the destination may decide
/// whether it runs again. `started` that does not come within `options.startedTimeout` of `commit` ends the wait.
///
/// With several channels and a receiver that agreed to it, a secondary channel that fails during pre-copy costs that
/// channel only (stream.md §6.16): the others finish the pass, take over its pages in the next, and the report lists it.
///
/// Sendable: `run` works on one thread; what others touch is atomic (`cancelled`, the progress counters, `watching`),
/// locked (`gate`, `opened`), set before `run` (`onProgress`, `corruptDigestForTesting`,
/// `claimWrongUnchangedForTesting`, `measuredBeforehand`) or, `losesChannels`, before the first pass.
/// `failure` and the report are read after `run` returns.
public final class MigrationSender: @unchecked Sendable {
    public let source: GuestSource
    /// Opens channel `index`; channels are opened one at a time, each sending its stream header before the
    /// next is opened, so that a receiver can learn the channel count from the first one.
    private let openChannel: (Int) throws -> MigrationChannel
    private let opened = Locked(OpenedChannels())
    private var channels: [MigrationChannel] { opened.withLock { $0.channels } }
    public let options: MigrationOptions
    /// Called from the migration's thread, several times a second while pages flow.
    public var onProgress: ((MigrationProgress) -> Void)?
    /// Why the last `run` failed, as the error the report words; nil after a success. For callers that act on
    /// the kind of failure (the C library's error codes) rather than on its words.
    public private(set) var failure: MigrationError?
    /// For tests: flips a bit of the digest sent at switchover, so that the receiver must refuse it.
    public var corruptDigestForTesting = false
    /// For tests: in every pass after the first, each channel declares one page unchanged whose content did change
    /// (stream.md §6.4.1), as a sender that misjudged what the receiver holds would; the digest must refuse it.
    public var claimWrongUnchangedForTesting = false
    /// Measurements taken before the migration (a dry run's, `ConvergenceDryRun`), from which the first prediction
    /// of its end is made before pass 0; without them the first comes after pass 0.
    public var measuredBeforehand: ConvergenceMeasurements?

    private let cancelled = Atomic<Bool>(false)
    private let pagesDone = ProgressCounter()
    private let bytesInPass = ProgressCounter()
    private var passStartedAt = monotonicSeconds()
    private var history: [PassStatistics] = []
    private var started = monotonicSeconds()
    private var wireBytes = 0
    /// Dirty-log harvests so far and the time they took: what tracking costs the source per pass.
    private var harvests = 0
    private var harvestSeconds = 0.0
    private var postCopyReport: PostCopyReport?
    /// This run's ticket, once the receiver agreed to keep memory for a resume; and how asking to resume went.
    private var ticket: ResumeTicket?
    private var resumed: ResumedPreCopyReport?
    /// Whether a secondary channel may be lost during pre-copy (stream.md §6.16): agreed with the receiver.
    private var losesChannels = false
    /// Which channel carries each frame; the channels lost so far have left it.
    private var channelMap = ChannelMap(channels: 1)
    private var lostChannels: [LostChannel] = []
    private var forecast = ConvergenceForecast(options: MigrationOptions(), beforehand: nil)

    public init(source: GuestSource, options: MigrationOptions, openChannel: @escaping (Int) throws -> MigrationChannel) {
        precondition(options.channels >= 1, "at least one channel")
        self.source = source
        self.options = options
        self.openChannel = openChannel
    }

    /// A sender over channels that are already open, one per `options.channels`.
    public convenience init(source: GuestSource, channels: [MigrationChannel], options: MigrationOptions) {
        precondition(channels.count == options.channels, "one channel per options.channels")
        self.init(source: source, options: options) { channels[$0] }
    }

    /// Carries on a post-copy whose link broke, over `channels`, or over channels opened as at the start when nil.
    /// Returns false, using none of them, when no post-copy waits for a resume.
    public func resume(with channels: [MigrationChannel]? = nil) -> Bool { resumePoint.offer(channels) }
    private let resumePoint = ResumePoint()

    /// Asks the migration to stop: at the next batch, or at once when a thread waits on the peer (the watchdog
    /// closes the channels). Has no effect once the switchover is committed.
    public func cancel() { cancelled.store(true, ordering: .relaxed) }
    private var isCancelled: Bool { cancelled.load(ordering: .relaxed) }
    private var timeBudgetSpent: Bool { monotonicSeconds() - started > options.timeLimit }

    /// Runs the migration on the calling thread. On success the destination runs the guest and the source is
    /// paused, for the caller to shut down. On failure before commit, the source runs as before.
    public func run() -> MigrationReport {
        started = monotonicSeconds()
        failure = nil
        postCopyReport = nil
        ticket = nil
        resumed = nil
        losesChannels = false
        channelMap = ChannelMap(channels: options.channels)
        lostChannels = []
        forecast = ConvergenceForecast(options: options, beforehand: measuredBeforehand)
        var phase = Phase()
        gate.withLock { $0 = Gate() }
        opened.withLock { $0 = OpenedChannels() }
        startWatchdog()
        defer { watching.store(false, ordering: .relaxed) }
        do {
            let downtime = try migrate(&phase)
            report(.completed, pass: history.count, total: 0)
            return makeReport(error: nil, setup: phase.setupSeconds, downtime: downtime, committed: true)
        } catch {
            // A channel the watchdog closed fails whatever waited on it; the reason is the watchdog's.
            let (closed, overdue) = gate.withLock { ($0.closedByWatchdog, $0.startedOverdue) }
            let stopped: MigrationError? = closed ? (isCancelled ? .cancelled : .didNotConverge("the time budget of \(options.timeLimit) s ran out"))
                : overdue ? .channel("no started from the destination within \(options.startedTimeout) s of commit") : nil
            let failure = stopped ?? reasonFromPeer(for: error as? MigrationError ?? .guestFailed("\(error)"), reply: phase.reply)
            self.failure = failure
            rollBack(phase, failure)
            report(failure == .cancelled ? .cancelled : .failed, pass: history.count, total: 0)
            return makeReport(error: failure, setup: phase.setupSeconds, downtime: nil, committed: phase.committed)
        }
    }

    /// Whether the switchover is committed (and when), and whether the watchdog closed the channels before it
    /// was; the two exclude each other. After the commit the watchdog closes them only when `started` is overdue.
    private struct Gate {
        var committedAt: Double?
        var committed: Bool { committedAt != nil }
        var closedByWatchdog = false
        var startedOverdue = false
        /// The receiver said it started: post-copy runs on with nothing for the watchdog to watch.
        var started = false
    }
    private let gate = Locked(Gate())

    /// The channels opened so far, and whether they were closed for good (by the watchdog, a failed channel or the
    /// roll-back). Closing is sticky because channels open one by one: one that opens after the others were closed
    /// is closed at once, or a thread could block for ever on a peer that never answers, with nobody left to close it.
    private struct OpenedChannels {
        var channels: [MigrationChannel] = []
        var closed = false
    }

    /// Closes every channel opened so far, and each one opened later.
    private func closeChannels() {
        let open = opened.withLock { opened in
            opened.closed = true
            return opened.channels
        }
        for channel in open { channel.close() }
    }

    /// Whether the watchdog of the running migration should go on watching.
    private let watching = Atomic<Bool>(false)

    /// Watches the migration until `watching` turns false: when it is cancelled or its time budget runs out before
    /// the commit, closes the channels, so that a thread blocked on the peer returns: a peer that accepted and never
    /// answers, one that stopped reading, a pass not yet applied. After the commit, a cancel or the budget change
    /// nothing; only a `started` overdue by `options.startedTimeout` (a destination that hangs, or whose host
    /// vanished without closing the connection) closes them, and the source stays paused, in doubt.
    private func startWatchdog() {
        watching.store(true, ordering: .relaxed)
        startThread(named: "migrate-watchdog") { [self] in
            while watching.load(ordering: .relaxed) {
                let close = gate.withLock { gate in
                    if gate.started { return false }
                    if let committedAt = gate.committedAt {
                        gate.startedOverdue = monotonicSeconds() - committedAt > options.startedTimeout
                        return gate.startedOverdue
                    }
                    guard isCancelled || timeBudgetSpent else { return false }
                    gate.closedByWatchdog = true
                    return true
                }
                if close {
                    closeChannels()
                    return
                }
                Thread.sleep(forTimeInterval: 0.02)
            }
        }
    }

    /// How far the migration got, for rolling back.
    private struct Phase {
        var writers: [RecordWriter] = []
        var reply: RecordReader?
        var tracking = false
        var paused = false
        var committed = false
        var setupSeconds = 0.0
    }

    private func migrate(_ phase: inout Phase) throws -> Double {
        let layout = source.layout
        let count = options.channels
        var flags: CapabilityFlags = [.wholeBatchCompression, .passAcknowledgement, .descriptorChecksum]
        if options.unchangedPages { flags.insert(.unchangedPages) }
        if options.postCopy { flags.formUnion([.postCopy, .resume]) }
        flags.insert(.preCopyResume)
        if count > 1 { flags.insert(.channelLoss) }
        let offer = Capabilities(codecs: .all, maxChannels: UInt16(count), flags: flags)
        let migrationID = UInt32.random(in: 1 ... .max)
        for index in 0 ..< count {
            let channel: MigrationChannel
            do { channel = try openChannel(index) } catch { throw MigrationError.channel("opening channel \(index): \(error)") }
            let added = opened.withLock { opened in
                if !opened.closed { opened.channels.append(channel) }
                return !opened.closed
            }
            guard added else {
                channel.close()
                throw MigrationError.channel("channel \(index) opened after the others were closed")
            }
            let writer = RecordWriter(channel: channel, header: StreamHeader(features: .liveMigration, channel: UInt16(index), channelCount: UInt16(count),
                                                                    migrationID: migrationID))
            phase.writers.append(writer)
            try writer.send { encoder, out in
                encoder.encodeHeader(into: &out)
                if index == 0 { encoder.encodeCapabilities(offer, agreed: false, into: &out) }
                encoder.encodeLayout(layout, into: &out)
            }
        }
        let writers = phase.writers
        let reply = RecordReader(channel: channels[0])
        phase.reply = reply
        try expectReplyHeader(reply)
        let agreed = try expectAgreed(reply)
        try checkAgreement(agreed)
        let wholeBatches = agreed.flags.contains(.wholeBatchCompression)
        let acknowledged = agreed.flags.contains(.passAcknowledgement)
        // A loss is confirmed by the receiver before the next pass, which waits for PASS_APPLIED anyway (§6.16).
        losesChannels = agreed.flags.isSuperset(of: [.channelLoss, .passAcknowledgement])
        if agreed.flags.contains(.descriptorChecksum) {
            for writer in writers { writer.encoder.checksumsPayload = false }
        }
        let unchanged = agreed.flags.contains(.unchangedPages) && options.unchangedPages
        let makeStreamer = { [self] (writer: RecordWriter) throws -> PageStreamer in
            try PageStreamer(writer: writer, source: source, layout: layout, options: options, compressWholeBatches: wholeBatches,
                             sendsUnchanged: unchanged, claimsWrongUnchanged: claimWrongUnchangedForTesting)
        }
        let streamers = try writers.map(makeStreamer)
        let setup = StreamSetup(agreed: agreed, migrationID: migrationID, makeStreamer: makeStreamer)
        let held = try presentTicket(agreed: agreed, writer: writers[0], reply: reply, layout: layout)
        if let held {
            for (index, streamer) in streamers.enumerated() { streamer.seed(with: held, index: index, of: count) }
        }

        try guest { try source.startDirtyTracking() }
        phase.tracking = true
        phase.setupSeconds = monotonicSeconds() - started
        forecast.start(setupSeconds: phase.setupSeconds)

        var frames = [[UInt64]](repeating: [], count: count)
        let map = channelMap
        try guest { try source.forEachPopulatedFrame { frames[map.channel(of: $0)].append($0) } }
        if let held {
            // A page the receiver holds that the guest has since let go of (zero, or never populated) must go too.
            held.forEachHeld { frame, _ in frames[map.channel(of: frame)].append(frame) }
            frames = frames.map(\.sortedUnique)
        }
        let policy = ConvergencePolicy(options: options)
        var throttle = 0.0
        var pass: UInt32 = 0
        while true {
            let passStart = monotonicSeconds()
            let (counts, dropped) = try sendPass(frames, pass: pass, streamers: streamers)
            var dirty = try harvest()
            var statistics = measure(pass: Int(pass), counts: counts, seconds: monotonicSeconds() - passStart,
                                     dirtyPages: dirty.reduce(0) { $0 + $1.count }, throttle: throttle)
            var lost = try sendBoundary(statistics, counts: counts, on: writers, lost: dropped)
            if acknowledged {
                // Sent is not yet received: wait until the receiver has the whole pass in memory, so that the pass's
                // time is the link's real rate and a switchover never waits on the receiver's backlog. What the
                // guest dirtied meanwhile joins the next pass.
                lost = try awaitApplied(pass: pass, on: reply, dropped: lost)
                dirty = zip(dirty, try harvest()).map { Array(Set($0).union($1)).sorted() }
                statistics = measure(pass: Int(pass), counts: counts, seconds: monotonicSeconds() - passStart,
                                     dirtyPages: dirty.reduce(0) { $0 + $1.count }, throttle: throttle)
            }
            lostChannels += lost
            history.append(statistics)
            forecast.update(history: history, elapsed: monotonicSeconds() - started, throttle: throttle, setupSeconds: phase.setupSeconds,
                            harvests: harvests, harvestSeconds: harvestSeconds, memoryPages: Int(layout.totalBytes / 4096))
            if isCancelled { throw MigrationError.cancelled }
            frames = lost.isEmpty ? dirty : try takeOver(lost.map(\.channel), dirty: dirty, streamers: streamers, held: held)
            pass += 1
            var decision = policy.decide(history: history, elapsed: monotonicSeconds() - started, throttle: throttle)
            // The pass after a loss also carries the lost channels' pages, which the dirty rate the policy judged leaves
            // out: it goes while the guest runs, and the policy judges again after it.
            if !lost.isEmpty, decision == .switchover || decision == .postCopy { decision = .nextPass }
            switch decision {
            case .switchover:
                return try switchOver(&phase, reply: reply, frames: frames, finalPass: pass, streamers: streamers, throttle: throttle)
            case .postCopy:
                return try postCopy(&phase, reply: reply, frames: frames, finalPass: pass, streamers: channelMap.live.map { streamers[$0] },
                                    setup: setup)
            case .throttle(let fraction):
                throttle = fraction
                source.setThrottle(fraction)
            case .nextPass:
                continue
            case .giveUp(let why):
                throw MigrationError.didNotConverge(why)
            }
        }
    }

    /// Tells the receiver that the pre-copy whose memory it keeps under `ticket` will not be resumed, so that it drops that
    /// memory now rather than at the end of its grace period (stream.md §6.15): one channel (from `openChannel(0)`) that
    /// carries the agreement, the guest's `layout`, the ticket with `discard` set, and END. Returns false when the
    /// receiver does not keep memory for resumes (it did not agree to `preCopyResume`), and so has none to drop.
    public static func discardKeptMemory(under ticket: ResumeTicket, layout: GuestMemoryLayout,
                                         openChannel: (Int) throws -> MigrationChannel) throws -> Bool {
        let channel = try openChannel(0)
        defer { channel.close() }
        let writer = RecordWriter(channel: channel, header: StreamHeader(features: .liveMigration, channel: 0, channelCount: 1,
                                                                         migrationID: UInt32.random(in: 1 ... .max)))
        try writer.send { encoder, out in
            encoder.encodeHeader(into: &out)
            encoder.encodeCapabilities(Capabilities(codecs: .all, maxChannels: 1, flags: [.preCopyResume]), agreed: false, into: &out)
            encoder.encodeLayout(layout, into: &out)
        }
        let reply = RecordReader(channel: channel)
        guard case .header = try reply.next(), case .capabilitiesAgreed(let agreed) = try reply.next() else {
            throw MigrationError.protocolViolation("the destination did not answer with its agreement")
        }
        guard agreed.flags.contains(.preCopyResume) else {
            try? writer.send { encoder, out in encoder.encodeAbort(Abort(reason: .sourceError, message: "nothing to discard"), into: &out) }
            return false
        }
        try writer.send { encoder, out in
            encoder.encodePreCopyTicket(PreCopyTicket(ticket: ticket, resume: false, discard: true), into: &out)
            encoder.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
        }
        guard case .end = try reply.next() else { throw MigrationError.protocolViolation("the destination did not end the stream") }
        return true
    }

    /// With `preCopyResume` agreed, tells the receiver this migration's ticket (stream.md §6.15): the one to resume, or a
    /// fresh one. Returns the pages the receiver kept for it, when it resumes them; nil for a migration from nothing.
    private func presentTicket(agreed: Capabilities, writer: RecordWriter, reply: RecordReader, layout: GuestMemoryLayout) throws -> DigestTracker? {
        guard agreed.flags.contains(.preCopyResume) else {
            if options.resumeTicket != nil {
                resumed = ResumedPreCopyReport(resumed: false, heldPages: 0, reason: "the destination cannot resume a pre-copy; all of memory is sent")
            }
            return nil
        }
        let ticket = options.resumeTicket ?? .random()
        self.ticket = ticket
        try writer.send { encoder, out in encoder.encodePreCopyTicket(PreCopyTicket(ticket: ticket, resume: options.resumeTicket != nil), into: &out) }
        guard options.resumeTicket != nil else { return nil }
        let held = DigestTracker(regions: layout.digestRegions)
        while true {
            switch try reply.next() {
            case .heldPages(let run):
                let inLayout = run.hashes.map { PageHash(low: $0.low, high: $0.high) }.withUnsafeBufferPointer { held.update(first: run.first, hashes: $0) }
                guard inLayout else {
                    throw MigrationError.protocolViolation("the destination holds pages \(run.first) ..< \(run.first + UInt64(run.hashes.count)), outside the layout")
                }
            case .preCopyResumed(let answer):
                guard answer.outcome == .resumed else {
                    let why = switch answer.outcome {
                    case .layoutDiffers: "the memory it kept for this migration has another layout"
                    case .peerDiffers: "the memory it kept for this migration came from another host"
                    default: "it keeps nothing for this migration (its grace period ended, another migration started, or it restarted)"
                    }
                    resumed = ResumedPreCopyReport(resumed: false, heldPages: 0, reason: "the destination cannot resume: \(why); all of memory is sent")
                    return nil
                }
                resumed = ResumedPreCopyReport(resumed: true, heldPages: Int(answer.heldPages), reason: nil)
                return held
            case .abort(let abort): throw MigrationError.peerAborted(reason: abort.reason.rawValue, message: abort.message)
            case let other: throw MigrationError.protocolViolation("expected the pages the destination kept, got \(other)")
            }
        }
    }

    /// Pauses the source, sends what is left and the device state, and hands over once the receiver has
    /// verified the memory digest. Returns the downtime: from the pause to the receiver's `started`.
    private func switchOver(_ phase: inout Phase, reply: RecordReader, frames: [[UInt64]], finalPass: UInt32,
                            streamers: [PageStreamer], throttle: Double) throws -> Double {
        let writers = phase.writers
        let pausedAt = monotonicSeconds()
        try guest { try source.pause() }
        phase.paused = true
        report(.switchover, pass: Int(finalPass), total: 0)
        try writers[0].send { encoder, out in encoder.encodeSwitchover(Switchover(finalPass: finalPass), into: &out) }
        // What the last pre-copy harvest found, plus what the guest dirtied since; a page in both goes once.
        var lastSets = frames.map { Set($0) }
        let map = channelMap
        try guest { try source.harvestDirtyFrames { lastSets[map.channel(of: $0)].insert($0) } }
        let last = lastSets.map { $0.sorted() }
        let counts = try sendPass(last, pass: finalPass, streamers: streamers, phase: .switchover).counts
        let final = measure(pass: Int(finalPass), counts: counts, seconds: monotonicSeconds() - pausedAt, dirtyPages: 0, throttle: throttle)
        history.append(final)
        _ = try sendBoundary(final, counts: counts, on: writers, phase: .switchover)
        let deviceState = try guest { try source.captureDeviceState() }

        // A lost channel's share is zero, on both sides: its pages went again on the others.
        var digest = MemoryDigest()
        for streamer in streamers { digest.add(PageHash(low: streamer.digest.digest.low, high: streamer.digest.digest.high)) }
        var sent = digest.bytes
        if corruptDigestForTesting { sent[0] ^= 1 }
        let digestRecord = DigestRecord(algorithm: DigestAlgorithm.pageSum128, digest: sent)
        for index in channelMap.live.dropFirst() {
            try writers[index].send { encoder, out in encoder.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out) }
        }
        try writers[0].send { encoder, out in
            for state in deviceState { encoder.encodeDeviceState(state, into: &out) }
            encoder.encodeVerify(digestRecord, into: &out)
        }

        switch try reply.nextSkippingAcknowledgements() {
        case .verified(let theirs) where theirs == digestRecord:
            break
        case .verified(let theirs):
            throw MigrationError.digestMismatch(sender: hex(digestRecord.digest), receiver: hex(theirs.digest))
        case .abort(let abort):
            throw MigrationError.peerAborted(reason: abort.reason.rawValue, message: abort.message)
        case let other:
            throw MigrationError.protocolViolation("expected verified, got \(other)")
        }
        try commit(&phase, reply: reply)
        let downtime = monotonicSeconds() - pausedAt
        // The guest runs at the destination now: END only closes the stream politely, and losing it loses nothing.
        try? writers[0].send { encoder, out in encoder.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out) }
        try? source.stopDirtyTracking()
        phase.tracking = false
        return downtime
    }

    /// Tells the receiver to start the guest, and waits until it says it did. Before COMMIT a cancel still rolls back;
    /// from then on it has no effect: the watchdog leaves the channels alone, unless it closed them already.
    private func commit(_ phase: inout Phase, reply: RecordReader) throws {
        if isCancelled { throw MigrationError.cancelled }
        let committing = gate.withLock { gate in
            if !gate.closedByWatchdog { gate.committedAt = monotonicSeconds() }
            return gate.committed
        }
        guard committing else { throw MigrationError.cancelled }
        // A COMMIT not written whole cannot be read whole (records are framed and checked), so a failure here
        // still rolls back; once it is written, the receiver may start the guest at any moment.
        try phase.writers[0].send { encoder, out in encoder.encodeCommit(into: &out) }
        phase.committed = true
        switch try reply.nextSkippingAcknowledgements() {
        case .started: break
        case .abort(let abort): throw MigrationError.peerAborted(reason: abort.reason.rawValue, message: abort.message)
        case let other: throw MigrationError.protocolViolation("expected started, got \(other)")
        }
        gate.withLock { $0.started = true }
    }

    /// Pauses the source, sends its device state and the list of pages the receiver lacks (what the last pass left,
    /// plus what the guest dirtied since), starts the destination, and then sends those pages while it runs: each
    /// one it asks for at once, the rest in the background (`PostCopySender`). Returns the downtime: from the pause to
    /// the receiver's `started`. The source stays paused until the receiver has verified the last page; from the
    /// commit on, a failure leaves it paused and in doubt, as after a pre-copy commit.
    private func postCopy(_ phase: inout Phase, reply: RecordReader, frames: [[UInt64]], finalPass: UInt32,
                          streamers: [PageStreamer], setup: StreamSetup) throws -> Double {
        let pausedAt = monotonicSeconds()
        try guest { try source.pause() }
        phase.paused = true
        // What the last pass left dirty and what the guest dirtied since, each frame once; sorting beats a set here,
        // and the time counts as downtime.
        var gathered = Array(frames.joined())
        try guest { try source.harvestDirtyFrames { gathered.append($0) } }
        gathered.sort()
        var missing: [UInt64] = []
        missing.reserveCapacity(gathered.count)
        for frame in gathered where frame != missing.last { missing.append(frame) }
        // Progress in post-copy counts the missing pages pushed: not the last pass's pages, which would show the push
        // as far along (or past 100 %) before the destination has even started the guest.
        pagesDone.reset()
        report(.postcopy, pass: Int(finalPass), total: missing.count)
        // The receiver holds stale versions of these frames, which leave both digests; each frame's latest version
        // enters the digest of whichever channel it goes on.
        let runs = FrameRun.runs(of: missing, in: source.layout)
        for streamer in streamers { streamer.digest.forget(runs) }
        let deviceState = try guest { try source.captureDeviceState() }
        try phase.writers[0].send { encoder, out in
            for state in deviceState { encoder.encodeDeviceState(state, into: &out) }
            encoder.encodeMissingPageRecords(runs, into: &out)
            encoder.encodePostCopy(PostCopyStart(finalPass: finalPass, missingPages: UInt64(missing.count)), into: &out)
        }
        switch try reply.nextSkippingAcknowledgements() {
        case .postCopyReady: break
        case .abort(let abort): throw MigrationError.peerAborted(reason: abort.reason.rawValue, message: abort.message)
        case let other: throw MigrationError.protocolViolation("expected post-copy ready, got \(other)")
        }
        try commit(&phase, reply: reply)
        let downtime = monotonicSeconds() - pausedAt
        pagesDone.reset()
        bytesInPass.reset()
        passStartedAt = monotonicSeconds()
        // One session per link: a broken one waits for a resume when the receiver agreed to it (stream.md §6.14).
        var session = (streamers: streamers, reply: reply, missing: missing)
        var retired: [PageStreamer] = [] // of broken sessions: their shares of the digest still count
        var totals = PostCopySender.Statistics(missingPages: missing.count)
        let postCopyStarted = monotonicSeconds()
        while true {
            var base = MemoryDigest()
            for streamer in retired { base.add(PageHash(low: streamer.digest.digest.low, high: streamer.digest.digest.high)) }
            let sender = PostCopySender(missing: session.missing, streamers: session.streamers, reply: session.reply, finalPass: finalPass,
                                        batchPages: options.batchPages, baseDigest: base, pagesDone: pagesDone, bytesSent: bytesInPass) { [self] in
                closeChannels()
            }
            do {
                totals.add(try sender.run(corruptDigest: corruptDigestForTesting) { report(.postcopy, pass: Int(finalPass), total: missing.count) })
                break
            } catch let error as MigrationError where setup.agreed.flags.contains(.resume) {
                guard case .channel = error else { throw error }
                totals.add(sender.statisticsSoFar)
                retired += session.streamers
                session = try awaitResume(after: error, finalPass: finalPass, missing: missing, setup: setup, phase: &phase)
                pagesDone.reset()
                bytesInPass.reset()
                // What the receiver still lacks may have gone before and been lost: it leaves the digest, and goes again.
                let runs = FrameRun.runs(of: session.missing, in: source.layout)
                for streamer in retired { streamer.digest.forget(runs) }
            }
        }
        totals.seconds = monotonicSeconds() - postCopyStarted
        wireBytes += totals.wireBytes
        postCopyReport = PostCopyReport(missingPages: totals.missingPages, requestedPages: totals.requestedPages,
                                        requests: totals.requests, wireBytes: totals.wireBytes, seconds: totals.seconds)
        try? source.stopDirtyTracking()
        phase.tracking = false
        return downtime
    }

    /// What a post-copy needs to open new streams when its link broke.
    private struct StreamSetup {
        let agreed: Capabilities
        let migrationID: UInt32
        let makeStreamer: (RecordWriter) throws -> PageStreamer
    }

    /// Carries on a post-copy whose link broke (`resume` agreed, stream.md §6.14): once the channels are closed, waits
    /// up to `options.postCopyRecoveryTimeout` for `resume`, opens as many channels as before (given, or opened as at
    /// the start), tells the receiver which pass it resumes, and learns which of `missing` it still lacks (the guest
    /// asked for some of them already: those requests follow). Returns the new session's streamers, reply and frames.
    /// A resume whose link fails again (the destination is still unreachable, or the new link breaks during the
    /// handshake) goes back to waiting, until the wait is over.
    private func awaitResume(after failure: MigrationError, finalPass: UInt32, missing: [UInt64], setup: StreamSetup,
                             phase: inout Phase) throws -> (streamers: [PageStreamer], reply: RecordReader, missing: [UInt64]) {
        let timeout = options.postCopyRecoveryTimeout
        let deadline = monotonicSeconds() + timeout
        var lastFailure = failure
        while true {
            closeChannels()
            guard let handed = resumePoint.wait(timeout: max(0, deadline - monotonicSeconds()),
                                                announce: { report(.postcopyPaused, pass: Int(finalPass), total: missing.count) }) else {
                throw MigrationError.channel("the post-copy link broke (\(failure)) and no resume came within \(timeout) s"
                                             + (lastFailure == failure ? "" : "; the last one failed: \(lastFailure)"))
            }
            do {
                return try reconnect(handed, finalPass: finalPass, missing: missing, setup: setup, phase: &phase)
            } catch let error as MigrationError {
                guard case .channel = error else { throw error }
                lastFailure = error
            }
        }
    }

    /// One attempt at resuming: opens (or takes) the channels, sends POSTCOPY_RESUME and reads what is still missing.
    private func reconnect(_ handed: [MigrationChannel]?, finalPass: UInt32, missing: [UInt64], setup: StreamSetup,
                           phase: inout Phase) throws -> (streamers: [PageStreamer], reply: RecordReader, missing: [UInt64]) {
        let count = options.channels
        var fresh: [MigrationChannel] = []
        do {
            if let handed {
                guard handed.count == count else {
                    throw MigrationError.protocolViolation("a post-copy of \(count) channels resumed with \(handed.count)")
                }
                fresh = handed
            } else {
                for index in 0 ..< count { fresh.append(try openChannel(index)) }
            }
        } catch {
            for channel in fresh { channel.close() }
            throw error as? MigrationError ?? .channel("reopening the post-copy's channels: \(error)")
        }
        opened.withLock { $0 = OpenedChannels(channels: fresh, closed: false) }
        let writers = fresh.indices.map { index in
            RecordWriter(channel: fresh[index], header: StreamHeader(features: .liveMigration, channel: UInt16(index), channelCount: UInt16(count),
                                                                 migrationID: setup.migrationID))
        }
        phase.writers = writers
        for (index, writer) in writers.enumerated() {
            if setup.agreed.flags.contains(.descriptorChecksum) { writer.encoder.checksumsPayload = false }
            try writer.send { encoder, out in
                encoder.encodeHeader(into: &out)
                if index == 0 { encoder.encodePostCopyResume(finalPass: finalPass, into: &out) }
                encoder.encodeLayout(source.layout, into: &out)
            }
        }
        let reply = RecordReader(channel: fresh[0])
        phase.reply = reply
        try expectReplyHeader(reply)
        guard try expectAgreed(reply) == setup.agreed else {
            throw MigrationError.protocolViolation("the resumed receiver agrees to something else")
        }
        var still: [UInt64] = []
        resumed: while true {
            switch try reply.nextSkippingAcknowledgements() {
            case .missingPages(let runs):
                for run in runs {
                    for frame in run.first ..< run.first + run.count {
                        guard missing.sortedIndex(of: frame) != nil else {
                            throw MigrationError.protocolViolation("the resumed receiver lacks page \(frame), which was never missing")
                        }
                        still.append(frame)
                    }
                }
            case .postCopy(let start) where start.finalPass == finalPass: break resumed
            case .abort(let abort): throw MigrationError.peerAborted(reason: abort.reason.rawValue, message: abort.message)
            case let other: throw MigrationError.protocolViolation("expected the pages still missing, got \(other)")
            }
        }
        return (try writers.map(setup.makeStreamer), reply, still)
    }

    /// Ends the pass on every channel in use: the receiver knows each channel's share of it is complete. The channels
    /// `lost` in the pass, and any other secondary one whose boundary fails to go when it may be lost alone, are named on
    /// the main channel before its boundary (stream.md §6.16). Returns them all.
    private func sendBoundary(_ statistics: PassStatistics, counts: PageStreamer.Counts, on writers: [RecordWriter], lost: [LostChannel] = [],
                              phase: MigrationProgress.Phase = .precopy) throws -> [LostChannel] {
        let boundary = PassBoundary(pass: UInt32(statistics.pass), dirtyPages: UInt64(statistics.dirtyPages),
                                    pagesSent: UInt64(counts.pages), zeroPages: UInt64(counts.zero),
                                    wireBytes: UInt64(counts.wireBytes), durationNanoseconds: UInt64(statistics.seconds * 1e9))
        var lost = lost
        // The secondary channels first: one lost here is still named before the main channel's boundary.
        for index in channelMap.live.dropFirst() where !lost.contains(where: { $0.channel == index }) {
            do {
                try writers[index].send { encoder, out in encoder.encodePassBoundary(boundary, into: &out) }
            } catch let error where losesOnly(index, to: error, in: phase) {
                channels[index].close()
                lost.append(LostChannel(channel: index, pass: statistics.pass, reason: "\(error)"))
            }
        }
        try writers[0].send { encoder, out in
            for loss in lost { encoder.encodeChannelLost(channel: UInt16(loss.channel), pass: UInt32(loss.pass), into: &out) }
            encoder.encodePassBoundary(boundary, into: &out)
        }
        return lost
    }

    /// Whether a failure of channel `index` in a pass of `phase` costs that channel only (stream.md §6.16): a secondary
    /// channel that failed as a channel, during pre-copy, with the receiver's agreement. Anything else, a cancel
    /// included, fails the migration.
    private func losesOnly(_ index: Int, to error: Error, in phase: MigrationProgress.Phase) -> Bool {
        guard losesChannels, index > 0, phase == .precopy, !isCancelled, case .channel = error as? MigrationError else { return false }
        return true
    }

    /// The frames written since the last harvest, per channel, in ascending order.
    private func harvest() throws -> [[UInt64]] {
        var dirty = [[UInt64]](repeating: [], count: options.channels)
        let start = monotonicSeconds()
        let map = channelMap
        try guest { try source.harvestDirtyFrames { dirty[map.channel(of: $0)].append($0) } }
        harvests += 1
        harvestSeconds += monotonicSeconds() - start
        return dirty
    }

    /// Waits for the receiver's word that pass `pass` is wholly in its memory, and, for each channel the sender `dropped`
    /// in the pass, that it is done with it (stream.md §6.16). On the way the receiver may name other channels it lost,
    /// which the sender closes too. Returns the channels lost in the pass. A cancel, or the time budget running out,
    /// ends the wait: the watchdog closes the channels, which fails the blocked read.
    private func awaitApplied(pass: UInt32, on reply: RecordReader, dropped: [LostChannel]) throws -> [LostChannel] {
        var lost = dropped
        var unconfirmed = Set(dropped.map(\.channel))
        var applied = false
        while !applied || !unconfirmed.isEmpty {
            switch try reply.next() {
            // The receiver's pass is this one, or the next when the channel failed after this pass's boundary went through.
            case .channelLost(let channel, let at) where at == pass || at == pass + 1:
                if unconfirmed.remove(Int(channel)) == nil {
                    channels[Int(channel)].close()
                    lost.append(LostChannel(channel: Int(channel), pass: Int(pass), reason: "the destination lost it"))
                }
            case .passApplied(let done) where done == pass && !applied: applied = true
            case .abort(let abort): throw MigrationError.peerAborted(reason: abort.reason.rawValue, message: abort.message)
            case let other: throw MigrationError.protocolViolation("expected pass \(pass) applied, got \(other)")
            }
        }
        return lost
    }

    /// Moves the frames of the channels `lost` in the pass just ended onto the channels left (stream.md §6.16), once the
    /// receiver has said that nothing more comes from them: every frame of such a channel that the receiver may hold a
    /// page of goes again in the next pass, zero pages included (the receiver keeps what the channel wrote until then),
    /// and the lost channels' shares leave the digest, as they have at the receiver. Frames of the channels left stay on
    /// them. `held` is what the receiver kept for a resumed pre-copy (§6.15). Returns the next pass's frames per channel:
    /// `dirty` with the lost channels' frames moved.
    private func takeOver(_ lost: [Int], dirty: [[UInt64]], streamers: [PageStreamer], held: DigestTracker?) throws -> [[UInt64]] {
        let before = channelMap
        for channel in lost { channelMap.lose(channel) }
        let gone = Set(lost), after = channelMap
        var moved = [[UInt64]](repeating: [], count: options.channels)
        func take(_ frame: UInt64) {
            if gone.contains(before.channel(of: frame)) { moved[after.channel(of: frame)].append(frame) }
        }
        // Every frame written is populated, so these include the lost channels' dirty frames; the others are frames the
        // source no longer populates: one a lost channel last sent with data, or that the receiver kept for a resume.
        try guest { try source.forEachPopulatedFrame(take) }
        for channel in lost {
            streamers[channel].digest.forEachHeld { frame, _ in take(frame) }
            streamers[channel].digest.reset()
        }
        held?.forEachHeld { frame, _ in take(frame) }
        return dirty.indices.map { channel in
            gone.contains(channel) ? [] : moved[channel].isEmpty ? dirty[channel] : (dirty[channel] + moved[channel]).sortedUnique
        }
    }

    /// Sends one pass on every channel in use at once, one thread each, reporting progress meanwhile: at once, so that
    /// the phase a client reads is the one the migration is in, then every quarter second. Returns what was sent, and
    /// the channels lost in the pass (stream.md §6.16); the others sent their whole share.
    private func sendPass(_ frames: [[UInt64]], pass: UInt32, streamers: [PageStreamer],
                          phase: MigrationProgress.Phase = .precopy) throws -> (counts: PageStreamer.Counts, lost: [LostChannel]) {
        let total = frames.reduce(0) { $0 + $1.count }
        pagesDone.reset()
        bytesInPass.reset()
        passStartedAt = monotonicSeconds()
        let results = Locked([Int: Result<PageStreamer.Counts, Error>]())
        let group = DispatchGroup()
        for index in channelMap.live {
            let streamer = streamers[index]
            group.enter()
            startThread(named: "migrate-send-\(index)") { [self] in
                let result = Result {
                    try streamer.send(frames: frames[index], pass: pass, skipHeld: pass == 0, progress: pagesDone, wireProgress: bytesInPass) { self.isCancelled }
                }
                if case .failure(let error) = result {
                    // A failed channel must not leave the others blocked on a peer that stopped reading, unless it is
                    // lost alone: then the others finish the pass.
                    if losesOnly(index, to: error, in: phase) { channels[index].close() } else { closeChannels() }
                }
                results.withLock { $0[index] = result }
                group.leave()
            }
        }
        report(phase, pass: Int(pass), total: total)
        while group.wait(timeout: .now() + 0.25) == .timedOut {
            report(phase, pass: Int(pass), total: total)
        }
        let all = results.withLock { $0 }.sorted { $0.key < $1.key }
        var counts = PageStreamer.Counts()
        // After a cancel, a channel may fail on one another closed: the cancel is the reason.
        if isCancelled, all.contains(where: { if case .failure = $0.value { true } else { false } }) {
            throw MigrationError.cancelled
        }
        // The first failure in channel order explains best; later ones are usually "closed" echoes of it.
        var lost: [LostChannel] = []
        for (index, result) in all {
            switch result {
            case .success(let partial): counts.add(partial)
            case .failure(let error) where losesOnly(index, to: error, in: phase):
                lost.append(LostChannel(channel: index, pass: Int(pass), reason: "\(error)"))
            case .failure(let error): throw error
            }
        }
        wireBytes += counts.wireBytes
        return (counts, lost)
    }

    private func measure(pass: Int, counts: PageStreamer.Counts, seconds: Double, dirtyPages: Int, throttle: Double) -> PassStatistics {
        var statistics = PassStatistics(pass: pass)
        statistics.pagesSent = counts.pages
        statistics.zeroPages = counts.zero
        statistics.rawPages = counts.raw
        statistics.compressedPages = counts.compressed
        statistics.unchangedPages = counts.unchanged
        statistics.payloadBytes = counts.payloadBytes
        statistics.wireBytes = counts.wireBytes
        statistics.seconds = seconds
        statistics.dirtyPages = dirtyPages
        statistics.throttle = throttle
        let bytesPerPage = counts.pages > counts.zero ? Double(counts.wireBytes) / Double(counts.pages - counts.zero) : 4096
        statistics.estimate(totalBytes: wireBytes, bytesPerDirtyPage: bytesPerPage, earlier: history)
        return statistics
    }

    private func report(_ phase: MigrationProgress.Phase, pass: Int, total: Int) {
        guard let onProgress else { return }
        let last = history.last
        // While pages flow, the rate of this pass so far; between passes, the last pass's.
        let inPass = phase == .precopy ? bytesInPass.count : 0
        let passSeconds = monotonicSeconds() - passStartedAt
        let rate = inPass > 0 && passSeconds > 0.05 ? Double(inPass) / passSeconds : last?.bandwidth ?? 0
        let done = pagesDone.count
        let secondsLeft = phase == .precopy && done > 0 && passSeconds > 0.05 ? Double(max(total - done, 0)) * passSeconds / Double(done) : nil
        onProgress(MigrationProgress(
            // In post-copy, the missing pages pushed so far (MigrationProgress.pagesDone says so): a daemon shows it.
            phase: phase, pass: pass, pagesDone: phase == .precopy || phase == .postcopy ? min(pagesDone.count, total) : total, pagesTotal: total,
            bytesOnWire: wireBytes + inPass, bandwidth: rate, dirtyRate: last?.dirtyRate ?? 0,
            expectedDowntime: last?.expectedDowntime ?? 0, throttle: last?.throttle ?? 0,
            elapsed: monotonicSeconds() - started, passSecondsLeft: secondsLeft, lostChannels: lostChannels.count,
            predictedSecondsLeft: forecast.secondsLeft(elapsed: monotonicSeconds() - started), predictedDowntime: forecast.downtime))
    }

    /// A channel that fails under the sender is often the consequence of the receiver giving up, which says why on
    /// its reply stream before it closes (an abort record): that reason, when it comes within a second, is the
    /// failure to report. The reply is read on a thread of its own, so that a receiver that is alive but silent
    /// costs the second and no more; closing the channels in `rollBack` ends that read.
    private func reasonFromPeer(for failure: MigrationError, reply: RecordReader?) -> MigrationError {
        guard case .channel = failure, let reply else { return failure }
        let found = PeerAbort()
        startThread(named: "migrate-abort-reason") {
            while let event = try? reply.next() {
                if case .abort(let abort) = event {
                    found.set(.peerAborted(reason: abort.reason.rawValue, message: abort.message))
                    break
                }
            }
            found.done.signal()
        }
        _ = found.done.wait(timeout: .now() + 1)
        return found.value ?? failure
    }

    /// Before commit: tell the receiver why (if the channel still works), lift the throttle, stop tracking,
    /// and let the guest run again. After commit the guest may run at the destination, so it stays paused here;
    /// throttle and tracking go all the same, so that a guest resumed here later runs as before the migration.
    private func rollBack(_ phase: Phase, _ failure: MigrationError) {
        if !phase.committed, let writer = phase.writers.first {
            try? writer.send { encoder, out in encoder.encodeAbort(Abort(reason: failure.abortReason, message: "\(failure)"), into: &out) }
        }
        source.setThrottle(0)
        if phase.tracking { try? source.stopDirtyTracking() }
        if phase.paused && !phase.committed { source.resume() }
        closeChannels()
    }

    private func makeReport(error: MigrationError?, setup: Double, downtime: Double?, committed: Bool) -> MigrationReport {
        MigrationReport(
            succeeded: error == nil, error: error.map { "\($0)" }, committed: committed, totalSeconds: monotonicSeconds() - started,
            setupSeconds: setup, downtimeSeconds: downtime, passes: history, wireBytes: wireBytes,
            pagesSent: history.reduce(0) { $0 + $1.pagesSent - ($1.pass == 0 ? $1.zeroPages : 0) },
            compression: options.compression.rawValue, channels: channels.count, lostChannels: lostChannels, harvests: harvests,
            harvestSeconds: harvestSeconds, postCopy: postCopyReport, predictions: forecast.predictions,
            // After a failure before commit, the destination may keep what it received (stream.md §6.15).
            resumeTicket: error != nil && !committed ? ticket : nil, resumedPreCopy: resumed)
    }

    // MARK: handshake

    private func expectReplyHeader(_ reply: RecordReader) throws {
        guard case .header(let header) = try reply.next() else { throw MigrationError.protocolViolation("reply stream without header") }
        guard header.channel == 0 else { throw MigrationError.protocolViolation("reply stream on channel \(header.channel)") }
    }

    private func expectAgreed(_ reply: RecordReader) throws -> Capabilities {
        switch try reply.next() {
        case .capabilitiesAgreed(let agreed): return agreed
        case .abort(let abort): throw MigrationError.peerAborted(reason: abort.reason.rawValue, message: abort.message)
        case let other: throw MigrationError.protocolViolation("expected agreed capabilities, got \(other)")
        }
    }

    private func checkAgreement(_ agreed: Capabilities) throws {
        guard Int(agreed.maxChannels) >= channels.count else {
            throw MigrationError.protocolViolation("receiver accepts \(agreed.maxChannels) channels, \(channels.count) are open")
        }
        let needed: CodecSet = switch options.compression {
        case .none: [.zero, .raw]
        case .lz4: [.zero, .raw, .lz4]
        case .zstd: [.zero, .raw, .zstd]
        case .adaptive: [.zero, .raw, .lz4, .zstd]
        }
        guard agreed.codecs.isSuperset(of: needed) else {
            throw MigrationError.protocolViolation("receiver lacks page encodings this migration uses (\(options.compression))")
        }
        // Post-copy reads the receiver's PASS_APPLIED to know that no stale page is still on its way in.
        if options.postCopy, !agreed.flags.isSuperset(of: [.postCopy, .passAcknowledgement]) {
            throw MigrationError.protocolViolation("the destination cannot finish in post-copy (its memory or version does not allow it)")
        }
    }

    /// Runs a call into the guest, turning its error into `MigrationError.guestFailed`.
    private func guest<R>(_ body: () throws -> R) throws -> R {
        do { return try body() } catch let error as MigrationError { throw error } catch {
            throw MigrationError.guestFailed("\(error)")
        }
    }
}

extension Array where Element == UInt64 {
    /// The elements in ascending order, each once.
    var sortedUnique: [UInt64] {
        var unique: [UInt64] = []
        unique.reserveCapacity(count)
        for element in sorted() where element != unique.last { unique.append(element) }
        return unique
    }
}

/// Bytes as lowercase hexadecimal, as reports and logs show digests.
public func hex(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined() }

/// The receiver's abort, if `reasonFromPeer` finds one.
///
/// Sendable: `found` is guarded by `lock`; `done` is a semaphore.
private final class PeerAbort: @unchecked Sendable {
    private let lock = NSLock()
    private var found: MigrationError?
    let done = DispatchSemaphore(value: 0)

    func set(_ error: MigrationError) { lock.withLock { found = error } }
    var value: MigrationError? { lock.withLock { found } }
}
