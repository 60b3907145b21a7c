import Foundation

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

    func close() {
        condition.withLock {
            closed = true
            condition.broadcast()
        }
    }
}
