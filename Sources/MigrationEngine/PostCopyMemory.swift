import LinuxSystem
import MigrationWire
import Threads

/// Guest memory at the destination during post-copy (stream.md §6.13): the guest runs while the frames the source
/// still had to send are missing, and a touch of one of them waits until it arrives.
///
/// Made before the guest starts, it drops the stale contents of the missing frames (the sink punches them out of its
/// memory, so that they are absent, not zero) and registers every region of the layout with userfaultfd. A fault on a
/// missing frame asks the source for it, once; a fault anywhere else is on a frame the guest never had (a hole that
/// reads as zero), which is filled with zeros at once. Pages of the post-copy pass go in with `place`, which fills
/// them atomically and wakes whoever waits for them; each missing frame must come exactly once, and nothing else.
///
/// Sendable: the bitmaps and counts are in `state` (Locked); `regions` is set in init and never changes, and each
/// `UserFaultRegion` is thread-safe.
final class PostCopyMemory: @unchecked Sendable {
    private struct Region {
        let firstFrame: UInt64
        let frameCount: Int
        let memory: UserFaultRegion
        /// Index of the region's first frame in the bitmaps.
        let firstIndex: Int
    }

    private struct State {
        /// The frames whose latest version has not been placed yet.
        var missing: FrameBits
        /// Frames whose page is being placed or has been: a second copy is the sender's error.
        var placed: FrameBits
        /// Frames asked of the source already: a page several vCPUs wait for is asked for once.
        var requested: FrameBits
        var missingCount: Int
        var requestsSent = 0
        /// When each frame asked for was asked for, until it comes; then the wait, in seconds.
        var askedAt: [Int: Double] = [:]
        var waits: [Double] = []
    }

    private let regions: [Region]
    private let state: Locked<State>
    private let request: @Sendable (UInt64) -> Void

    /// Makes `missing` (runs the decoder has checked against the layout) missing in `sink`'s memory and registers
    /// that memory with userfaultfd. `request(frame)` is called, from the fault handler's thread, for each missing
    /// frame the guest touches first; it must ask the source for it and return without waiting for the page.
    init(sink: GuestSink, layout: GuestMemoryLayout, missing: [FrameRun], request: @escaping @Sendable (UInt64) -> Void) throws {
        self.request = request
        var regions: [Region] = []
        var total = 0
        do {
            for region in layout.regions {
                let first = region.guestPhysicalAddress >> 12, count = Int(region.size >> 12)
                let base = sink.page(frame: first)
                guard sink.page(frame: first + UInt64(count - 1)) == base + (count - 1) * 4096 else {
                    throw MigrationError.guestFailed("post-copy needs each region of guest memory contiguous in the host")
                }
                regions.append(Region(firstFrame: first, frameCount: count, memory: try UserFaultRegion(base: base, length: count * 4096),
                                      firstIndex: total))
                total += count
            }
        } catch {
            for region in regions { region.memory.close() }
            throw error as? MigrationError ?? .guestFailed("registering guest memory for post-copy: \(error)")
        }
        var bits = FrameBits(count: total)
        var count = 0
        for run in missing {
            guard let (_, index) = Self.locate(run.first, in: regions) else { continue } // checked by the decoder
            for offset in 0 ..< Int(run.count) { bits.set(index + offset) }
            count += Int(run.count)
        }
        self.regions = regions
        state = Locked(State(missing: bits, placed: FrameBits(count: total), requested: FrameBits(count: total), missingCount: count))
        do {
            // Registered before the punch, so that no stale page can come back in between: there is no guest yet, but
            // the order costs nothing and leaves no window.
            for run in missing { try sink.zero(frames: run.first, count: Int(run.count)) }
        } catch {
            close()
            throw MigrationError.guestFailed("dropping the stale copies of \(count) missing pages: \(error)")
        }
    }

    deinit { close() }

    /// Starts serving faults.
    func serve() {
        for region in regions {
            region.memory.serve { [self] offset in resolve(region, frameIndex: offset / 4096) }
        }
    }

    /// Frames still missing.
    var missingCount: Int { state.withLock { $0.missingCount } }
    /// Frames the guest touched before they came, each asked of the source once.
    var requestsSent: Int { state.withLock { $0.requestsSent } }
    /// For each frame asked for, the seconds from the fault's request to the page's placement: what the faulting
    /// vCPU waited, but for the handler's own delay before the request.
    var faultWaits: [Double] { state.withLock { $0.waits } }

    /// Puts the latest version of missing frame `frame` in place (zeros when `contents` is nil), waking the threads
    /// that wait for it. Throws for a frame that was not missing, or came before.
    func place(frame: UInt64, contents: UnsafeRawPointer?) throws {
        guard let (region, index) = Self.locate(frame, in: regions) else { throw MigrationError.malformedStream("post-copy page \(frame) outside the layout") }
        let claimed = state.withLock { state -> Bool in
            guard state.missing.contains(index), !state.placed.contains(index) else { return false }
            state.placed.set(index)
            return true
        }
        guard claimed else { throw MigrationError.malformedStream("post-copy page \(frame) was not missing, or came twice") }
        let offset = Int(frame - region.firstFrame) * 4096
        // Filled before it stops counting as missing: a fault in between asks for it (in vain) rather than filling
        // it with zeros.
        let wasMissing: Bool
        do {
            wasMissing = try contents.map { try region.memory.fill(offset: offset, from: $0, length: 4096) }
                ?? region.memory.fillZero(offset: offset, length: 4096)
        } catch {
            throw MigrationError.guestFailed("placing post-copy page \(frame): \(error)")
        }
        guard wasMissing else { throw MigrationError.guestFailed("post-copy page \(frame) was present before it came") }
        let now = monotonicSeconds()
        state.withLock { state in
            state.missing.clear(index)
            state.missingCount -= 1
            if let askedAt = state.askedAt.removeValue(forKey: index) { state.waits.append(now - askedAt) }
        }
    }

    /// The frames still missing, as runs inside the regions, and those of them the guest asked for already: what a
    /// resumed post-copy must hear of (stream.md §6.14).
    func stillMissing() -> (runs: [FrameRun], requested: [UInt64]) {
        state.withLock { state in
            var runs: [FrameRun] = [], requested: [UInt64] = []
            for region in regions {
                for offset in 0 ..< region.frameCount where state.missing.contains(region.firstIndex + offset) {
                    let frame = region.firstFrame + UInt64(offset)
                    if state.requested.contains(region.firstIndex + offset) { requested.append(frame) }
                    if let last = runs.last, last.first + last.count == frame, offset > 0 {
                        runs[runs.count - 1].count += 1
                    } else {
                        runs.append(FrameRun(first: frame, count: 1))
                    }
                }
            }
            return (runs, requested)
        }
    }

    /// Unregisters guest memory: every thread still waiting for a page goes on and reads what the memory holds there.
    /// Done when no frame is missing, or when post-copy fails (before the guest is stopped, whose vCPUs may wait).
    func close() {
        for region in regions { region.memory.close() }
    }

    /// On the fault handler's thread.
    private func resolve(_ region: Region, frameIndex: Int) {
        let index = region.firstIndex + frameIndex
        enum Action { case ask, fillZero, wait }
        let action = state.withLock { state -> Action in
            guard state.missing.contains(index) else { return .fillZero }
            if state.requested.contains(index) { return .wait }
            state.requested.set(index)
            state.requestsSent += 1
            state.askedAt[index] = monotonicSeconds()
            return .ask
        }
        switch action {
        case .ask: request(region.firstFrame + UInt64(frameIndex))
        // A frame never sent is a hole, which reads as zero. One placed meanwhile makes this fill fail harmlessly.
        case .fillZero: _ = try? region.memory.fillZero(offset: frameIndex * 4096, length: 4096)
        case .wait: break
        }
    }

    /// The region holding `frame`, and the frame's index in the bitmaps.
    private static func locate(_ frame: UInt64, in regions: [Region]) -> (Region, Int)? {
        guard let region = regions.first(where: { frame >= $0.firstFrame && frame - $0.firstFrame < UInt64($0.frameCount) }) else { return nil }
        return (region, region.firstIndex + Int(frame - region.firstFrame))
    }
}

/// One bit per frame.
struct FrameBits {
    private var words: [UInt64]

    init(count: Int) { words = [UInt64](repeating: 0, count: (count + 63) / 64) }

    func contains(_ index: Int) -> Bool { words[index >> 6] & (1 << UInt64(index & 63)) != 0 }
    mutating func set(_ index: Int) { words[index >> 6] |= 1 << UInt64(index & 63) }
    mutating func clear(_ index: Int) { words[index >> 6] &= ~(1 << UInt64(index & 63)) }
}
