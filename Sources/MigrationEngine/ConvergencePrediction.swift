/// How many distinct pages a guest dirties in a window of time, from measured points, read between and beyond them.
///
/// A rate alone is not enough: a guest that rewrites a working set dirties pages at its write rate only until a
/// window covers the whole set, and no more after that, so a pass twice as long does not leave twice as many dirty
/// pages. The curve keeps windows of several lengths and reads linearly between them; beyond the longest it goes on
/// at the slope of its last segment (the bend seen so far), up to `pageLimit`.
public struct DirtyCurve: Sendable, Codable, Equatable {
    /// A window's length and the distinct pages the unthrottled guest dirtied in it.
    public struct Point: Sendable, Codable, Equatable {
        public var seconds: Double
        public var pages: Double

        public init(seconds: Double, pages: Double) {
            self.seconds = seconds
            self.pages = pages
        }
    }

    /// Ascending in `seconds`, each with `seconds > 0`, no two the same length.
    public private(set) var points: [Point] = []
    /// No window dirties more pages than this: the guest's memory.
    public var pageLimit: Double

    public init(points: [Point], pageLimit: Double) {
        self.pageLimit = pageLimit
        for point in points { add(point) }
    }

    /// Adds a measured window. A second measurement of a window of the same length replaces the first: the later
    /// one was made closer to the time the curve is read for.
    public mutating func add(_ point: Point) {
        guard point.seconds > 0, point.seconds.isFinite, point.pages >= 0 else { return }
        points.removeAll { abs($0.seconds - point.seconds) < 1e-6 }
        points.append(point)
        points.sort { $0.seconds < $1.seconds }
    }

    /// Pages dirtied in `seconds` by the guest throttled to `throttle`, which then runs `1 - throttle` of the time.
    public func pages(in seconds: Double, throttle: Double = 0) -> Double {
        let running = seconds * max(0, 1 - throttle)
        guard running > 0, let last = points.last else { return 0 }
        var previous = Point(seconds: 0, pages: 0)
        for point in points {
            if running <= point.seconds {
                let fraction = (running - previous.seconds) / (point.seconds - previous.seconds)
                return min(previous.pages + fraction * (point.pages - previous.pages), pageLimit)
            }
            previous = point
        }
        let before = points.count > 1 ? points[points.count - 2] : Point(seconds: 0, pages: 0)
        let slope = max(0, (last.pages - before.pages) / (last.seconds - before.seconds))
        return min(last.pages + slope * (running - last.seconds), pageLimit)
    }

    /// Bytes per second the unthrottled guest dirties over the longest window measured; 0 with none.
    public var bytesPerSecond: Double {
        guard let last = points.last else { return 0 }
        return last.pages * 4096 / last.seconds
    }
}

/// What a prediction of a migration is made from: measurements only, so that it can be checked without a guest.
public struct ConvergenceMeasurements: Sendable, Codable, Equatable {
    /// Pages with data (populated and not zero) that pass 0 sends; pages known to be zero cost nothing here.
    public var dataPages: Int
    /// What the guest dirties, unthrottled, in windows of time.
    public var dirty: DirtyCurve
    /// Pages with data per second that pass 0 moves end to end: encoding, the link, the receiver writing them into
    /// memory it touches for the first time.
    public var pagesPerSecond: Double
    /// The same in later passes and the final one, whose pages the receiver mostly holds already: where first touching
    /// memory is dear (a memfd here), they go faster.
    public var laterPagesPerSecond: Double
    /// Wire bytes per page with data, after compression.
    public var wireBytesPerPage: Double
    /// Of the pages the pass after pass 0 sends (a pre-copy pass or the final one), the share that go as `unchanged`
    /// (stream.md §6.4.1), at no cost to speak of: pages the guest wrote during pass 0 *before* pass 0 reached them,
    /// so that the receiver holds them as they are. About half of what pass 0 leaves dirty when the guest's writes
    /// and the sender's sweep are independent (`expectedUnchangedShare`); 0 without unchanged pages.
    public var unchangedShareAfterPass0: Double
    /// Seconds before pass 0 starts: connecting, the TLS handshake, agreeing on capabilities.
    public var setupSeconds: Double
    /// Seconds each pre-copy pass costs besides its pages: the dirty-log harvests and waiting for the receiver's
    /// acknowledgement.
    public var passOverheadSeconds: Double
    /// Seconds the switchover costs besides the final pass's pages: capturing the device state, the digest check,
    /// the destination building and starting the guest.
    public var switchoverSeconds: Double

    /// What `switchoverSeconds` is taken to be when nothing measured it: a dry run cannot pause the guest to find out.
    /// 10 ms is the middle of the downtimes of guests with nothing left to send on these machines (bench/README.md).
    public static let assumedSwitchoverSeconds = 0.010

    /// `unchangedShareAfterPass0` before a pass after pass 0 has measured it.
    public static func expectedUnchangedShare(_ options: MigrationOptions) -> Double { options.unchangedPages ? 0.5 : 0 }

    public init(dataPages: Int, dirty: DirtyCurve, pagesPerSecond: Double, laterPagesPerSecond: Double, wireBytesPerPage: Double,
                unchangedShareAfterPass0: Double, setupSeconds: Double, passOverheadSeconds: Double,
                switchoverSeconds: Double = Self.assumedSwitchoverSeconds) {
        self.unchangedShareAfterPass0 = unchangedShareAfterPass0
        self.dataPages = dataPages
        self.dirty = dirty
        self.pagesPerSecond = pagesPerSecond
        self.laterPagesPerSecond = laterPagesPerSecond
        self.wireBytesPerPage = wireBytesPerPage
        self.setupSeconds = setupSeconds
        self.passOverheadSeconds = passOverheadSeconds
        self.switchoverSeconds = switchoverSeconds
    }

    /// These measurements, corrected by the passes a migration has run: pass 0 gives the first rate, later passes
    /// the later one (until there are any, pass 0's stands in for it when nothing was measured beforehand), the bytes
    /// per page become those of the pages sent so far, and each pass adds its own dirty window (what it dirtied in
    /// its time, at its throttle). `harvestSeconds` is the mean time of one harvest, which each pass runs twice.
    public func refined(by history: [PassStatistics], setupSeconds: Double, harvestSeconds: Double) -> ConvergenceMeasurements {
        var refined = self
        refined.setupSeconds = setupSeconds
        refined.passOverheadSeconds = 2 * harvestSeconds
        /// Pages with data per second over `passes`; nil when they sent none.
        func rate(_ passes: some Collection<PassStatistics>) -> Double? {
            let data = passes.reduce(0) { $0 + $1.pagesSent - $1.zeroPages }
            let sending = passes.reduce(0.0) { $0 + max($1.seconds - refined.passOverheadSeconds, 0) }
            return data > 0 && sending > 0 ? Double(data) / sending : nil
        }
        if let first = rate(history.filter { $0.pass == 0 }) { refined.pagesPerSecond = first }
        if let later = rate(history.filter { $0.pass > 0 }) {
            refined.laterPagesPerSecond = later
        } else if refined.laterPagesPerSecond <= 0 {
            refined.laterPagesPerSecond = refined.pagesPerSecond
        }
        // Bytes per page as pass 0 sent them: later passes' bytes are cut by unchanged pages, which the share models.
        if let pass0 = history.first(where: { $0.pass == 0 }), pass0.pagesSent > pass0.zeroPages {
            refined.wireBytesPerPage = Double(pass0.wireBytes) / Double(pass0.pagesSent - pass0.zeroPages)
        }
        if let pass1 = history.first(where: { $0.pass == 1 }), pass1.pagesSent > pass1.zeroPages {
            refined.unchangedShareAfterPass0 = Double(pass1.unchangedPages) / Double(pass1.pagesSent - pass1.zeroPages)
        }
        for pass in history where pass.throttle < 1 {
            refined.dirty.add(DirtyCurve.Point(seconds: pass.seconds * (1 - pass.throttle), pages: Double(pass.dirtyPages)))
        }
        return refined
    }
}

/// What a migration will do, predicted by running the engine's own `ConvergencePolicy` over passes simulated from
/// measurements: each pass sends what the one before left dirty, at the measured rate (pass 0's, or the later passes'),
/// and leaves dirty what the guest's dirty curve says for its length and throttle. The policy then decides, as it will
/// in the engine, whether to go on, throttle, switch over or give up, so the prediction cannot drift from what the
/// engine does.
public struct ConvergencePrediction: Sendable, Codable, Equatable {
    /// One simulated pre-copy pass.
    public struct Pass: Sendable, Codable, Equatable {
        public var pass: Int
        public var pages: Int
        public var seconds: Double
        /// Pages the guest dirties meanwhile: the next pass's work.
        public var dirtyPages: Int
        public var throttle: Double
    }

    /// The last pass the migration had finished when this was predicted; nil before the first.
    public var afterPass: Int?
    /// The pre-copy passes still to come.
    public var passes: [Pass]
    /// Pages sent with the guest paused.
    public var finalPages: Int
    /// From the start of the migration until the destination runs the guest, or until the migration gives up.
    public var totalSeconds: Double
    /// The pause of the guest; nil when the migration will not converge.
    public var downtimeSeconds: Double?
    /// Why the migration will give up, in the policy's words; nil when it converges.
    public var failure: String?
    /// The heaviest auto-converge throttle the migration will need; 0 for none.
    public var throttle: Double

    public var converges: Bool { failure == nil }

    /// Predicts the rest of a migration run with `options`, from `measurements` and the passes it has run so far
    /// (`history`, none for a prediction made before it starts), `elapsed` seconds after its start, at `throttle`.
    public static func predict(_ measurements: ConvergenceMeasurements, options: MigrationOptions, history: [PassStatistics] = [],
                               elapsed: Double? = nil, throttle: Double = 0) -> ConvergencePrediction {
        var history = history
        var prediction = ConvergencePrediction(afterPass: history.last?.pass, passes: [], finalPages: 0, totalSeconds: 0,
                                               downtimeSeconds: nil, failure: nil, throttle: throttle)
        var elapsed = elapsed ?? measurements.setupSeconds
        var throttle = throttle
        var pending = history.last?.dirtyPages ?? measurements.dataPages
        var totalBytes = history.reduce(0) { $0 + $1.wireBytes }
        let policy = ConvergencePolicy(options: options)
        guard measurements.pagesPerSecond > 0, measurements.laterPagesPerSecond > 0 else {
            prediction.failure = "no rate was measured for sending pages"
            prediction.totalSeconds = .infinity
            return prediction
        }
        /// Pages of pass `pass` that cost their sending: all but the unchanged ones.
        func costing(_ pages: Int, pass: Int) -> Double {
            Double(pages) * (pass == 1 ? 1 - measurements.unchangedShareAfterPass0 : 1)
        }
        func sendingTime(_ pages: Int, pass: Int) -> Double {
            costing(pages, pass: pass) / (pass == 0 ? measurements.pagesPerSecond : measurements.laterPagesPerSecond)
        }
        // The policy ends every migration within `maxPasses`; the bound only guards against a policy that would not.
        while prediction.passes.count <= options.maxPasses {
            if !history.isEmpty {
                switch policy.decide(history: history, elapsed: elapsed, throttle: throttle) {
                case .switchover:
                    let downtime = sendingTime(pending, pass: history.count) + measurements.switchoverSeconds
                    prediction.finalPages = pending
                    prediction.downtimeSeconds = downtime
                    prediction.totalSeconds = elapsed + downtime
                    return prediction
                case .postCopy:
                    // The destination runs as soon as the device state and the list of missing pages are over; those
                    // pages follow while it runs, after the time this predicts.
                    prediction.finalPages = pending
                    prediction.downtimeSeconds = measurements.switchoverSeconds
                    prediction.totalSeconds = elapsed + measurements.switchoverSeconds
                    return prediction
                case .giveUp(let why):
                    prediction.failure = why
                    prediction.totalSeconds = elapsed
                    return prediction
                case .throttle(let fraction):
                    throttle = fraction
                    prediction.throttle = max(prediction.throttle, fraction)
                case .nextPass:
                    break
                }
            }
            var pass = PassStatistics(pass: history.count)
            pass.pagesSent = pending
            pass.wireBytes = Int(costing(pending, pass: pass.pass) * measurements.wireBytesPerPage)
            pass.seconds = sendingTime(pending, pass: pass.pass) + measurements.passOverheadSeconds
            pass.dirtyPages = Int(measurements.dirty.pages(in: pass.seconds, throttle: throttle).rounded())
            pass.throttle = throttle
            totalBytes += pass.wireBytes
            // As the sender rates the next pass: by the wire bytes per page of this one.
            pass.estimate(totalBytes: totalBytes, bytesPerDirtyPage: pending > 0 ? Double(pass.wireBytes) / Double(pending) : measurements.wireBytesPerPage,
                          earlier: history)
            history.append(pass)
            prediction.passes.append(Pass(pass: pass.pass, pages: pass.pagesSent, seconds: pass.seconds, dirtyPages: pass.dirtyPages,
                                          throttle: throttle))
            elapsed += pass.seconds
            pending = pass.dirtyPages
        }
        prediction.failure = "the convergence policy did not end the migration within \(options.maxPasses) passes"
        prediction.totalSeconds = elapsed
        return prediction
    }
}
