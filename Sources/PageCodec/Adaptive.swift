/// Chooses, per batch, between sending pages raw and compressing them with one of several
/// codecs, from measured compression speed and ratio against the measured link speed.
///
/// The model is a two-stage pipeline (compress threads, then the link): with codec c the
/// batch rate is `min(speed_c × threads, link / ratio_c)` bytes of pages per second, and raw is
/// `link`. A codec is chosen only if it beats raw by `margin`, and never when it compresses
/// slower than the link carries raw pages, so a fast link is not slowed down by compression.
///
/// Estimates come from real batches (`record`) and from small probes: every `probeInterval`
/// batches, `plan` asks the caller to compress a sample of at most `probeBytes` with another
/// candidate, only to measure it (the batch itself is still sent with the chosen codec).
public final class AdaptiveSelector {
    public struct Estimate: Hashable, Sendable {
        /// Input bytes compressed per second by one thread.
        public var bytesPerSecond: Double
        /// Output bytes per input byte (0.25 = compresses 4:1).
        public var ratio: Double
        public var samples: Int
    }

    public struct Plan: Hashable, Sendable {
        /// Compress this batch with this codec (`.none`: send the pages raw).
        public var codec: CompressionCodec
        /// If set, also compress up to `probeBytes` of the batch with this codec and `record`
        /// the result, without sending it.
        public var probe: CompressionCodec?
        public init(codec: CompressionCodec, probe: CompressionCodec? = nil) { self.codec = codec; self.probe = probe }
    }

    public let candidates: [CompressionCodec]
    /// Link throughput in bytes per second, as measured by the transport. Update it often.
    public var linkBytesPerSecond: Double
    /// Compression threads working in parallel.
    public var threads: Int
    /// A codec must deliver at least this factor of the raw rate to be chosen.
    public var margin: Double
    public var probeInterval: Int
    public var probeBytes: Int
    /// Weight of a new measurement in the moving averages.
    public var smoothing: Double

    public private(set) var estimates: [CompressionCodec: Estimate] = [:]
    private var batches = 0
    private var nextProbe = 0

    public init(candidates: [CompressionCodec] = [.lz4(acceleration: 1), .zstd(level: -1), .zstd(level: 1), .zstd(level: 3)],
                linkBytesPerSecond: Double, threads: Int = 1, margin: Double = 1.1,
                probeInterval: Int = 16, probeBytes: Int = 64 << 10, smoothing: Double = 0.25) {
        self.candidates = candidates.filter { $0 != .none }
        self.linkBytesPerSecond = linkBytesPerSecond
        self.threads = threads
        self.margin = margin
        self.probeInterval = probeInterval
        self.probeBytes = probeBytes
        self.smoothing = smoothing
    }

    /// Expected page bytes per second with `codec` under the current estimates.
    public func expectedRate(_ codec: CompressionCodec) -> Double? {
        if codec == .none { return linkBytesPerSecond }
        guard let e = estimates[codec] else { return nil }
        return min(e.bytesPerSecond * Double(threads), linkBytesPerSecond / max(e.ratio, 1e-6))
    }

    /// The best codec under the current estimates (`.none` when nothing beats raw).
    public func choose() -> CompressionCodec {
        var best = CompressionCodec.none
        var bestRate = linkBytesPerSecond * margin
        for c in candidates {
            guard let e = estimates[c], let rate = expectedRate(c) else { continue }
            // Compressing slower than the link sends raw pages would slow the link: never.
            if e.bytesPerSecond * Double(threads) <= linkBytesPerSecond { continue }
            if rate > bestRate { best = c; bestRate = rate }
        }
        return best
    }

    /// What to do for the next batch.
    public func plan() -> Plan {
        defer { batches += 1 }
        let codec = choose()
        // Candidates never measured are probed first; then one candidate every probeInterval batches.
        if let unmeasured = candidates.first(where: { estimates[$0] == nil }) {
            return Plan(codec: codec, probe: unmeasured)
        }
        if probeInterval > 0 && batches % probeInterval == 0 && !candidates.isEmpty {
            let others = candidates.filter { $0 != codec }
            if !others.isEmpty {
                nextProbe = (nextProbe + 1) % others.count
                return Plan(codec: codec, probe: others[nextProbe])
            }
        }
        return Plan(codec: codec, probe: nil)
    }

    /// Records one measured compression: `input` bytes became `output` bytes in `seconds`.
    public func record(_ codec: CompressionCodec, input: Int, output: Int, seconds: Double) {
        guard codec != .none, input > 0, seconds > 0 else { return }
        let speed = Double(input) / seconds
        let ratio = Double(output) / Double(input)
        if var e = estimates[codec] {
            e.bytesPerSecond += smoothing * (speed - e.bytesPerSecond)
            e.ratio += smoothing * (ratio - e.ratio)
            e.samples += 1
            estimates[codec] = e
        } else {
            estimates[codec] = Estimate(bytesPerSecond: speed, ratio: ratio, samples: 1)
        }
    }

    /// Forgets the estimates (e.g. when the guest's workload changes phase).
    public func reset() { estimates = [:] }
}
