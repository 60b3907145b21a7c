import Glibc
import LinuxSystem
import MigrationWire
import Threads

/// Guest memory at the destination during post-copy (stream.md §6.13): the guest runs while the frames the source
/// still had to send are missing, and a touch of one of them waits until it arrives.
///
/// Made before the guest starts, it registers every region of the layout with userfaultfd for missing and minor
/// faults, after making sure no page is mapped: every page the memory's file holds then faults on its first touch
/// until it is mapped. The stale versions of the missing frames stay in the file, unmapped, and are never mapped:
/// dropping them first would cost a hole punch each, 5 to 20 µs here, all of it downtime. A background thread maps
/// every page that is not missing, in long runs, so that the guest seldom faults on those; a fault on one (minor)
/// maps it at once; a fault on a page the file lacks and nobody misses (a hole, which reads as zero) fills it with
/// zeros; a fault on a missing frame asks the source for it, once. Pages of the post-copy pass go in with `place`:
/// written through the file (`GuestSink.write`), then mapped, which wakes whoever waits for them; each missing frame
/// must come exactly once, and nothing else.
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
    private let sink: GuestSink
    /// The frames that are not missing, as runs: what the background thread maps.
    private let present: [FrameRun]
    /// 4096 zero bytes, for a page of the post-copy pass that is zero; never written after init.
    private let zeroPage: UnsafeMutableRawPointer

    /// Makes `missing` (runs the decoder has checked against the layout) missing in `sink`'s memory and registers
    /// that memory with userfaultfd. `request(frame)` is called, from the fault handler's thread, for each missing
    /// frame the guest touches first; it must ask the source for it and return without waiting for the page.
    init(sink: GuestSink, layout: GuestMemoryLayout, missing: [FrameRun], request: @escaping @Sendable (UInt64) -> Void) throws {
        self.request = request
        self.sink = sink
        zeroPage = .allocate(byteCount: 4096, alignment: 4096)
        zeroPage.initializeMemory(as: UInt8.self, repeating: 0, count: 4096)
        var regions: [Region] = []
        var total = 0
        do {
            for region in layout.regions {
                let first = region.guestPhysicalAddress >> 12, count = Int(region.size >> 12)
                let base = sink.page(frame: first)
                guard sink.page(frame: first + UInt64(count - 1)) == base + (count - 1) * 4096 else {
                    throw MigrationError.guestFailed("post-copy needs each region of guest memory contiguous in the host")
                }
                // A page mapped now would not fault, and may be a stale one: unmap them all (the file keeps them).
                guard madvise(base, count * 4096, MADV_DONTNEED) == 0 else {
                    throw MigrationError.guestFailed("unmapping guest memory for post-copy: \(String(cString: strerror(errno)))")
                }
                regions.append(Region(firstFrame: first, frameCount: count,
                                      memory: try UserFaultRegion(base: base, length: count * 4096, minorFaults: true), firstIndex: total))
                total += count
            }
        } catch {
            for region in regions { region.memory.close() }
            zeroPage.deallocate()
            throw error as? MigrationError ?? .guestFailed("registering guest memory for post-copy: \(error)")
        }
        var bits = FrameBits(count: total)
        var count = 0
        for run in missing {
            guard let (_, index) = Self.locate(run.first, in: regions) else { continue } // checked by the decoder
            for offset in 0 ..< Int(run.count) { bits.set(index + offset) }
            count += Int(run.count)
        }
        var present: [FrameRun] = []
        for region in regions {
            for offset in 0 ..< region.frameCount where !bits.contains(region.firstIndex + offset) {
                present.append(frame: region.firstFrame + UInt64(offset), startsRegion: offset == 0)
            }
        }
        self.present = present
        self.regions = regions
        state = Locked(State(missing: bits, placed: FrameBits(count: total), requested: FrameBits(count: total), missingCount: count))
    }

    deinit {
        close()
        zeroPage.deallocate()
    }

    /// Starts serving faults, and maps the pages that are not missing in the background.
    func serve() {
        for region in regions {
            region.memory.serve { [self] offset, fault in resolve(region, frameIndex: offset / 4096, fault: fault) }
        }
        startThread(named: "postcopy-map") { [self] in
            // 2 MiB at a time, so that a fault on a page further on is not held up behind one long call.
            for run in present {
                guard let (region, _) = Self.locate(run.first, in: regions) else { continue }
                var frame = run.first
                while frame < run.first + run.count {
                    let pages = Int(min(512, run.first + run.count - frame))
                    // Fails only after `close()`, when there is nothing left to map.
                    guard (try? region.memory.continueMapping(offset: Int(frame - region.firstFrame) * 4096, length: pages * 4096)) != nil else { return }
                    frame += UInt64(pages)
                }
            }
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
        // Written and mapped before it stops counting as missing: a fault in between asks for it (in vain) rather
        // than mapping the stale page or filling it with zeros. Written through the file, so it stays unmapped until
        // mapped here.
        let mapped: Int
        do {
            try [contents ?? UnsafeRawPointer(zeroPage)].withUnsafeBufferPointer { try sink.write(frames: frame, pages: $0) }
            mapped = try region.memory.continueMapping(offset: offset, length: 4096)
        } catch {
            throw MigrationError.guestFailed("placing post-copy page \(frame): \(error)")
        }
        guard mapped == 1 else { throw MigrationError.guestFailed("post-copy page \(frame) was mapped before it came") }
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
                    runs.append(frame: frame, startsRegion: offset == 0)
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
    private func resolve(_ region: Region, frameIndex: Int, fault: UserFaultRegion.Fault) {
        let index = region.firstIndex + frameIndex
        enum Action { case ask, map, fillZero, wait }
        let action = state.withLock { state -> Action in
            guard state.missing.contains(index) else { return fault == .minor ? .map : .fillZero }
            if state.requested.contains(index) { return .wait }
            state.requested.set(index)
            state.requestsSent += 1
            state.askedAt[index] = monotonicSeconds()
            return .ask
        }
        switch action {
        case .ask: request(region.firstFrame + UInt64(frameIndex))
        // A page that is not missing: the file's, not mapped yet (the background thread may get there first, or a
        // placement: then this does nothing), or a hole, which reads as zero.
        case .map: _ = try? region.memory.continueMapping(offset: frameIndex * 4096, length: 4096)
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
