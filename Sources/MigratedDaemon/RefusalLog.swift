import Foundation

/// Which refused incoming connections to log: the first from each source in a window, then a count. A host that
/// floods the migration port with bad connections costs the log one line per window, not one line each, and the
/// refusals of other hosts still show.
///
/// Sendable: `sources` is guarded by `lock`, and `now` is called only under it.
final class RefusalLog: @unchecked Sendable {
    /// What to say about one refusal.
    enum Verdict: Equatable {
        /// Log it; `suppressed` refusals from the same source went unlogged in the window before.
        case log(suppressed: Int)
        /// Count it only.
        case quiet
    }

    let window: Double
    private let now: () -> Double
    private let lock = NSLock()
    // Guarded by `lock`: per source, when its window began and how many refusals it has kept quiet.
    private var sources: [String: (start: Double, suppressed: Int)] = [:]
    /// Sources remembered at most: beyond, those whose window has ended are forgotten, or all if none has.
    static let maximumSources = 4096

    init(window: Double = 10, now: @escaping () -> Double = { ProcessInfo.processInfo.systemUptime }) {
        self.window = window
        self.now = now
    }

    func verdict(for source: String) -> Verdict {
        let time = now()
        return lock.withLock {
            if let entry = sources[source], time - entry.start < window {
                sources[source]?.suppressed += 1
                return .quiet
            }
            if sources.count >= Self.maximumSources {
                sources = sources.filter { time - $0.value.start < window }
                if sources.count >= Self.maximumSources { sources.removeAll() }
            }
            let suppressed = sources[source]?.suppressed ?? 0
            sources[source] = (time, 0)
            return .log(suppressed: suppressed)
        }
    }
}
