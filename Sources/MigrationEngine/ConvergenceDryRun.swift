import Foundation
import MigrationWire
import Threads

/// A prediction of a migration made before it starts, and what it was made from.
public struct DryRunResult: Sendable, Codable, Equatable {
    /// The dirty-log sample of the running guest.
    public var sample: DirtySample
    /// Pages of the guest that may hold data (pass 0 visits them) and the share of them the probe's copies found zero.
    public var populatedPages: Int
    public var zeroFraction: Double
    /// The link probe: pages it sent (copies of the guest's), their wire bytes, its setup and the seconds of its two
    /// passes, into fresh memory and into memory the receiver held.
    public var probePages: Int
    public var probeWireBytes: Int
    public var probeSetupSeconds: Double
    public var probeSeconds: Double
    public var laterProbeSeconds: Double
    public var measurements: ConvergenceMeasurements
    public var prediction: ConvergencePrediction
}

/// Predicts a migration without running it (`migratectl migrate --dry-run`), leaving the guest as it found it:
/// running, untracked and unthrottled. Two measurements run at the same time, once the guest's tracking is on,
/// because on a small host they compete for the same cores as the migration and the guest will:
///
/// - The guest's dirty log is sampled for `sampleSeconds` (`GuestSource.sampleDirtyPages`). The guest runs
///   throughout, tracked as a migration would track it, so it is slowed as it would be.
/// - The link is probed with a short migration of a throwaway guest: `probePages` copies of the guest's own pages,
///   in runs of a batch spread evenly over the memory that holds data, sent over the same kind of channels, with the same codec,
///   channel count and bandwidth cap, to the same receiver, which writes them into fresh memory as it would the
///   guest's. So the measured rate is the end-to-end one: encoding, TLS, the link and the receiver together. Its
///   pass 1 sends every page again, a word of each changed, into memory the receiver now holds: the rate of later
///   passes. Then the probe gives up (its guest reports every page dirty, and it may run two passes only), so the
///   receiver discards what it got and starts nothing; it records a failed incoming migration.
///
/// The setup is the probe's (connecting, TLS, capabilities) plus what the guest's own adds: starting its dirty
/// tracking (timed by the sample) and finding its populated pages (timed here), both of which grow with its memory.
///
/// The prediction is then `ConvergencePrediction.predict` over those measurements. What a dry run cannot measure
/// without pausing the guest, the fixed cost of the switchover, it takes as `ConvergenceMeasurements.assumedSwitchoverSeconds`.
public enum ConvergenceDryRun {
    public static let defaultSampleSeconds = 0.5
    /// 64 MiB: long enough (0.1 to 0.5 s a pass here) that the pipeline's start-up is a small part of it.
    public static let defaultProbePages = 16384

    /// Measures and predicts. `openChannel` opens channel `index` to the receiver, as `MigrationSender`'s does.
    public static func run(source: GuestSource, options: MigrationOptions, sampleSeconds: Double = defaultSampleSeconds,
                           probePages: Int = defaultProbePages,
                           openChannel: @escaping (Int) throws -> MigrationChannel) throws -> DryRunResult {
        // The sender finds the populated frames between its setup and pass 0: the time counts as setup here.
        let scanStart = monotonicSeconds()
        var populated: [UInt64] = []
        try source.forEachPopulatedFrame { populated.append($0) }
        let scanSeconds = monotonicSeconds() - scanStart
        let probe = ProbeSource(copying: populated, from: source, pages: probePages, run: options.batchPages)

        let sampled = Locked<Result<DirtySample, any Error>?>(nil)
        let (armed, sampleDone) = (DispatchSemaphore(value: 0), DispatchSemaphore(value: 0))
        startThread(named: "dry-run-sample") {
            let result = Result { try source.sampleDirtyPages(for: sampleSeconds) { armed.signal() } }
            sampled.withLock { $0 = result }
            armed.signal() // in case it failed before arming
            sampleDone.signal()
        }
        // Starting the guest's tracking is heavy (KVM write-protects all its memory): the probe waits for it, or it
        // would measure a link slowed by it, which the migration's passes are not (its setup pays it).
        armed.wait()
        var probeOptions = options
        probeOptions.maxPasses = 2
        probeOptions.downtimeLimit = .leastNonzeroMagnitude
        probeOptions.autoConverge = false
        let sender = MigrationSender(source: probe, options: probeOptions, openChannel: openChannel)
        let report = sender.run()
        sampleDone.wait()
        let sample = try sampled.withLock { $0! }.get()
        guard case .didNotConverge = sender.failure, report.passes.count == 2 else {
            throw sender.failure ?? MigrationError.protocolViolation("the link probe's receiver accepted a guest without memory")
        }
        let (first, later) = (report.passes[0], report.passes[1])
        let dataPages = first.pagesSent - first.zeroPages
        let zeroFraction = first.pagesSent > 0 ? Double(first.zeroPages) / Double(first.pagesSent) : 0
        func rate(_ pass: PassStatistics) -> Double { pass.seconds > 0 ? Double(max(pass.pagesSent - pass.zeroPages, 1)) / pass.seconds : 0 }
        let measurements = ConvergenceMeasurements(
            dataPages: Int((Double(populated.count) * (1 - zeroFraction)).rounded()),
            dirty: DirtyCurve(points: sample.windows, pageLimit: Double(source.layout.totalBytes / 4096)),
            pagesPerSecond: rate(first), laterPagesPerSecond: rate(later),
            wireBytesPerPage: dataPages > 0 ? Double(first.wireBytes) / Double(dataPages) : 4096,
            unchangedShareAfterPass0: ConvergenceMeasurements.expectedUnchangedShare(options),
            setupSeconds: report.setupSeconds + sample.startSeconds + scanSeconds, passOverheadSeconds: 2 * sample.harvestSeconds)
        return DryRunResult(sample: sample, populatedPages: populated.count, zeroFraction: zeroFraction, probePages: first.pagesSent,
                            probeWireBytes: first.wireBytes, probeSetupSeconds: report.setupSeconds, probeSeconds: first.seconds,
                            laterProbeSeconds: later.seconds, measurements: measurements,
                            prediction: ConvergencePrediction.predict(measurements, options: options))
    }
}

/// The link probe's guest: copies of pages of a real guest in memory of its own, at guest-physical 0 on.
///
/// Every harvest reports every page dirty, and changes a word of each, as a guest rewriting all its memory would, so
/// that the sender's policy never sees a guest ready for switchover and a page sent again is never `unchanged`; the
/// probe's options let it run two passes, after which it gives up. Pausing, throttling and device state are never
/// reached.
///
/// Sendable: `memory` is written in `init`, and in harvests, which the sender makes between passes, when no channel
/// thread reads it; `hasData` is written in `init` only.
private final class ProbeSource: GuestSource, @unchecked Sendable {
    let layout: GuestMemoryLayout
    private let memory: UnsafeMutableRawBufferPointer
    private let pages: Int
    /// Which pages are not all zero: those a harvest changes.
    private var hasData: [Bool]

    /// `pages` copies of the frames in `frames`, in runs of `run` consecutive ones taken at even steps through them;
    /// rounded up to 2 MiB, the smallest memory a receiver's guest has. Runs, not single pages, because a batch is
    /// compressed as one block: pages far apart share less than neighbours do, and would compress worse and slower
    /// than the guest's own batches.
    init(copying frames: [UInt64], from source: GuestSource, pages requested: Int, run: Int) {
        pages = max((min(requested, max(frames.count, 1)) + 511) / 512 * 512, 512)
        memory = UnsafeMutableRawBufferPointer.allocate(byteCount: pages * 4096, alignment: 4096)
        memory.initializeMemory(as: UInt8.self, repeating: 0)
        layout = GuestMemoryLayout(regions: [MemoryRegion(guestPhysicalAddress: 0, size: UInt64(pages * 4096))])
        hasData = Array(repeating: false, count: pages)
        guard !frames.isEmpty else { return }
        let run = max(1, min(run, pages))
        let runs = (pages + run - 1) / run
        for index in 0 ..< pages {
            let (runIndex, offset) = index.quotientAndRemainder(dividingBy: run)
            let frame = frames[min(runIndex * frames.count / runs + offset, frames.count - 1)]
            let copy = UnsafeMutableRawBufferPointer(rebasing: memory[index * 4096 ..< (index + 1) * 4096])
            copy.copyMemory(from: UnsafeRawBufferPointer(start: source.page(frame: frame), count: 4096))
            hasData[index] = copy.contains { $0 != 0 }
        }
    }

    deinit { memory.deallocate() }

    func page(frame: UInt64) -> UnsafeRawPointer { UnsafeRawPointer(memory.baseAddress! + Int(frame) * 4096) }
    func forEachPopulatedFrame(_ visit: (UInt64) -> Void) throws { for frame in 0 ..< UInt64(pages) { visit(frame) } }
    func startDirtyTracking() throws {}
    func harvestDirtyFrames(_ visit: (UInt64) -> Void) throws {
        for frame in 0 ..< pages {
            // A zero page stays zero, as it does in the guest's later passes; any other changes in its first word.
            if hasData[frame] { memory.storeBytes(of: memory.load(fromByteOffset: frame * 4096, as: UInt64.self) &+ 1, toByteOffset: frame * 4096, as: UInt64.self) }
            visit(UInt64(frame))
        }
    }
    func stopDirtyTracking() throws {}
    func pause() throws { throw MigrationError.guestFailed("the link probe's guest cannot switch over") }
    func resume() {}
    func setThrottle(_ fraction: Double) {}
    func captureDeviceState() throws -> [DeviceState] { throw MigrationError.guestFailed("the link probe's guest has no device state") }
}
