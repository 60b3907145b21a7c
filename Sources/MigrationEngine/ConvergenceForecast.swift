/// The running prediction of a migration, kept by the sender: made before the first pass from measurements taken
/// beforehand (a dry run's), if any, and made again after every pass from those measurements refined by the passes
/// so far. Without measurements beforehand the first prediction comes after pass 0, from what it measured.
///
/// Used from the sender's run thread only.
struct ConvergenceForecast {
    private let options: MigrationOptions
    private let beforehand: ConvergenceMeasurements?
    /// Every prediction made, oldest first, and the elapsed seconds each was made at.
    private(set) var predictions: [ConvergencePrediction] = []
    private var madeAt = 0.0

    init(options: MigrationOptions, beforehand: ConvergenceMeasurements?) {
        self.options = options
        self.beforehand = beforehand
    }

    /// Before pass 0, once set up: predicts from the measurements beforehand, with the setup as it took.
    mutating func start(setupSeconds: Double) {
        guard var measurements = beforehand else { return }
        measurements.setupSeconds = setupSeconds
        record(ConvergencePrediction.predict(measurements, options: options), at: setupSeconds)
    }

    /// After each pass: `history` holds every pass so far, `harvests` and `harvestSeconds` what harvesting cost.
    mutating func update(history: [PassStatistics], elapsed: Double, throttle: Double, setupSeconds: Double, harvests: Int,
                         harvestSeconds: Double, memoryPages: Int) {
        let base = beforehand ?? ConvergenceMeasurements(dataPages: 0, dirty: DirtyCurve(points: [], pageLimit: Double(memoryPages)),
                                                         pagesPerSecond: 0, laterPagesPerSecond: 0, wireBytesPerPage: 4096,
                                                         unchangedShareAfterPass0: ConvergenceMeasurements.expectedUnchangedShare(options),
                                                         setupSeconds: setupSeconds,
                                                         passOverheadSeconds: 0)
        let measurements = base.refined(by: history, setupSeconds: setupSeconds, harvestSeconds: harvests > 0 ? harvestSeconds / Double(harvests) : 0)
        record(ConvergencePrediction.predict(measurements, options: options, history: history, elapsed: elapsed, throttle: throttle),
               at: elapsed)
    }

    private mutating func record(_ prediction: ConvergencePrediction, at elapsed: Double) {
        predictions.append(prediction)
        madeAt = elapsed
    }

    /// Seconds until the destination runs the guest, as the latest prediction has it, `elapsed` seconds into the
    /// migration; nil before the first prediction or when it says the migration will give up.
    func secondsLeft(elapsed: Double) -> Double? {
        guard let latest = predictions.last, latest.converges, latest.totalSeconds.isFinite else { return nil }
        return max(latest.totalSeconds - elapsed, 0)
    }

    /// The downtime the latest prediction expects.
    var downtime: Double? { predictions.last?.downtimeSeconds }
}
