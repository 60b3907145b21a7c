import Foundation
import MigratedAPI
import Threads

/// How incoming migrations ended, for `GET /migrations/incoming` and the metrics: the latest ones, and counts by
/// outcome since the daemon started. A migration whose source died mid-way leaves its reason here, besides the log.
final class ArrivalLog: Sendable {
    /// Records kept; older ones are dropped, their counts stay.
    static let capacity = 32

    private struct State {
        var recent: [IncomingMigrationRecord] = []
        var counts: [IncomingOutcome: Int] = [:]
    }
    private let state = Locked(State())

    func record(_ record: IncomingMigrationRecord) {
        state.withLock { state in
            state.recent.append(record)
            if state.recent.count > Self.capacity { state.recent.removeFirst(state.recent.count - Self.capacity) }
            state.counts[record.outcome, default: 0] += 1
        }
    }

    var recent: [IncomingMigrationRecord] { state.withLock { $0.recent } }

    /// Every outcome, 0 included, so that a dashboard sees the series before the first failure.
    var counts: [(IncomingOutcome, Int)] {
        state.withLock { state in IncomingOutcome.allCases.map { ($0, state.counts[$0] ?? 0) } }
    }
}
