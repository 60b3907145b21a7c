import Foundation
import Threads

/// Items passed from one thread to another in order. `put` waits while `capacity` items are waiting; `take`
/// waits for an item, and returns nil once the hand-off is closed and empty. A closed hand-off drops what is
/// put into it.
///
/// Sendable because `items` and `closed` are touched only under `condition`. The items themselves need not be
/// Sendable: each is owned by one thread at a time, the putter giving it up when it puts it, and the condition's
/// lock orders the putter's writes to it before the taker's reads.
final class HandOff<Item>: @unchecked Sendable {
    private let condition = NSCondition()
    private var items: [Item]
    private let capacity: Int
    private var closed = false

    init(_ items: [Item], capacity: Int = .max) {
        self.items = items
        self.capacity = capacity
    }

    func put(_ item: Item) {
        condition.withLock {
            while items.count >= capacity, !closed { condition.wait() }
            guard !closed else { return }
            items.append(item)
            condition.broadcast()
        }
    }

    func take() -> Item? {
        condition.withLock {
            while items.isEmpty, !closed { condition.wait() }
            guard !items.isEmpty else { return nil }
            condition.broadcast() // a put may be waiting for room
            return items.removeFirst()
        }
    }

    /// `take`, giving up after `timeout` seconds (nil then, as when closed).
    func take(timeout: Double) -> Item? {
        let deadline = Date(timeIntervalSinceNow: timeout)
        return condition.withLock {
            while items.isEmpty, !closed {
                if !condition.wait(until: deadline) { break }
            }
            guard !items.isEmpty else { return nil }
            condition.broadcast()
            return items.removeFirst()
        }
    }

    func close() {
        condition.withLock {
            closed = true
            condition.broadcast()
        }
    }
}

/// Where a post-copy whose link broke waits for new channels (stream.md §6.14), and where its owner hands them over.
///
/// Sendable: `waiting` is Locked, and channels pass through a HandOff.
final class ResumePoint: Sendable {
    private let waiting = Locked(false)
    private let handed = HandOff<[MigrationChannel]?>([])

    /// Hands `channels` (nil: the waiter opens its own) to a waiting post-copy; false, taking nothing, when none waits.
    func offer(_ channels: [MigrationChannel]?) -> Bool {
        let taken = waiting.withLock { waiting in
            defer { waiting = false }
            return waiting
        }
        if taken { handed.put(channels) }
        return taken
    }

    /// Waits up to `timeout` seconds for `offer`: its channels (or nil inside: open new ones), or nil for none.
    /// `announce` runs once an offer would be taken, before the wait.
    func wait(timeout: Double, announce: () -> Void) -> [MigrationChannel]?? {
        waiting.withLock { $0 = true }
        announce()
        if let channels = handed.take(timeout: timeout) { return .some(channels) }
        // An offer that came at the last moment is on its way: take it.
        let offered = waiting.withLock { waiting in
            defer { waiting = false }
            return !waiting
        }
        return offered ? handed.take() : nil
    }
}
