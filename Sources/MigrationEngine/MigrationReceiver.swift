import Foundation
import MigrationWire
import PageCodec
import Threads

/// The receiving half of a live migration: rebuilds the guest in a `GuestSink` from the sender's channels, and
/// starts it only after its memory digest equals the sender's and the sender commits.
///
/// Every byte from the peer passes the streaming decoder, which checks every length, count and page frame
/// against the declared layout before anything is written; pages then go straight into guest memory. On any
/// failure the sink is discarded: no half-built guest ever runs. With a `PreCopyLeftoverShelf`, a pre-copy whose link
/// broke (or whose sender gave up) leaves its memory there instead, never started, for a resumed migration to claim
/// (stream.md §6.15). A secondary channel that fails during pre-copy, with the sender's agreement, is lost alone
/// (stream.md §6.16): its pages come again on the others.
///
/// Sendable: `run` is called once, and `otherChannels`, `appliers`, `acknowledger` and `resumable` are set and read on
/// its thread only; `sink` changes only on that thread before any other thread of the migration starts; other threads
/// use only the Sendable `sink` and `channels`, and what is handed to them.
public final class MigrationReceiver: @unchecked Sendable {
    /// The guest being built: the sink given, or the one a resumed pre-copy left (`PreCopyLeftovers.sink`), in which
    /// case the one given is never prepared.
    public private(set) var sink: GuestSink
    /// Where memory of broken pre-copies waits for their resumes, and who the channels come from, as it keys them.
    public let leftoverShelf: PreCopyLeftoverShelf?
    public let peer: String
    /// After `run` failed: whether the memory received so far was left on the shelf rather than discarded.
    public private(set) var keptForResume = false
    /// What this migration may leave on the shelf if it fails before the guest starts: set once the ticket is read,
    /// cleared when the guest starts or post-copy begins.
    private var resumable: (ticket: ResumeTicket, layout: GuestMemoryLayout, writers: [PageWriter])?
    /// The channels in use: those given, or those of a resumed post-copy.
    public var channels: [MigrationChannel] { current.withLock { $0 } }
    private let current: Locked<[MigrationChannel]>
    /// How long a post-copy whose link broke waits for `resume(with:)` before it stops the guest (`resume` agreed).
    public var postCopyRecoveryTimeout: Double = 60
    /// Called when a post-copy's link broke and the receiver waits for a resume: why, and the seconds it will wait.
    public var onPostCopyPaused: (@Sendable (String, Double) -> Void)?
    private let resumePoint = ResumePoint()
    /// The migration ID of the sender's stream header, once `run` has read it: a resumed post-copy's new channels
    /// carry the same one, by which a listener tells them from a new migration's.
    public var migrationID: UInt32? { receivedID.withLock { $0 } }
    private let receivedID = Locked<UInt32?>(nil)
    /// What this side accepts; the agreed set is the intersection with the sender's offer.
    public let capabilities: Capabilities
    /// The threads reading channels 1..<N; waited for before the sink is discarded, so none writes into
    /// memory that is gone.
    private var otherChannels: ChannelThreads?
    /// One per channel: the threads that write pages into the sink; stopped before the sink is discarded.
    private var appliers: [PageApplier] = []
    /// Tells the sender which passes are in memory and which channels were lost; nil without `pass_acknowledgement`.
    private var acknowledger: PassAcknowledger?
    /// Guest memory with the pages still missing, from the start of post-copy until the last one came; closed before
    /// the sink is discarded, since vCPUs may wait in it.
    private var postCopy: PostCopyMemory?

    /// `leftoverShelf` lets this receiver resume a pre-copy whose memory waits there from `peer`, and leave its own
    /// there should its link break.
    public init(sink: GuestSink, channels: [MigrationChannel], capabilities: Capabilities? = nil,
                leftoverShelf: PreCopyLeftoverShelf? = nil, peer: String = "") {
        precondition(!channels.isEmpty)
        self.sink = sink
        self.leftoverShelf = leftoverShelf
        self.peer = peer
        current = Locked(channels)
        var flags: CapabilityFlags = [.wholeBatchCompression, .passAcknowledgement, .descriptorChecksum, .unchangedPages]
        if channels.count > 1 { flags.insert(.channelLoss) }
        // Post-copy places pages with userfaultfd, never straight into the mapping, where a missing page would fault.
        if sink.takesPostCopy && !sink.takesPagesInPlace { flags.formUnion([.postCopy, .resume]) }
        if leftoverShelf != nil { flags.insert(.preCopyResume) }
        self.capabilities = capabilities ?? Capabilities(codecs: .all, maxChannels: UInt16(channels.count), flags: flags)
    }

    public struct Report: Sendable, Equatable {
        public var passes: Int
        public var pagesWritten: Int
        /// Of those, pages received straight into guest memory (`GuestSink.takesPagesInPlace`).
        public var pagesReceivedInPlace: Int
        /// Pages the sender declared unchanged, not counted in `pagesWritten`: nothing was written for them.
        public var pagesUnchanged: Int
        public var deviceComponents: Int
        public var digest: String
        /// What went wrong after the guest started, if anything: STARTED could not be sent, or the sender's END did
        /// not come (the source died or the link broke at the last moment). The guest runs regardless.
        public var afterStart: String?
        /// Post-copy only: the pages that were missing when the guest started, those of them the guest touched
        /// before they came (each asked of the source once), and the seconds from the start until the last came.
        public var postCopyPages: Int = 0
        public var postCopyRequests: Int = 0
        public var postCopySeconds: Double?
        /// How long the guest's faults waited for their pages, from request to placement.
        public var postCopyFaultWaits: Percentiles?
        /// A resumed pre-copy (stream.md §6.15): the pages kept from the broken one that the migration started from.
        public var resumedFromPages: Int?
        /// The stream only told this receiver to drop the memory a broken pre-copy left (stream.md §6.15): no guest
        /// came, and the sink was never used. Whether there was memory to drop.
        public var droppedKeptMemory: Bool?
        /// Secondary channels lost during pre-copy, whose pages came again on the others (stream.md §6.16).
        public var lostChannels: [LostChannel] = []
    }

    /// Carries on a post-copy whose link broke, over `channels` (as many as before, freshly connected to the same
    /// sender). Returns false, using none of them, when no post-copy waits for a resume.
    public func resume(with channels: [MigrationChannel]) -> Bool { resumePoint.offer(channels) }

    /// Runs until the guest is started (returns) or the migration fails (throws, with the sink discarded).
    public func run() throws -> Report {
        let main = RecordReader(channel: channels[0], payloadsInPlace: sink.takesPagesInPlace)
        var reply: RecordWriter?
        do {
            let report = try receive(main, reply: &reply)
            for channel in channels { channel.close() }
            for applier in appliers { applier.stop() }
            return report
        } catch {
            var failure = error as? MigrationError ?? .guestFailed("\(error)")
            // The channels about to be closed fail as they close: none of them is a loss to take over (stream.md §6.16).
            try? acknowledger?.endLosses()
            if case .channel = failure, let others = otherChannels {
                // A failing secondary channel closes every channel to stop this one: its error is the cause.
                for channel in channels { channel.close() }
                do { try others.wait() } catch let cause as MigrationError {
                    if case .channel = cause {} else { failure = cause }
                } catch {}
            }
            if case .peerAborted = failure {} else if let reply {
                try? reply.send { encoder, out in
                    encoder.encodeAbort(Abort(reason: failure.abortReason == .sourceError ? .destinationError : failure.abortReason,
                                              message: "\(failure)"), into: &out)
                }
            }
            for channel in channels { channel.close() }
            try? otherChannels?.wait()
            if let leftovers = leftovers(after: failure) {
                leftoverShelf?.keep(leftovers)
                keptForResume = true
                throw failure
            }
            for applier in appliers { applier.abandon() }
            // A guest started in post-copy is stopped here: it cannot run without the pages that will not come now.
            postCopy?.close()
            sink.discard()
            throw failure
        }
    }

    /// The memory received so far, to be kept for a resume, when `failure` leaves it worth keeping (stream.md §6.15):
    /// the link broke or the sender gave up, before the guest started, with a ticket agreed. Every page read is written
    /// first, and the pages of a payload that stopped halfway into memory are hashed again where they lie.
    private func leftovers(after failure: MigrationError) -> PreCopyLeftovers? {
        guard leftoverShelf != nil, let (ticket, layout, writers) = resumable else { return nil }
        switch failure {
        case .channel, .peerAborted: break
        default: return nil
        }
        for applier in appliers { applier.stop() }
        guard appliers.allSatisfy({ $0.failed == nil }) else { return nil }
        let held = DigestTracker(regions: layout.digestRegions)
        var conflicting: [UInt64] = []
        for writer in writers {
            for frame in writer.tornFrames { writer.digest.update(frame: frame, page: UnsafeRawBufferPointer(start: sink.page(frame: frame), count: 4096)) }
            writer.digest.forEachHeld { frame, hash in
                if held.hash(of: frame) != .zero { conflicting.append(frame) }
                held.update(frame: frame, hash: hash)
            }
        }
        // Two channels hold the frame, and only memory knows which copy came last: a sender that keeps each frame on one
        // channel (stream.md §11) never causes this. A lost channel's pages left its digest but not memory (§6.16).
        for frame in conflicting + writers.flatMap(\.droppedFrames) {
            held.update(frame: frame, page: UnsafeRawBufferPointer(start: sink.page(frame: frame), count: 4096))
        }
        return PreCopyLeftovers(sink: sink, layout: layout, ticket: ticket, peer: peer, held: held)
    }

    private func receive(_ main: RecordReader, reply: inout RecordWriter?) throws -> Report {
        guard case .header(let header) = try main.next() else { throw MigrationError.protocolViolation("stream without header") }
        guard header.channel == 0, Int(header.channelCount) == channels.count else {
            throw MigrationError.protocolViolation("sender uses \(header.channelCount) channels, \(channels.count) are open")
        }
        guard header.pageSize == 4096 else { throw MigrationError.protocolViolation("page size \(header.pageSize) (4096 expected)") }
        receivedID.withLock { $0 = header.migrationID }
        guard case .capabilitiesOffer(let offer) = try main.next() else {
            throw MigrationError.protocolViolation("the main stream must offer capabilities first")
        }
        let agreed = capabilities.agreed(with: offer)
        main.decoder.hold(to: agreed)
        let writer = RecordWriter(channel: channels[0], header: StreamHeader(channel: 0, channelCount: header.channelCount))
        reply = writer
        try writer.send { encoder, out in
            encoder.encodeHeader(into: &out)
            encoder.encodeCapabilities(agreed, agreed: true, into: &out)
        }
        var event = try main.next()
        // The sender may copy the agreement onto its main channel before the layout (stream.md §6.2).
        if case .capabilitiesAgreed(let copy) = event {
            guard copy == agreed else {
                throw MigrationError.protocolViolation("the sender's copy of the agreement (\(copy)) differs from the receiver's (\(agreed))")
            }
            event = try main.next()
        }
        guard case .layout(let layout) = event else { throw MigrationError.protocolViolation("expected the memory layout") }
        var ticket: PreCopyTicket?
        var resumed: PreCopyLeftovers?
        if agreed.flags.contains(.preCopyResume) {
            guard case .preCopyTicket(let carried) = try main.next() else {
                throw MigrationError.protocolViolation("expected the pre-copy ticket after the layout (stream.md §6.15)")
            }
            ticket = carried
            if carried.discard {
                let dropped = leftoverShelf?.drop(carried.ticket, from: peer) ?? false
                try writer.send { encoder, out in encoder.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out) }
                guard case .end = try main.next() else { throw MigrationError.protocolViolation("a ticket that discards must end the stream") }
                return Report(passes: 0, pagesWritten: 0, pagesReceivedInPlace: 0, pagesUnchanged: 0, deviceComponents: 0, digest: "",
                              droppedKeptMemory: dropped)
            }
            let claim = leftoverShelf?.claim(carried, peer: peer, layout: layout)
            resumed = claim?.leftovers
            if carried.resume {
                try writer.send { encoder, out in
                    resumed?.encodeHeldPages(with: encoder, into: &out)
                    encoder.encodePreCopyResumed(PreCopyResumed(outcome: claim?.outcome ?? .nothingKept, heldPages: UInt64(resumed?.heldPages ?? 0)),
                                                 into: &out)
                }
            }
        }
        if let resumed {
            sink = resumed.sink
        } else {
            do { try sink.prepare(layout: layout) } catch { throw MigrationError.guestFailed("preparing memory: \(error)") }
        }

        let writers = (0 ..< channels.count).map { _ in PageWriter(sink: sink, layout: layout) }
        if let resumed {
            // Each channel's digest starts with the pages kept of the frames it carries (stream.md §6.15).
            resumed.held.forEachHeld { frame, hash in writers[channelIndex(of: frame, channels: writers.count)].digest.update(frame: frame, hash: hash) }
        }
        if let ticket { resumable = (ticket.ticket, layout, writers) }
        // Each channel's writer thread reports the passes it has written; once all have, the sender hears of it.
        let acknowledger = agreed.flags.contains(.passAcknowledgement)
            ? PassAcknowledger(channels: channels.count, reply: writer, losesChannels: agreed.flags.contains(.channelLoss)) : nil
        self.acknowledger = acknowledger
        appliers = writers.enumerated().map { index, pageWriter in
            PageApplier(writer: pageWriter, name: "migrate-write-\(index)") { pass in try acknowledger?.applied(pass: pass, channel: index) }
        }
        let appliers = self.appliers
        var others = startOtherChannels(layout: layout, agreed: agreed, appliers: appliers)
        otherChannels = others
        var main = main
        /// Post-copy: the guest runs, so a broken link waits for a resume rather than ending it all (§6.14).
        var postCopyRunning = false
        var deviceState: [DeviceState] = []
        var passes = 0
        var lastPass: UInt32?
        var verified = false
        var missing: [FrameRun] = []
        var postCopyStart: (pages: UInt64, at: Double)?
        var postCopyFinalPass: UInt32?
        /// Sends the page requests the guest made before STARTED went out, and from then on lets them go at once.
        var releaseRequests: () throws -> Void = {}
        var postCopyEnd: (requests: Int, seconds: Double, waits: Percentiles?)?
        func digest() -> DigestRecord {
            var digest = MemoryDigest()
            for writer in writers { digest.add(PageHash(low: writer.digest.digest.low, high: writer.digest.digest.high)) }
            return DigestRecord(algorithm: DigestAlgorithm.pageSum128, digest: digest.bytes)
        }
        func report(afterStart: String?) -> Report {
            Report(passes: passes, pagesWritten: writers.reduce(0) { $0 + $1.pagesWritten },
                   pagesReceivedInPlace: writers.reduce(0) { $0 + $1.pagesReceivedInPlace },
                   pagesUnchanged: writers.reduce(0) { $0 + $1.pagesUnchanged },
                   deviceComponents: deviceState.count, digest: hex(digest().digest), afterStart: afterStart,
                   postCopyPages: Int(postCopyStart?.pages ?? 0), postCopyRequests: postCopyEnd?.requests ?? 0,
                   postCopySeconds: postCopyEnd?.seconds, postCopyFaultWaits: postCopyEnd?.waits, resumedFromPages: resumed?.heldPages,
                   lostChannels: acknowledger?.lost ?? [])
        }
        /// Both the pre-copy and the post-copy handshakes end by comparing digests once every channel is done.
        func compareDigests(_ theirs: DigestRecord) throws -> DigestRecord {
            try others.wait()
            try appliers[0].drain()
            let ours = digest()
            guard theirs == ours else { throw MigrationError.digestMismatch(sender: hex(theirs.digest), receiver: hex(ours.digest)) }
            return ours
        }
        while true {
            let event: StreamEvent
            do {
                event = try main.next()
            } catch let error as MigrationError where postCopyRunning && agreed.flags.contains(.resume) {
                guard case .channel = error, let memory = postCopy, let finalPass = postCopyFinalPass else { throw error }
                (main, others) = try resumePostCopy(after: error, old: others, memory: memory, finalPass: finalPass,
                                                    migrationID: header.migrationID, layout: layout, agreed: agreed, reply: writer)
                otherChannels = others
                continue
            }
            switch event {
            case .pageBatch(let batch):
                try appliers[0].submit(batch)
            case .pageBatchAwaitingPayload(let batch):
                try appliers[0].receiveInPlace(batch, from: main)
            case .passBoundary(let boundary):
                passes += 1
                lastPass = boundary.pass
                try appliers[0].passEnded(boundary.pass)
            case .switchover(let switchover):
                try acknowledger?.endLosses(finalPass: switchover.finalPass)
            case .channelLost(let channel, _):
                // The sender dropped it (stream.md §6.16): closed here too, its reader applies what it read and says so.
                channels[Int(channel)].close()
            case .deviceState(let state):
                deviceState.append(state)
            case .missingPages(let runs):
                missing += runs
            case .postCopy(let start):
                resumable = nil
                // Every page of the pre-copy passes must be in memory before the stale ones are dropped: the sender
                // waits for PASS_APPLIED of the last one before it switches (stream.md §6.13).
                guard let acknowledger, let lastPass, acknowledger.hasApplied(pass: lastPass) else {
                    throw MigrationError.protocolViolation("post-copy started before the pre-copy passes were applied")
                }
                try acknowledger.endLosses(finalPass: start.finalPass)
                do { try sink.restore(deviceState: deviceState) } catch { throw MigrationError.guestFailed("restoring device state: \(error)") }
                // The guest may fault between its start and STARTED going out; its requests wait for STARTED, which the
                // sender reads first (stream.md §10.4).
                let heldRequests = Locked<[UInt64]?>([])
                releaseRequests = {
                    let held = heldRequests.withLock { held in
                        defer { held = nil }
                        return held ?? []
                    }
                    if !held.isEmpty { try writer.send { encoder, out in encoder.encodePageRequests(held, into: &out) } }
                }
                let memory = try PostCopyMemory(sink: sink, layout: layout, missing: missing) { frame in
                    let held = heldRequests.withLock { held in
                        held?.append(frame)
                        return held != nil
                    }
                    // Fails only when the link does, which the channels' threads report.
                    if !held { try? writer.send { encoder, out in encoder.encodePageRequest([frame], into: &out) } }
                }
                postCopy = memory
                // The missing frames' stale versions leave the digest; their latest ones enter it as they come, on
                // whichever channel. The appliers are idle: every page before this record is applied (checked above).
                for writer in writers { writer.forget(missing) }
                for writer in writers { writer.postCopy.withLock { $0 = memory } }
                memory.serve()
                postCopyStart = (start.missingPages, 0)
                postCopyFinalPass = start.finalPass
                try writer.send { encoder, out in encoder.encodePostCopyReady(into: &out) }
            case .verify(let theirs):
                // From here on the device state is restored into the sink, or post-copy runs: nothing to resume.
                resumable = nil
                let ours = try compareDigests(theirs)
                if let memory = postCopy, let started = postCopyStart {
                    guard memory.missingCount == 0 else {
                        throw MigrationError.protocolViolation("\(memory.missingCount) pages missing at the start of post-copy never came")
                    }
                    memory.close()
                    postCopyEnd = (memory.requestsSent, monotonicSeconds() - started.at, Percentiles(memory.faultWaits))
                    var afterStart: String?
                    do {
                        try writer.send { encoder, out in
                            encoder.encodeVerified(ours, into: &out)
                            encoder.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
                        }
                        try Self.awaitEnd(main)
                    } catch {
                        afterStart = "\(error)"
                    }
                    return report(afterStart: afterStart)
                }
                do { try sink.restore(deviceState: deviceState) } catch { throw MigrationError.guestFailed("restoring device state: \(error)") }
                try writer.send { encoder, out in encoder.encodeVerified(ours, into: &out) }
                verified = true
            case .commit where postCopy != nil:
                do { try sink.start() } catch { throw MigrationError.guestFailed("starting the guest: \(error)") }
                postCopyStart?.at = monotonicSeconds()
                try writer.send { encoder, out in encoder.encodeStarted(into: &out) }
                try releaseRequests()
                postCopyRunning = true
            case .commit:
                resumable = nil
                do { try sink.start() } catch { throw MigrationError.guestFailed("starting the guest: \(error)") }
                // The guest runs from here on, and its source stays paused until it reads STARTED, or died: nothing
                // that fails now may discard the guest, so it is only reported.
                var afterStart: String?
                do {
                    try writer.send { encoder, out in
                        encoder.encodeStarted(into: &out)
                        encoder.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
                    }
                    try Self.awaitEnd(main)
                } catch {
                    afterStart = "\(error)"
                }
                return report(afterStart: afterStart)
            case .end:
                guard verified else { throw MigrationError.protocolViolation("stream ended before the switchover") }
                return report(afterStart: nil)
            case .abort(let abort):
                throw MigrationError.peerAborted(reason: abort.reason.rawValue, message: abort.message)
            case .note, .skippedOptional:
                continue
            case let other:
                throw MigrationError.protocolViolation("unexpected \(other) on the main channel")
            }
        }
    }

    /// A post-copy whose link broke (stream.md §6.14): the guest runs on, its faults wait; every batch already read
    /// goes into memory; then the receiver waits up to `postCopyRecoveryTimeout` for new channels (`resume(with:)`),
    /// checks that they carry on this migration, tells the sender which pages are still missing and which of them
    /// the guest asked for already, and carries on reading. Returns the new main reader and secondary threads.
    private func resumePostCopy(after failure: MigrationError, old others: ChannelThreads, memory: PostCopyMemory, finalPass: UInt32,
                                migrationID: UInt32, layout: GuestMemoryLayout, agreed: Capabilities,
                                reply: RecordWriter) throws -> (RecordReader, ChannelThreads) {
        for channel in channels { channel.close() }
        try? others.wait()
        for applier in appliers { try applier.drain() }
        let timeout = postCopyRecoveryTimeout
        let deadline = monotonicSeconds() + timeout
        var lastFailure: MigrationError?
        // Channels that do not carry this migration on, or whose link fails again during the handshake, cost that
        // attempt only: the guest waits on until the wait is over.
        while true {
            guard let handed = resumePoint.wait(timeout: max(0, deadline - monotonicSeconds()),
                                                announce: { onPostCopyPaused?("\(lastFailure ?? failure)", max(0, deadline - monotonicSeconds())) }),
                  let fresh = handed else {
                throw MigrationError.channel("the post-copy link broke (\(failure)) and no resume came within \(timeout) s"
                                             + (lastFailure.map { "; the last one failed: \($0)" } ?? ""))
            }
            do {
                return try carryOn(over: fresh, memory: memory, finalPass: finalPass, migrationID: migrationID, layout: layout,
                                   agreed: agreed, reply: reply)
            } catch {
                for channel in fresh { channel.close() }
                lastFailure = error as? MigrationError ?? .channel("\(error)")
            }
        }
    }

    /// One attempt at resuming over `fresh`: checks that it carries this post-copy on, tells the sender what is still
    /// missing, and starts reading the secondary channels.
    private func carryOn(over fresh: [MigrationChannel], memory: PostCopyMemory, finalPass: UInt32, migrationID: UInt32,
                         layout: GuestMemoryLayout, agreed: Capabilities, reply: RecordWriter) throws -> (RecordReader, ChannelThreads) {
        guard fresh.count == appliers.count else {
            throw MigrationError.protocolViolation("a post-copy of \(appliers.count) channels resumed with \(fresh.count)")
        }
        current.withLock { $0 = fresh }
        let main = RecordReader(channel: fresh[0])
        main.decoder.hold(to: agreed)
        guard case .header(let header) = try main.next(), header.channel == 0, Int(header.channelCount) == fresh.count,
              header.migrationID == migrationID else {
            throw MigrationError.protocolViolation("the resumed main channel does not carry on migration \(migrationID)")
        }
        guard case .postCopyResume(let pass) = try main.next(), pass == finalPass else {
            throw MigrationError.protocolViolation("the resumed main channel does not resume post-copy pass \(finalPass)")
        }
        guard case .layout(let theirs) = try main.next(), theirs == layout else {
            throw MigrationError.protocolViolation("the resumed main channel declares another memory layout")
        }
        let (runs, requested) = memory.stillMissing()
        reply.redirect(to: fresh[0], header: StreamHeader(channel: 0, channelCount: UInt16(fresh.count), migrationID: migrationID))
        try reply.send { encoder, out in
            encoder.encodeHeader(into: &out)
            encoder.encodeCapabilities(agreed, agreed: true, into: &out)
            encoder.encodeMissingPageRecords(runs, into: &out)
            encoder.encodePostCopy(PostCopyStart(finalPass: finalPass, missingPages: runs.reduce(0) { $0 + $1.count }), into: &out)
            encoder.encodePageRequests(requested, into: &out)
        }
        return (main, startOtherChannels(layout: layout, agreed: agreed, appliers: appliers))
    }

    /// Reads the main channel up to the sender's END after STARTED, past notes and optional records.
    private static func awaitEnd(_ main: RecordReader) throws {
        while true {
            switch try main.next() {
            case .end: return
            case .note, .skippedOptional: continue
            case let other: throw MigrationError.protocolViolation("expected end after commit, got \(other)")
            }
        }
    }

    /// Reads channels 1..<N on threads of their own, held to the agreement, each handing its pages to its own applier.
    /// A channel lost during pre-copy (stream.md §6.16) ends its thread without an error.
    private func startOtherChannels(layout: GuestMemoryLayout, agreed: Capabilities, appliers: [PageApplier]) -> ChannelThreads {
        let threads = ChannelThreads()
        let acknowledger = acknowledger
        for index in channels.indices.dropFirst() {
            threads.start(name: "migrate-receive-\(index)") { [self] in
                let reader = RecordReader(channel: channels[index], payloadsInPlace: sink.takesPagesInPlace)
                reader.decoder.hold(to: agreed)
                /// The first pass whose boundary this channel has not brought.
                var pass: UInt32 = 0
                do {
                    guard case .header(let header) = try reader.next(), Int(header.channel) == index,
                          Int(header.channelCount) == channels.count, header.pageSize == 4096 else {
                        throw MigrationError.protocolViolation("channel \(index) does not open as channel \(index) of \(channels.count) with 4096-byte pages")
                    }
                    guard case .layout(let theirs) = try reader.next(), theirs == layout else {
                        throw MigrationError.protocolViolation("channel \(index) declares another memory layout")
                    }
                    while true {
                        switch try reader.next() {
                        case .pageBatch(let batch): try appliers[index].submit(batch)
                        case .pageBatchAwaitingPayload(let batch): try appliers[index].receiveInPlace(batch, from: reader)
                        case .passBoundary(let boundary):
                            try appliers[index].passEnded(boundary.pass)
                            pass = boundary.pass + 1
                        case .note, .skippedOptional: continue
                        case .end: return try appliers[index].drain()
                        case .abort(let abort): throw MigrationError.peerAborted(reason: abort.reason.rawValue, message: abort.message)
                        case let other: throw MigrationError.protocolViolation("unexpected \(other) on channel \(index)")
                        }
                    }
                } catch {
                    var failure: Error? = error
                    if let acknowledger, acknowledger.losesChannels, case .channel = error as? MigrationError {
                        failure = lose(index, pass: pass, after: error, applier: appliers[index], acknowledger: acknowledger)
                    }
                    guard let failure else { return }
                    // Unblock the main channel, which may be waiting for records this channel's failure will stop; the
                    // channels that fail from that are no losses.
                    try? acknowledger?.endLosses()
                    for channel in channels { channel.close() }
                    throw failure
                }
            }
        }
        return threads
    }

    /// Loses secondary channel `index`, whose link failed (`failure`) before it brought the boundary of `pass`
    /// (stream.md §6.16), unless it is too late for that (the final pass began): closes it, so that the sender's writes
    /// there fail too; writes into guest memory every batch read from it; takes its share out of the digest, since the
    /// sender sends every frame of it this side may hold a page of again on the channels left; and only then tells the
    /// sender, which waits for that before it sends any of them. Returns nil once the channel is lost, or the error that fails
    /// the migration: `failure` when it may not be lost, with nothing changed (a post-copy may still resume), or what
    /// went wrong on the way.
    private func lose(_ index: Int, pass: UInt32, after failure: Error, applier: PageApplier, acknowledger: PassAcknowledger) -> Error? {
        guard acknowledger.admitLoss(channel: index, pass: pass, reason: "\(failure)") else { return failure }
        channels[index].close()
        do {
            try applier.drain()
            applier.writer.forgetAll()
            try acknowledger.announceLoss(channel: index, pass: pass)
            return nil
        } catch {
            return error
        }
    }
}

/// Writes one channel's page batches on a thread of its own, so that receiving and checking the next batches
/// (TLS, CRC, decoding) overlaps with decompressing and writing this one. At most a few batches wait between
/// the two; their bytes stay in the decoder's buffers, which are not reused while a batch holds them.
///
/// Sendable: `failure` is guarded by `lock`; `queuedWrites` belongs to the channel's thread alone; work reaches the
/// applier's thread through `queue`.
final class PageApplier: @unchecked Sendable {
    let writer: PageWriter
    private enum Work { case batch(PageBatch), hashInPlace(PageBatch), passEnded(UInt32), flush(DispatchSemaphore) }
    /// Whether batches were queued that this thread will write into guest memory; the channel's thread only.
    private var queuedWrites = false
    private let queue = HandOff<Work>([], capacity: 4)
    private let lock = NSLock()
    private var failure: Error?
    private let finished = DispatchSemaphore(value: 0)

    /// `written` is called on this applier's thread once every batch of a pass that ended is in guest memory.
    init(writer: PageWriter, name: String, written: @escaping @Sendable (UInt32) throws -> Void) {
        self.writer = writer
        startThread(named: name) { [self] in
            while let work = queue.take() {
                guard lock.withLock({ failure == nil }) else {
                    if case .flush(let done) = work { done.signal() }
                    continue
                }
                do {
                    switch work {
                    case .batch(let batch): try writer.apply(batch)
                    case .hashInPlace(let batch): writer.hashInPlace(batch)
                    case .passEnded(let pass): try written(pass)
                    case .flush(let done): done.signal()
                    }
                } catch {
                    lock.withLock { failure = error }
                }
            }
            finished.signal()
        }
    }

    /// Queues a batch; throws with the error of an earlier batch, if one failed.
    func submit(_ batch: PageBatch) throws {
        try rethrowFailure()
        queuedWrites = true
        queue.put(.batch(batch))
    }

    /// Receives a batch's payload straight into guest memory on the calling channel's thread, zeroes its zero
    /// pages there too, and queues the batch for hashing. Memory writes stay in stream order: batches queued
    /// before, which this thread would write later, are written first.
    func receiveInPlace(_ batch: PageBatch, from reader: RecordReader) throws {
        if queuedWrites {
            try drain()
            queuedWrites = false
        }
        try writer.receiveInPlace(batch, from: reader)
        try rethrowFailure()
        queue.put(.hashInPlace(batch))
    }

    /// Marks the end of a pass on this channel: reported once the batches before it are written.
    func passEnded(_ pass: UInt32) throws {
        try rethrowFailure()
        queue.put(.passEnded(pass))
    }

    /// Returns once every batch submitted so far is in guest memory; throws if one failed.
    func drain() throws {
        let done = DispatchSemaphore(value: 0)
        queue.put(.flush(done))
        done.wait()
        try rethrowFailure()
    }

    /// Ends the thread once it has written what it was given, and waits for it. Idempotent.
    func stop() {
        queue.close()
        finished.wait()
        finished.signal()
    }

    /// Ends the thread after the batch it is writing, skipping those still queued (the migration failed and its
    /// memory will be discarded), and waits for it.
    func abandon() {
        lock.withLock { if failure == nil { failure = MigrationError.cancelled } }
        stop()
    }

    /// The error of a batch that failed, if one did.
    var failed: Error? { lock.withLock { failure } }

    private func rethrowFailure() throws {
        if let failed { throw failed }
    }
}

/// Writes the pages of one channel into guest memory and keeps that channel's share of the memory digest,
/// hashing each page as it is handed to the sink, once decompressed. Batches reach it checked by the decoder,
/// format and agreement both.
///
/// Sendable by thread discipline: the channel's thread alone calls `receiveInPlace` (with `channelExpander`), the
/// applier's thread alone calls `apply` and `hashInPlace` (with `applierExpander`, `runs`, `batchPayload`, the
/// digest and the counters). Others read the digest and counters only after `PageApplier.stop()` has joined the
/// applier's thread, or after its `drain()` with nothing queued since: the receiver's thread between passes (`forget`),
/// a lost channel's thread (`forgetAll`), the receiver's thread once every channel is done.
final class PageWriter: @unchecked Sendable {
    let digest: DigestTracker
    /// One per thread that expands pages: the applier's (`apply`) and the channel's (`receiveInPlace`).
    private let applierExpander = PageExpander(), channelExpander = PageExpander()
    private var batchPayload: UnsafeMutableRawBufferPointer?
    /// A batch goes to the sink in one run per stretch of consecutive frames, never split further.
    private var runs: SinkRuns
    /// For batches received in place, which bypass `runs`.
    private let sink: GuestSink
    private(set) var pagesWritten = 0
    private(set) var pagesReceivedInPlace = 0
    /// Pages the sender declared unchanged (stream.md §6.4.1): left as they were, in memory and in the digest.
    private(set) var pagesUnchanged = 0
    /// The frames of a batch whose payload stopped halfway into guest memory (the channel broke): what they hold is
    /// neither their old version nor their new one, and neither is in the digest. The channel's thread only.
    private(set) var tornFrames: [UInt64] = []
    /// The frames whose pages a lost channel had written (`forgetAll`): in memory, no longer in the digest. The channel's
    /// thread only, until it has ended.
    private(set) var droppedFrames: [UInt64] = []
    /// Set at the start of post-copy, from the receiver's thread while this writer is idle: pages then go in through
    /// it, each missing frame once, and nothing else.
    let postCopy = Locked<PostCopyMemory?>(nil)

    init(sink: GuestSink, layout: GuestMemoryLayout) {
        self.sink = sink
        runs = SinkRuns(sink: sink, maximumRun: WireLimits.v1.maxPagesPerBatch)
        digest = DigestTracker(regions: layout.digestRegions)
    }

    deinit { batchPayload?.deallocate() }

    /// On the channel's thread: receives an uncompressed batch into guest memory (the decoder has checked the
    /// frames against the layout): raw pages straight to their place, pages compressed one by one into scratch
    /// and then expanded into their place; zero pages are zeroed there. `hashInPlace` then does the rest.
    func receiveInPlace(_ batch: PageBatch, from reader: RecordReader) throws {
        for page in batch.pages where page.encoding == .raw && page.length != 4096 {
            throw MigrationError.malformedStream("raw page \(page.frame) of \(page.length) bytes")
        }
        let compressed = channelExpander.scratch(for: batch.pages)
        var slot = 0
        do {
            try reader.receivePayload { page in
                guard page.encoding != .raw else { return sink.page(frame: page.frame) }
                defer { slot += 1 }
                return compressed.baseAddress! + slot * 4096
            }
        } catch {
            tornFrames += batch.pages.map(\.frame)
            throw error
        }
        slot = 0
        for page in batch.pages {
            switch page.encoding {
            case .raw, .unchanged: continue
            case .zero: try sink.zero(frames: page.frame, count: 1)
            case .lz4, .zstd:
                try channelExpander.expand(page, UnsafeRawBufferPointer(start: compressed.baseAddress! + slot * 4096, count: page.length),
                                           into: UnsafeMutableRawBufferPointer(start: sink.page(frame: page.frame), count: 4096))
                slot += 1
            }
        }
    }

    /// On the applier's thread: adds a batch received in place to the digest, from guest memory. A later batch
    /// may have changed a page since; that batch's hash, taken after, is the one that stays. An unchanged page
    /// keeps its memory and its hash.
    func hashInPlace(_ batch: PageBatch) {
        var unchanged = 0
        for page in batch.pages {
            switch page.encoding {
            case .unchanged: unchanged += 1
            case .zero: digest.updateZero(frame: page.frame)
            case .raw, .lz4, .zstd:
                digest.update(frame: page.frame, page: UnsafeRawBufferPointer(start: sink.page(frame: page.frame), count: 4096))
                pagesReceivedInPlace += 1
            }
        }
        pagesWritten += batch.pages.count - unchanged
        pagesUnchanged += unchanged
    }

    /// Takes the frames of `runs` out of the digest: their versions here are stale, and post-copy brings the latest.
    /// Called while the applier's thread is idle, between two passes.
    func forget(_ runs: [FrameRun]) {
        digest.forget(runs)
    }

    /// Takes every frame out of the digest: this writer's channel is lost, and the sender sends every frame of it that
    /// this side may hold a page of again on the others (stream.md §6.16). Memory keeps what the channel wrote until
    /// then; `droppedFrames` says where, for memory kept for a resume, which must know what it holds (§6.15). On the
    /// channel's thread, once the applier has drained, with nothing queued after.
    func forgetAll() {
        digest.forEachHeld { frame, _ in droppedFrames.append(frame) }
        digest.reset()
    }

    func apply(_ batch: PageBatch) throws {
        if batch.compression == .none {
            try batch.payload.withUnsafeBytes { try write(batch.pages, payload: $0) }
            return
        }
        // A batch compressed as a whole: expand its payload (its length is bounded by the decoder) first.
        if (batchPayload?.count ?? 0) < batch.uncompressedPayloadLength {
            batchPayload?.deallocate()
            batchPayload = .allocate(byteCount: batch.uncompressedPayloadLength, alignment: 64)
        }
        let expanded = UnsafeMutableRawBufferPointer(rebasing: batchPayload![0 ..< batch.uncompressedPayloadLength])
        do {
            try batch.payload.withUnsafeBytes { try applierExpander.codec(batch.compression == .lz4 ? .lz4 : .zstd).decompress($0, into: expanded) }
        } catch {
            throw MigrationError.malformedStream("batch \(batch.sequence) of channel \(batch.channel): payload does not decompress (\(error))")
        }
        try write(batch.pages, payload: UnsafeRawBufferPointer(expanded))
    }

    /// Hands the batch's pages to the sink in runs of consecutive frames (`SinkRuns`). Pages compressed one by
    /// one are expanded into scratch first.
    private func write(_ pages: [PageDescriptor], payload: UnsafeRawBufferPointer) throws {
        let expanded = applierExpander.scratch(for: pages)
        var expandedCount = 0, unchanged = 0
        let postCopy = self.postCopy.withLock { $0 }
        func place(_ frame: UInt64, _ contents: UnsafeRawPointer?) throws {
            if let postCopy { try postCopy.place(frame: frame, contents: contents) } else { try runs.add(frame: frame, contents: contents) }
        }
        for page in pages {
            let bytes = UnsafeRawBufferPointer(rebasing: payload[page.offset ..< page.offset + page.length])
            let contents: UnsafeRawPointer
            switch page.encoding {
            case .unchanged:
                // The page holds what the sender last sent of it; a wrong claim leaves it stale, and the digests differ.
                // In post-copy only the latest versions of missing pages come, which the receiver cannot hold yet.
                if postCopy != nil { throw MigrationError.malformedStream("unchanged page \(page.frame) in post-copy") }
                unchanged += 1
                continue
            case .zero:
                try place(page.frame, nil)
                digest.updateZero(frame: page.frame)
                continue
            case .raw:
                guard bytes.count == 4096 else { throw MigrationError.malformedStream("raw page \(page.frame) of \(bytes.count) bytes") }
                contents = bytes.baseAddress!
            case .lz4, .zstd:
                let target = UnsafeMutableRawBufferPointer(rebasing: expanded[expandedCount * 4096 ..< (expandedCount + 1) * 4096])
                try applierExpander.expand(page, bytes, into: target)
                expandedCount += 1
                contents = UnsafeRawPointer(target.baseAddress!)
            }
            digest.update(frame: page.frame, page: UnsafeRawBufferPointer(start: contents, count: 4096))
            try place(page.frame, contents)
        }
        // The pages point into this batch's payload and scratch: all of them go to the sink before returning.
        try runs.flush()
        pagesWritten += pages.count - unchanged
        pagesUnchanged += unchanged
    }
}

/// Decompresses pages compressed one by one, with its own codecs and scratch: one per thread.
final class PageExpander {
    private let lz4 = try! BlockCompressor(.lz4(acceleration: 1))
    private let zstd = try! BlockCompressor(.zstd(level: 1))
    private var pageScratch: UnsafeMutableRawBufferPointer?

    deinit { pageScratch?.deallocate() }

    func codec(_ encoding: PageEncoding) -> BlockCompressor { encoding == .lz4 ? lz4 : zstd }

    /// A page of room for each of `pages` that is compressed one by one, in order.
    func scratch(for pages: [PageDescriptor]) -> UnsafeMutableRawBufferPointer {
        let needed = pages.count { $0.encoding == .lz4 || $0.encoding == .zstd } * 4096
        if (pageScratch?.count ?? 0) < needed {
            pageScratch?.deallocate()
            pageScratch = .allocate(byteCount: needed, alignment: 4096)
        }
        return pageScratch.map { UnsafeMutableRawBufferPointer(rebasing: $0[0 ..< needed]) } ?? UnsafeMutableRawBufferPointer(start: nil, count: 0)
    }

    /// Expands `bytes`, page `page` compressed on its own, into the page at `target`.
    func expand(_ page: PageDescriptor, _ bytes: UnsafeRawBufferPointer, into target: UnsafeMutableRawBufferPointer) throws {
        do {
            try codec(page.encoding).decompress(bytes, into: target)
        } catch {
            throw MigrationError.malformedStream("page \(page.frame) does not decompress to 4096 bytes (\(page.encoding))")
        }
    }
}

/// Tells the sender, on the reply stream, when a pre-copy pass is wholly in guest memory: once every channel's
/// writer thread has written all its batches up to that pass's boundary. The sender waits for this before it
/// measures the dirty set, so that what the receiver still had queued is neither counted as sent nor left for the
/// downtime.
///
/// With `channel_loss` agreed, a secondary channel lost during pre-copy (stream.md §6.16) stops counting: its loss goes
/// to the sender first, then every pass the channels left have all written.
///
/// Sendable: its state is locked, and records go out under that lock, so that they leave in the order the state
/// changed: passes in order, a loss before the first PASS_APPLIED that counts without the channel.
final class PassAcknowledger: Sendable {
    private struct State {
        /// The channels that count.
        var channels: Set<Int>
        /// Per pass still open: the channels that have written it.
        var written: [UInt32: Set<Int>] = [:]
        /// The last pass every channel that counts has written.
        var lastComplete: UInt32?
        var lost: [LostChannel] = []
        /// Set once the final pass begins, which needs every channel it runs on.
        var lossesEnded = false
    }
    /// Whether a secondary channel may be lost during pre-copy: agreed with the sender.
    let losesChannels: Bool
    private let reply: RecordWriter
    private let state: Locked<State>

    init(channels: Int, reply: RecordWriter, losesChannels: Bool) {
        self.reply = reply
        self.losesChannels = losesChannels
        state = Locked(State(channels: Set(0 ..< channels)))
    }

    /// Channel `channel` has written all its batches of `pass`.
    func applied(pass: UInt32, channel: Int) throws {
        try state.withLock { state in
            state.written[pass, default: []].insert(channel)
            try acknowledgeComplete(&state)
        }
    }

    /// Whether secondary channel `channel`, which failed (`reason`) before the boundary of `pass`, may be lost; if so,
    /// records the loss, for the report and for `endLosses`. No channel may be lost without the agreement, or once the
    /// final pass began.
    func admitLoss(channel: Int, pass: UInt32, reason: String) -> Bool {
        state.withLock { state in
            guard losesChannels, !state.lossesEnded else { return false }
            state.lost.append(LostChannel(channel: channel, pass: Int(pass), reason: reason))
            return true
        }
    }

    /// Channel `channel`, whose loss was admitted, is done with: every batch it brought is in guest memory, and its
    /// share is out of the digest. Tells the sender, and from now on counts without it.
    func announceLoss(channel: Int, pass: UInt32) throws {
        try state.withLock { state in
            state.channels.remove(channel)
            try reply.send { encoder, out in encoder.encodeChannelLost(channel: UInt16(channel), pass: pass, into: &out) }
            try acknowledgeComplete(&state)
        }
    }

    /// No channel may be lost from now on: the final pass `finalPass` (or post-copy) begins, on every channel it runs on,
    /// or, without one, the migration fails and its channels are closed. Throws if one was lost in the final pass
    /// already: a loss the receiver saw before it knew the pass was the last.
    func endLosses(finalPass: UInt32? = nil) throws {
        let late = state.withLock { state in
            state.lossesEnded = true
            return finalPass.flatMap { final in state.lost.first { $0.pass >= Int(final) } }
        }
        if let late, let finalPass {
            throw MigrationError.channel("channel \(late.channel) was lost in the final pass \(finalPass): \(late.reason)")
        }
    }

    /// The channels lost so far.
    var lost: [LostChannel] { state.withLock { $0.lost } }

    /// Whether every channel has written all its batches of `pass`.
    func hasApplied(pass: UInt32) -> Bool { state.withLock { $0.lastComplete == pass } }

    /// Sends PASS_APPLIED for each open pass, in order, that every channel that counts has written.
    private func acknowledgeComplete(_ state: inout State) throws {
        while let pass = state.written.keys.min(), state.written[pass]!.isSuperset(of: state.channels) {
            state.written[pass] = nil
            state.lastComplete = pass
            try reply.send { encoder, out in encoder.encodePassApplied(pass: pass, into: &out) }
        }
    }
}

/// Threads whose first error is kept, to be rethrown when they are waited for.
///
/// Sendable: `failure` is guarded by `lock`; `group` is thread-safe.
final class ChannelThreads: @unchecked Sendable {
    private let group = DispatchGroup()
    private let lock = NSLock()
    private var failure: Error?

    func start(name: String, _ body: sending @escaping () throws -> Void) {
        group.enter()
        startThread(named: name) { [self] in
            do { try body() } catch { lock.withLock { if failure == nil { failure = error } } }
            group.leave()
        }
    }

    func wait() throws {
        group.wait()
        if let failure = lock.withLock({ failure }) { throw failure }
    }
}
