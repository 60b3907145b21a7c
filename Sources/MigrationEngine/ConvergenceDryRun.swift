import MigrationWire

/// A prediction of a migration made before it starts, and what it was made from.
public struct DryRunResult: Sendable, Codable, Equatable {
    /// The dirty-log sample of the running guest.
    public var sample: DirtySample
    /// Pages of the guest that may hold data (pass 0 visits them) and the share of them the probe's copies found zero.
    public var populatedPages: Int
    public var zeroFraction: Double
    /// The link probe: pages it sent (copies of the guest's), their wire bytes, its setup and the seconds of its pass.
    public var probePages: Int
    public var probeWireBytes: Int
    public var probeSetupSeconds: Double
    public var probeSeconds: Double
    public var measurements: ConvergenceMeasurements
    public var prediction: ConvergencePrediction
}

/// Predicts a migration without running it (`migratectl migrate --dry-run`), in two steps that leave the guest as
/// they found it: running, untracked and unthrottled.
///
/// 1. The guest's dirty log is sampled for `sampleSeconds` (`GuestSource.sampleDirtyPages`). The guest runs
///    throughout, tracked as a migration would track it, so it is slowed as it would be.
/// 2. The link is probed with a short migration of a throwaway guest: `probePages` copies of the guest's own pages,
///    spread evenly over the memory that holds data, sent over the same channels, with the same codec, channel count
///    and bandwidth cap to the same receiver, which writes them into fresh memory as it would the guest's. So the
///    measured rate is the end-to-end one: encoding, TLS, the link and the receiver together. The probe runs one
///    pass and then gives up (its guest reports every page dirty again, and it may run one pass only), so the
///    receiver discards what it got and starts nothing; it records a failed incoming migration.
///
/// The prediction is then `ConvergencePrediction.predict` over those measurements. What a dry run cannot measure
/// without pausing the guest, the fixed cost of the switchover, it takes as `ConvergenceMeasurements.assumedSwitchoverSeconds`.
public enum ConvergenceDryRun {
    public static let defaultSampleSeconds = 0.5
    /// 64 MiB: long enough (about 0.1 s here) that the pipeline's start-up is a small part of it.
    public static let defaultProbePages = 16384

    /// Measures and predicts. `openChannel` opens channel `index` to the receiver, as `MigrationSender`'s does.
    public static func run(source: GuestSource, options: MigrationOptions, sampleSeconds: Double = defaultSampleSeconds,
                           probePages: Int = defaultProbePages,
                           openChannel: @escaping (Int) throws -> MigrationChannel) throws -> DryRunResult {
        let sample = try source.sampleDirtyPages(for: sampleSeconds)
        var populated: [UInt64] = []
        try source.forEachPopulatedFrame { populated.append($0) }
        let probe = ProbeSource(copying: populated, from: source, pages: probePages)
        var probeOptions = options
        probeOptions.maxPasses = 1
        probeOptions.downtimeLimit = .leastNonzeroMagnitude
        probeOptions.autoConverge = false
        let sender = MigrationSender(source: probe, options: probeOptions, openChannel: openChannel)
        let report = sender.run()
        guard case .didNotConverge = sender.failure, let pass = report.passes.first else {
            throw sender.failure ?? MigrationError.protocolViolation("the link probe's receiver accepted a guest without memory")
        }
        let dataPages = pass.pagesSent - pass.zeroPages
        let zeroFraction = pass.pagesSent > 0 ? Double(pass.zeroPages) / Double(pass.pagesSent) : 0
        let pageLimit = Double(source.layout.totalBytes / 4096)
        let measurements = ConvergenceMeasurements(
            dataPages: Int((Double(populated.count) * (1 - zeroFraction)).rounded()),
            dirty: DirtyCurve(points: sample.windows, pageLimit: pageLimit),
            pagesPerSecond: pass.seconds > 0 ? Double(max(dataPages, 1)) / pass.seconds : 0,
            wireBytesPerPage: dataPages > 0 ? Double(pass.wireBytes) / Double(dataPages) : 4096,
            setupSeconds: report.setupSeconds, passOverheadSeconds: 2 * sample.harvestSeconds)
        return DryRunResult(sample: sample, populatedPages: populated.count, zeroFraction: zeroFraction, probePages: pass.pagesSent,
                            probeWireBytes: pass.wireBytes, probeSetupSeconds: report.setupSeconds, probeSeconds: pass.seconds,
                            measurements: measurements, prediction: ConvergencePrediction.predict(measurements, options: options))
    }
}

/// The link probe's guest: copies of pages of a real guest in memory of its own, at guest-physical 0 on.
///
/// Every harvest reports every page dirty, so that the sender's policy never sees a guest ready for switchover; the
/// probe's options let it run one pass, after which it gives up. Pausing, throttling and device state are never
/// reached.
///
/// Sendable: `memory` is written in `init` only and read after.
private final class ProbeSource: GuestSource, @unchecked Sendable {
    let layout: GuestMemoryLayout
    private let memory: UnsafeMutableRawBufferPointer
    private let pages: Int

    /// `pages` copies of the frames in `frames`, taken at even steps through them; rounded up to 2 MiB, the smallest
    /// memory a receiver's guest has.
    init(copying frames: [UInt64], from source: GuestSource, pages requested: Int) {
        pages = max((min(requested, max(frames.count, 1)) + 511) / 512 * 512, 512)
        memory = UnsafeMutableRawBufferPointer.allocate(byteCount: pages * 4096, alignment: 4096)
        memory.initializeMemory(as: UInt8.self, repeating: 0)
        layout = GuestMemoryLayout(regions: [MemoryRegion(guestPhysicalAddress: 0, size: UInt64(pages * 4096))])
        guard !frames.isEmpty else { return }
        for index in 0 ..< pages {
            let frame = frames[index * frames.count / pages]
            UnsafeMutableRawBufferPointer(rebasing: memory[index * 4096 ..< (index + 1) * 4096])
                .copyMemory(from: UnsafeRawBufferPointer(start: source.page(frame: frame), count: 4096))
        }
    }

    deinit { memory.deallocate() }

    func page(frame: UInt64) -> UnsafeRawPointer { UnsafeRawPointer(memory.baseAddress! + Int(frame) * 4096) }
    func forEachPopulatedFrame(_ visit: (UInt64) -> Void) throws { for frame in 0 ..< UInt64(pages) { visit(frame) } }
    func startDirtyTracking() throws {}
    func harvestDirtyFrames(_ visit: (UInt64) -> Void) throws { try forEachPopulatedFrame(visit) }
    func stopDirtyTracking() throws {}
    func pause() throws { throw MigrationError.guestFailed("the link probe's guest cannot switch over") }
    func resume() {}
    func setThrottle(_ fraction: Double) {}
    func captureDeviceState() throws -> [DeviceState] { throw MigrationError.guestFailed("the link probe's guest has no device state") }
}
