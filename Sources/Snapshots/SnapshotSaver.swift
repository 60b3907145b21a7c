import Foundation
import MigrationEngine
import MigrationWire
import Synchronization
import Threads

/// How a snapshot is taken.
public struct SnapshotSaveOptions: Sendable, Codable, Equatable {
    public var memoryFormat: SnapshotMemoryFormat = .plain
    public var compression: SnapshotWriter.Compression = .zstd
    /// Copy memory while the guest runs and pause it only for the last pages (pre-copy, as a migration does);
    /// otherwise pause for the whole save.
    public var live = true
    /// Keep dirty tracking on afterwards, so that a diff of this snapshot can be taken later.
    public var keepTracking = true
    /// Let the guest run again after the save; false leaves it paused (to stop it, or to take another
    /// snapshot of the same moment).
    public var resumeGuest = true
    /// Replace an existing file at the destination.
    public var overwrite = false
    /// Pre-copy tuning; `downtimeLimit` is the longest pause a live snapshot aims for.
    public var precopy: MigrationOptions = {
        var options = MigrationOptions()
        options.downtimeLimit = 0.02
        return options
    }()

    public init(live: Bool = true, keepTracking: Bool = true, resumeGuest: Bool = true, memoryFormat: SnapshotMemoryFormat = .plain,
                compression: SnapshotWriter.Compression = .zstd, overwrite: Bool = false) {
        self.live = live
        self.keepTracking = keepTracking
        self.resumeGuest = resumeGuest
        self.memoryFormat = memoryFormat
        self.compression = compression
        self.overwrite = overwrite
    }
}

/// What a save measured.
public struct SnapshotSaveReport: Sendable {
    public var header: SnapshotHeader
    public var path: String
    /// How long the guest was paused.
    public var pauseSeconds: Double
    public var totalSeconds: Double
    /// Of which: writing metadata and syncing (the guest runs meanwhile).
    public var finishSeconds: Double
    /// Of `totalSeconds`: the final fsync of the file written during the passes.
    public var syncSeconds: Double = 0
    public var passes: [PassStatistics]
    /// What a diff of this snapshot needs; nil unless dirty tracking was kept on.
    public var base: SnapshotBase?
}

/// Takes a snapshot of a guest through the hypervisor seam: a full one, or a diff against `base`.
///
/// A live save is pre-copy into a file: pass 0 writes every populated page (a diff: every page dirtied since
/// its parent) at its fixed place in a plain file while the guest runs; each later pass rewrites the pages
/// the dirty log reports, until `ConvergencePolicy` expects the rest to take less than the downtime limit.
/// Then the guest is paused, the last pages and the device state are taken, and it runs again before the
/// file is finished. A compressed snapshot is compressed as it is written: the pages a live one's later passes
/// write again wait in a side file, and only the blocks that hold them are built again once the guest runs
/// (`SnapshotWriter.finish`).
///
/// Nothing is lost: any failure leaves the guest running as before, no file at `path`, and (for a diff) the
/// dirty pages it harvested remembered by `base` for the next attempt.
public final class SnapshotSaver {
    public let source: GuestSource
    public let path: String
    public let base: SnapshotBase?
    public let options: SnapshotSaveOptions
    public var onProgress: ((MigrationProgress) -> Void)?

    private static let runPages = 256
    private let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: runPages * SnapshotFormat.pageSize, alignment: 4096)
    private var history: [PassStatistics] = []
    private let started = monotonicSeconds()
    private var bytesWritten = 0

    public init(source: GuestSource, path: String, base: SnapshotBase? = nil, options: SnapshotSaveOptions = SnapshotSaveOptions()) {
        self.source = source
        self.path = path
        self.base = base
        self.options = options
    }

    deinit { buffer.deallocate() }

    /// Whether the guest's dirty tracking is on when the save starts: it is when a base was kept.
    private var trackingWasOn: Bool { base != nil }

    public func run() throws(SnapshotError) -> SnapshotSaveReport {
        let writer = try SnapshotWriter(path: path, layout: source.layout, kind: base == nil ? .full : .diff,
                                        memoryFormat: options.memoryFormat, compression: options.compression,
                                        base: base, overwrite: options.overwrite)
        var state = SaveState()
        do throws(SnapshotError) {
            let deviceState = try capture(writer, &state)
            let finishStart = monotonicSeconds()
            let header = try writer.finish(deviceState: deviceState)
            if !options.keepTracking, state.tracking { try? source.stopDirtyTracking() }
            base?.forgetUnsaved()
            let nextBase = options.keepTracking ? writer.base(header: header) : nil
            return SnapshotSaveReport(header: header, path: path, pauseSeconds: state.pauseSeconds, totalSeconds: monotonicSeconds() - started,
                                      finishSeconds: monotonicSeconds() - finishStart, syncSeconds: writer.syncSeconds, passes: history, base: nextBase)
        } catch {
            writer.discard()
            source.setThrottle(0)
            if state.paused { source.resume() }
            base?.remember(state.harvested)
            if state.tracking, !trackingWasOn { try? source.stopDirtyTracking() }
            throw error
        }
    }

    private struct SaveState {
        var tracking = false
        var paused = false
        var pauseSeconds = 0.0
        /// Frames taken from the dirty log (for a diff's base to keep if the save fails).
        var harvested: [UInt64] = []
    }

    /// Writes memory (pre-copy passes when live) and returns the device state; the guest runs on return.
    private func capture(_ writer: SnapshotWriter, _ state: inout SaveState) throws(SnapshotError) -> [DeviceState] {
        state.tracking = trackingWasOn
        var frames: [UInt64] = []
        if options.live {
            frames = try initialFrames(&state)
            try sampleDictionary(writer, frames)
            if !state.tracking {
                try guest { try source.startDirtyTracking() }
                state.tracking = true
            }
            frames = try precopy(frames, writer, &state)
        }
        let pausedAt = monotonicSeconds()
        try guest { try source.pause() }
        state.paused = true
        // Sorted, without repeats: a frame left over from pre-copy may be dirty again, and a diff's unsaved frames
        // may be harvested again.
        var last = frames
        if !options.live {
            last = try initialFrames(&state)
        } else {
            let before = last.count
            try guest { try source.harvestDirtyFrames { last.append($0) } }
            state.harvested.append(contentsOf: last[before...])
        }
        last.sort()
        let final = last.enumerated().filter { $0.offset == 0 || last[$0.offset - 1] != $0.element }.map(\.element)
        if !options.live { try sampleDictionary(writer, final) }
        if options.keepTracking, !state.tracking {
            // Started while paused: every write after the snapshot is in the log for the next diff.
            try guest { try source.startDirtyTracking() }
            state.tracking = true
        }
        let passStart = monotonicSeconds()
        try write(final, writer, pass: history.count, paused: true)
        history.append(statistics(pass: history.count, pages: final.count, seconds: monotonicSeconds() - passStart, dirtyPages: 0))
        let deviceState = try guest { try source.captureDeviceState() }
        source.setThrottle(0)
        if options.resumeGuest { source.resume() }
        state.paused = false
        state.pauseSeconds = monotonicSeconds() - pausedAt
        report(.completed, pass: history.count, done: final.count, total: final.count)
        return deviceState
    }

    /// Gives a compressed zstd file its dictionary, sampled from the pages the first pass will save.
    private func sampleDictionary(_ writer: SnapshotWriter, _ frames: [UInt64]) throws(SnapshotError) {
        guard options.memoryFormat == .compressed, options.compression == .zstd else { return }
        let dictionary = try BlockDictionary.sample(count: frames.count) { (k) throws(SnapshotError) in
            UnsafeRawBufferPointer(start: source.page(frame: frames[k]), count: SnapshotFormat.pageSize)
        }
        if let dictionary { try writer.useDictionary(dictionary) }
    }

    /// A full snapshot starts from every populated page; a diff from the pages dirtied since its parent.
    private func initialFrames(_ state: inout SaveState) throws(SnapshotError) -> [UInt64] {
        var frames: [UInt64] = []
        if let base {
            frames = base.takeUnsaved()
            try guest { try source.harvestDirtyFrames { frames.append($0) } }
            state.harvested.append(contentsOf: frames)
        } else {
            try guest { try source.forEachPopulatedFrame { frames.append($0) } }
        }
        return frames
    }

    /// Pre-copy passes while the guest runs; returns the frames still to write once it is paused.
    private func precopy(_ initial: [UInt64], _ writer: SnapshotWriter, _ state: inout SaveState) throws(SnapshotError) -> [UInt64] {
        var precopy = options.precopy
        precopy.postCopy = false // a file cannot ask for pages after the guest resumed
        let policy = ConvergencePolicy(options: precopy)
        var frames = initial.sorted()
        var throttle = 0.0
        while true {
            let passStart = monotonicSeconds()
            try write(frames, writer, pass: history.count, paused: false)
            var dirty: [UInt64] = []
            try guest { try source.harvestDirtyFrames { dirty.append($0) } }
            state.harvested.append(contentsOf: dirty)
            history.append(statistics(pass: history.count, pages: frames.count, seconds: monotonicSeconds() - passStart, dirtyPages: dirty.count, throttle: throttle))
            frames = dirty.sorted()
            switch policy.decide(history: history, elapsed: monotonicSeconds() - started, throttle: throttle) {
            case .switchover: return frames
            case .nextPass: continue
            case .throttle(let fraction):
                throttle = fraction
                source.setThrottle(fraction)
            case .giveUp(let why): throw .didNotConverge(why)
            case .postCopy: preconditionFailure("post-copy is off for snapshots")
            }
        }
    }

    /// Hands `frames` (sorted) to the writer in runs of consecutive frames. While the guest runs, each page is
    /// first copied, so that its CRC and its bytes agree even if the guest writes to it meanwhile (a page
    /// changed after its copy is dirty, and the next pass writes it again). A paused guest's pages are
    /// written straight from its memory.
    ///
    /// A plain file takes the runs on two threads, this one and a helper, alternately: checking, hashing and
    /// copying pages into the page cache is all CPU work, and one core did half of what two can.
    private func write(_ frames: [UInt64], _ writer: SnapshotWriter, pass: Int, paused: Bool) throws(SnapshotError) {
        var runs: [Range<Int>] = []
        var position = 0
        while position < frames.count {
            var count = 1
            while position + count < frames.count, count < Self.runPages, frames[position + count] == frames[position] + UInt64(count) { count += 1 }
            runs.append(position ..< position + count)
            position += count
        }
        if pass == 0, writer.memoryFormat == .plain {
            writer.allocate(indices: frames.compactMap { writer.frames.index(of: $0) })
        }
        let work = RunWork(source: source, writer: writer, frames: frames, runs: runs, paused: paused)
        let helped = writer.memoryFormat == .plain && runs.count >= 2 * Self.helperMinimumRuns
        let helperDone = DispatchSemaphore(value: 0)
        if helped {
            let bufferBytes = buffer.count
            startThread(named: "snapshot-writer") {
                let helperBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bufferBytes, alignment: 4096)
                work.run(worker: 1, of: 2, buffer: helperBuffer, onRun: {})
                helperBuffer.deallocate()
                helperDone.signal()
            }
        }
        var lastReport = monotonicSeconds()
        work.run(worker: 0, of: helped ? 2 : 1, buffer: buffer) {
            guard monotonicSeconds() - lastReport > 0.25 else { return }
            report(.precopy, pass: pass, done: work.pagesDone, total: frames.count)
            lastReport = monotonicSeconds()
        }
        if helped { helperDone.wait() }
        if let error = work.failure { throw error }
        bytesWritten += frames.count * SnapshotFormat.pageSize
    }

    /// Runs are shared out only when each thread gets this many (256 pages each): a last pass of a few pages is
    /// not worth a thread.
    private static let helperMinimumRuns = 16

    private func statistics(pass: Int, pages: Int, seconds: Double, dirtyPages: Int, throttle: Double = 0) -> PassStatistics {
        var statistics = PassStatistics(pass: pass)
        statistics.pagesSent = pages
        statistics.payloadBytes = pages * SnapshotFormat.pageSize
        statistics.wireBytes = statistics.payloadBytes
        statistics.seconds = seconds
        statistics.dirtyPages = dirtyPages
        statistics.throttle = throttle
        statistics.estimate(totalBytes: bytesWritten, bytesPerDirtyPage: Double(SnapshotFormat.pageSize), earlier: history)
        return statistics
    }

    private func report(_ phase: MigrationProgress.Phase, pass: Int, done: Int, total: Int) {
        guard let onProgress else { return }
        let elapsed = monotonicSeconds() - started
        let last = history.last
        onProgress(MigrationProgress(
            phase: phase, pass: pass, pagesDone: done, pagesTotal: total, bytesOnWire: bytesWritten,
            bandwidth: elapsed > 0 ? Double(bytesWritten) / elapsed : 0, dirtyRate: last?.dirtyRate ?? 0,
            expectedDowntime: last?.expectedDowntime ?? 0, throttle: last?.throttle ?? 0, elapsed: elapsed, passSecondsLeft: nil))
    }

    private func guest<R>(_ body: () throws -> R) throws(SnapshotError) -> R {
        do { return try body() } catch let error as SnapshotError { throw error } catch { throw .guest("\(error)") }
    }
}

extension SnapshotBase {
    /// Frames harvested by a diff save that failed: the next diff must still save them.
    func remember(_ frames: [UInt64]) { unsaved.withLock { $0.formUnion(frames) } }
    func takeUnsaved() -> [UInt64] { unsaved.withLock { Array($0) } }
    func forgetUnsaved() { unsaved.withLock { $0.removeAll() } }
}


/// One pass's runs of pages, written by one or two threads: worker `w` of `n` takes runs `w, w + n, ...`.
///
/// Sendable: everything is immutable but `pagesDone` and `failure`, which are Locked; the writer takes plain
/// writes from several threads (SnapshotWriter), and the source's pages are only read.
private final class RunWork: @unchecked Sendable {
    let source: GuestSource
    let writer: SnapshotWriter
    let frames: [UInt64]
    let runs: [Range<Int>]
    let paused: Bool
    private let state = Locked<(done: Int, failure: SnapshotError?)>((0, nil))

    init(source: GuestSource, writer: SnapshotWriter, frames: [UInt64], runs: [Range<Int>], paused: Bool) {
        self.source = source
        self.writer = writer
        self.frames = frames
        self.runs = runs
        self.paused = paused
    }

    var pagesDone: Int { state.withLock { $0.done } }
    var failure: SnapshotError? { state.withLock { $0.failure } }

    /// Writes this worker's runs, through `buffer` (runPages pages) when the guest runs; stops at the first
    /// failure of either worker.
    func run(worker: Int, of workers: Int, buffer: UnsafeMutableRawBufferPointer, onRun: () -> Void) {
        let pageSize = SnapshotFormat.pageSize
        for run in stride(from: worker, to: runs.count, by: workers).lazy.map({ self.runs[$0] }) {
            guard failure == nil else { return }
            let first = source.page(frame: frames[run.lowerBound])
            let pages: UnsafeRawBufferPointer
            if paused, run.dropFirst().allSatisfy({ source.page(frame: frames[$0]) == first + ($0 - run.lowerBound) * pageSize }) {
                pages = UnsafeRawBufferPointer(start: first, count: run.count * pageSize)
            } else {
                for (k, position) in run.enumerated() {
                    (buffer.baseAddress! + k * pageSize).copyMemory(from: source.page(frame: frames[position]), byteCount: pageSize)
                }
                pages = UnsafeRawBufferPointer(rebasing: buffer[0 ..< run.count * pageSize])
            }
            do throws(SnapshotError) {
                guard let index = writer.frames.index(of: frames[run.lowerBound]) else {
                    throw .guest("frame \(frames[run.lowerBound]) lies outside the memory layout")
                }
                try writer.write(pages: pages, firstIndex: index)
            } catch {
                state.withLock { if $0.failure == nil { $0.failure = error } }
                return
            }
            state.withLock { $0.done += run.count }
            onRun()
        }
    }
}
