/// Decides, after each pre-copy pass, what comes next: another pass, a heavier throttle, the switchover, or
/// giving up. It sees only measurements, so it can be tested without a guest.
public struct ConvergencePolicy: Sendable {
    public enum Decision: Equatable, Sendable {
        case nextPass
        /// Another pass, with the guest throttled to this fraction.
        case throttle(Double)
        case switchover
        /// Start the destination now, and send what it lacks while it runs (`MigrationOptions.postCopy`).
        case postCopy
        case giveUp(String)
    }

    public let options: MigrationOptions
    /// Passes in a row without the dirty set shrinking by at least 5%, at the highest throttle available,
    /// after which the migration is declared stalled.
    public static let stallPasses = 3

    public init(options: MigrationOptions) { self.options = options }

    /// `history` holds every pass so far, the last being the one just finished.
    public func decide(history: [PassStatistics], elapsed: Double, throttle: Double) -> Decision {
        let preCopy = decidePreCopy(history: history, elapsed: elapsed, throttle: throttle)
        guard options.postCopy else { return preCopy }
        switch preCopy {
        case .nextPass:
            if let after = options.postCopyAfterPasses, history.count >= after { return .postCopy }
            return .nextPass
        // Pre-copy alone would not meet the downtime limit: post-copy meets it instead, without slowing the guest.
        case .throttle, .giveUp: return .postCopy
        case .switchover, .postCopy: return preCopy
        }
    }

    private func decidePreCopy(history: [PassStatistics], elapsed: Double, throttle: Double) -> Decision {
        guard let last = history.last else { return .nextPass }
        if last.expectedDowntime <= options.downtimeLimit { return .switchover }

        let summary = String(format: "expected downtime %.3f s over the limit of %.3f s; guest dirties %.0f MB/s, link carries %.0f MB/s",
                             last.expectedDowntime, options.downtimeLimit, last.dirtyRate / 1e6, last.bandwidth / 1e6)
        if history.count >= options.maxPasses { return .giveUp("\(history.count) passes: \(summary)") }
        if elapsed >= options.timeLimit { return .giveUp(String(format: "%.0f s: ", elapsed) + summary) }

        let canThrottleMore = options.autoConverge && throttle < options.throttleMaximum
        if !canThrottleMore, isStalled(history) {
            return .giveUp("stalled for \(Self.stallPasses) passes: \(summary)")
        }
        // Auto-converge, as QEMU does it: when the guest dirties more than half of what the link carries,
        // pre-copy alone will not catch up, so slow the guest down a step more each pass.
        if options.autoConverge, last.dirtyRate > 0.5 * last.bandwidth, canThrottleMore {
            let next = throttle == 0 ? options.throttleInitial : throttle + options.throttleIncrement
            return .throttle(min(next, options.throttleMaximum))
        }
        return .nextPass
    }

    private func isStalled(_ history: [PassStatistics]) -> Bool {
        guard history.count > Self.stallPasses else { return false }
        let recent = history.suffix(Self.stallPasses + 1).map(\.dirtyPages)
        return zip(recent, recent.dropFirst()).allSatisfy { previous, next in Double(next) >= 0.95 * Double(previous) }
    }
}
