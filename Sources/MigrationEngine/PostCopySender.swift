import Foundation
import MigrationWire
import PageCodec
import Threads

/// The source's side of post-copy (stream.md §6.13), from the destination's STARTED until its VERIFIED: sends each
/// missing page once, either because the guest asked for it (a fault at the destination) or in the background push.
///
/// With several channels, channel 0 carries only the pages asked for, so that a fault never waits behind bulk pages,
/// and the others push the rest; with one channel, a request waits for at most the batch being sent. The push goes
/// on from just after the last page asked for, where the guest is likely to touch next.
///
/// Sendable by thread discipline: `run` works on the migration's thread and starts one thread per channel, each the
/// only user of its streamer, and one reading the reply stream; what they share is `plan` and `outcome` (locked).
final class PostCopySender: @unchecked Sendable {
    struct Statistics: Sendable, Codable, Equatable {
        /// Pages missing at the destination when its guest started.
        var missingPages = 0
        /// Of those, pages the guest asked for before the push got to them, and PAGE_REQUEST records that asked.
        var requestedPages = 0
        var requests = 0
        var wireBytes = 0
        /// From the destination's start until it verified the last page.
        var seconds = 0.0

        /// Adds a session's counts (a post-copy resumed after its link broke has several).
        mutating func add(_ other: Statistics) {
            requestedPages += other.requestedPages
            requests += other.requests
            wireBytes += other.wireBytes
        }
    }

    private let plan: PushPlan
    private let streamers: [PageStreamer]
    /// The digest of pages sent by the sessions before this one, whose links broke.
    private let baseDigest: MemoryDigest
    private let reply: RecordReader
    private let finalPass: UInt32
    private let closeChannels: @Sendable () -> Void
    private let pagesDone: ProgressCounter
    private let bytesSent: ProgressCounter
    /// What ended the reply stream: the destination's digest, or why not.
    private let outcome = Locked<Result<DigestRecord, Error>?>(nil)

    /// Pages go in batches of `batchPages`; `pagesDone` and `bytesSent` count them for progress reports.
    init(missing: [UInt64], streamers: [PageStreamer], reply: RecordReader, finalPass: UInt32, batchPages: Int,
         baseDigest: MemoryDigest = MemoryDigest(), pagesDone: ProgressCounter, bytesSent: ProgressCounter,
         closeChannels: @escaping @Sendable () -> Void) {
        plan = PushPlan(frames: missing, chunk: batchPages)
        self.baseDigest = baseDigest
        self.streamers = streamers
        self.reply = reply
        self.finalPass = finalPass
        self.pagesDone = pagesDone
        self.bytesSent = bytesSent
        self.closeChannels = closeChannels
    }

    /// Sends every missing page, then the final boundary on each channel, END on the others and VERIFY with the
    /// digest on channel 0, and waits for the destination's VERIFIED. `progress` is called a few times a second.
    /// `corruptDigest` is for tests: it flips a bit of the digest sent, which the destination must refuse.
    func run(corruptDigest: Bool = false, progress: () -> Void) throws -> Statistics {
        let started = monotonicSeconds()
        let group = DispatchGroup()
        let failure = Locked<Error?>(nil)
        func fail(_ error: Error) {
            failure.withLock { if $0 == nil { $0 = error } }
            plan.stop()
            closeChannels() // a thread blocked on the peer returns
        }
        group.enter()
        startThread(named: "postcopy-requests") { [self] in
            readRequests(onFailure: fail)
            group.leave()
        }
        let sending = DispatchGroup()
        for (index, streamer) in streamers.enumerated() {
            group.enter()
            sending.enter()
            startThread(named: "postcopy-send-\(index)") { [self] in
                do { try send(on: index, streamer) } catch { fail(error) }
                sending.leave()
                group.leave()
            }
        }
        while sending.wait(timeout: .now() + 0.25) == .timedOut { progress() }
        if let error = failure.withLock({ $0 }) {
            group.wait()
            throw error
        }
        // Every page has gone: the digest of what was sent is final.
        var digest = baseDigest
        for streamer in streamers { digest.add(PageHash(low: streamer.digest.digest.low, high: streamer.digest.digest.high)) }
        var sent = digest.bytes
        if corruptDigest { sent[0] ^= 1 }
        let ours = DigestRecord(algorithm: DigestAlgorithm.pageSum128, digest: sent)
        let boundary = PassBoundary(pass: finalPass, dirtyPages: 0, pagesSent: UInt64(plan.frames.count), zeroPages: 0,
                                    wireBytes: UInt64(bytesSent.count), durationNanoseconds: UInt64((monotonicSeconds() - started) * 1e9))
        do {
            for streamer in streamers.dropFirst() {
                try streamer.writer.send { encoder, out in
                    encoder.encodePassBoundary(boundary, into: &out)
                    encoder.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out)
                }
            }
            try streamers[0].writer.send { encoder, out in
                encoder.encodePassBoundary(boundary, into: &out)
                encoder.encodeVerify(ours, into: &out)
            }
        } catch {
            fail(error)
        }
        group.wait()
        if let error = failure.withLock({ $0 }) { throw error }
        guard case .success(let theirs) = outcome.withLock({ $0 }) else {
            throw MigrationError.protocolViolation("the reply stream ended without verified")
        }
        guard theirs == ours else { throw MigrationError.digestMismatch(sender: hex(ours.digest), receiver: hex(theirs.digest)) }
        try? streamers[0].writer.send { encoder, out in encoder.encodeEnd(End(digestAlgorithm: DigestAlgorithm.none, digest: []), into: &out) }
        let (requested, requests) = plan.requestCounts
        return Statistics(missingPages: plan.frames.count, requestedPages: requested, requests: requests,
                          wireBytes: bytesSent.count, seconds: monotonicSeconds() - started)
    }

    /// What this session did, for one whose link broke: the pages asked for and the bytes sent before the break.
    var statisticsSoFar: Statistics {
        let (requested, requests) = plan.requestCounts
        return Statistics(missingPages: plan.frames.count, requestedPages: requested, requests: requests, wireBytes: bytesSent.count)
    }

    /// The reply stream, until VERIFIED or ABORT: each PAGE_REQUEST goes to the plan.
    private func readRequests(onFailure fail: (Error) -> Void) {
        do {
            while true {
                switch try reply.next() {
                case .pageRequest(let frames): try plan.request(frames)
                case .passApplied, .note, .skippedOptional: continue
                case .verified(let theirs):
                    outcome.withLock { $0 = .success(theirs) }
                    return
                case .abort(let abort): throw MigrationError.peerAborted(reason: abort.reason.rawValue, message: abort.message)
                case let other: throw MigrationError.protocolViolation("expected page requests or verified, got \(other)")
                }
            }
        } catch {
            outcome.withLock { $0 = .failure(error) }
            fail(error)
        }
    }

    /// One channel's thread: pages asked for (channel 0), pushed pages (the others), or both when there is one channel.
    private func send(on index: Int, _ streamer: PageStreamer) throws {
        let answers = index == 0, pushes = index > 0 || streamers.count == 1
        while let frames = plan.next(requested: answers, pushed: pushes) {
            _ = try streamer.send(frames: frames, pass: finalPass, skipHeld: false, progress: pagesDone, wireProgress: bytesSent) { false }
        }
    }
}

/// Which missing pages are still to send, and in which order: those asked for first, then the push, which goes on
/// from just after the last page asked for and wraps around. Each page is handed out once.
///
/// Sendable: everything but `frames` is guarded by `condition`.
final class PushPlan: @unchecked Sendable {
    /// The missing frames, sorted.
    let frames: [UInt64]
    private let chunk: Int
    private let condition = NSCondition()
    private var handedOut: FrameBits
    private var left: Int
    private var cursor = 0
    private var asked: [UInt64] = []
    private var stopped = false
    private var requestedPages = 0, requests = 0

    init(frames: [UInt64], chunk: Int) {
        self.frames = frames
        self.chunk = chunk
        handedOut = FrameBits(count: frames.count)
        left = frames.count
    }

    /// The destination asks for `requested`: those not handed out yet go next on channel 0. A frame that was never
    /// missing is the peer's error.
    func request(_ requested: [UInt64]) throws {
        try condition.withLock {
            requests += 1
            for frame in requested {
                guard let index = index(of: frame) else {
                    throw MigrationError.protocolViolation("the destination asked for page \(frame), which it does not miss")
                }
                guard !handedOut.contains(index) else { continue } // on its way already
                handedOut.set(index)
                left -= 1
                requestedPages += 1
                asked.append(frame)
                cursor = index + 1 == frames.count ? 0 : index + 1
            }
            condition.broadcast()
        }
    }

    /// The next frames for a channel that sends pages asked for and/or pushed ones; waits for requests when it sends
    /// only those. Nil once every frame has been handed out, or after `stop`.
    func next(requested: Bool, pushed: Bool) -> [UInt64]? {
        condition.withLock {
            while true {
                if stopped { return nil }
                if requested, !asked.isEmpty {
                    defer { asked.removeAll() }
                    return asked
                }
                if left == 0 {
                    condition.broadcast() // the channel waiting for requests learns there will be none
                    return nil
                }
                if pushed { return takeChunk() }
                condition.wait()
            }
        }
    }

    /// Ends every `next`: the migration failed.
    func stop() {
        condition.withLock {
            stopped = true
            condition.broadcast()
        }
    }

    var requestCounts: (pages: Int, requests: Int) { condition.withLock { (requestedPages, requests) } }

    /// Up to `chunk` frames not handed out, from the cursor on. Called with the lock held and `left` > 0.
    private func takeChunk() -> [UInt64] {
        var taken: [UInt64] = []
        while taken.count < chunk, left > 0 {
            if !handedOut.contains(cursor) {
                handedOut.set(cursor)
                left -= 1
                taken.append(frames[cursor])
            }
            cursor = cursor + 1 == frames.count ? 0 : cursor + 1
        }
        if left == 0 { condition.broadcast() } // the channel waiting for requests learns there will be none
        return taken
    }

    private func index(of frame: UInt64) -> Int? { frames.sortedIndex(of: frame) }
}

extension Array where Element == UInt64 {
    /// Where `frame` is in this sorted array, if it is.
    func sortedIndex(of frame: UInt64) -> Int? {
        var low = 0, high = count
        while low < high {
            let middle = (low + high) / 2
            if self[middle] < frame { low = middle + 1 } else { high = middle }
        }
        return low < count && self[low] == frame ? low : nil
    }
}

extension FrameRun {
    /// The runs of consecutive frames in `frames`, which are sorted, distinct and in `layout`; a run never spans two
    /// regions, even adjacent ones (stream.md §6.13).
    static func runs(of frames: [UInt64], in layout: GuestMemoryLayout) -> [FrameRun] {
        let regionStarts = Set(layout.regions.map { $0.guestPhysicalAddress >> 12 })
        var runs: [FrameRun] = []
        for frame in frames { runs.append(frame: frame, startsRegion: regionStarts.contains(frame)) }
        return runs
    }
}

extension DigestTracker {
    /// Takes the frames of `runs` (each inside one region) out of the digest: post-copy sends their latest versions
    /// later, whichever channel carries them (stream.md §6.13).
    func forget(_ runs: [FrameRun]) {
        for run in runs { updateZero(frames: run.first, count: Int(run.count)) }
    }
}

extension Array where Element == FrameRun {
    /// Adds `frame`, which comes after every frame so far: to the last run when it follows on from it in the same
    /// region, else as a run of its own.
    mutating func append(frame: UInt64, startsRegion: Bool) {
        if !startsRegion, let last, last.first + last.count == frame {
            self[count - 1].count += 1
        } else {
            append(FrameRun(first: frame, count: 1))
        }
    }
}
