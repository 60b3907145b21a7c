/// A set of guest pages, one bit per 4 KiB page of each memory slot, laid out as KVM's dirty bitmaps are
/// (64-bit words, bit n of word w is page 64w+n of the slot), so that a slot's part can be handed to KVM as is.
public struct GuestPageBitmap: Equatable, Sendable {
    public struct Slot: Equatable, Sendable {
        public let id: UInt32
        public let guestPhysicalAddress: UInt64
        public let pageCount: Int
        /// Index of this slot's first word in `words`.
        let firstWord: Int
        var wordCount: Int { (pageCount + 63) / 64 }
    }

    public let slots: [Slot]
    var words: [UInt64]

    public init(slots memorySlots: [MemorySlot]) {
        var next = 0
        slots = memorySlots.map { slot in
            defer { next += (slot.pageCount + 63) / 64 }
            return Slot(id: slot.id, guestPhysicalAddress: slot.guestPhysicalAddress, pageCount: slot.pageCount, firstWord: next)
        }
        words = [UInt64](repeating: 0, count: next)
    }

    /// The number of pages in the set.
    public var count: Int { words.reduce(0) { $0 + $1.nonzeroBitCount } }
    public var isEmpty: Bool { !words.contains { $0 != 0 } }

    public mutating func removeAll() {
        words.withUnsafeMutableBufferPointer { $0.update(repeating: 0) }
    }

    /// Adds the pages that overlap `[address, address + length)`. Addresses outside every slot are ignored:
    /// they are not guest RAM, so there is nothing to track.
    public mutating func insert(guestPhysicalAddress address: UInt64, length: Int = 1) {
        guard length > 0 else { return }
        let end = address + UInt64(length)
        for slot in slots {
            let slotEnd = slot.guestPhysicalAddress + UInt64(slot.pageCount * pageSize)
            let lower = max(address, slot.guestPhysicalAddress), upper = min(end, slotEnd)
            guard lower < upper else { continue }
            let firstPage = Int((lower - slot.guestPhysicalAddress) / UInt64(pageSize))
            let lastPage = Int((upper - 1 - slot.guestPhysicalAddress) / UInt64(pageSize))
            for page in firstPage ... lastPage { words[slot.firstWord + page / 64] |= 1 << UInt64(page % 64) }
        }
    }

    /// Adds page `page` of the slot at `slotIndex` in `slots`.
    public mutating func insert(slotIndex: Int, page: Int) {
        let slot = slots[slotIndex]
        precondition(page < slot.pageCount, "page \(page) beyond slot \(slot.id)")
        words[slot.firstWord + page / 64] |= 1 << UInt64(page % 64)
    }

    public func contains(guestPhysicalAddress address: UInt64) -> Bool {
        guard let (slot, page) = locate(address) else { return false }
        return words[slot.firstWord + page / 64] & (1 << UInt64(page % 64)) != 0
    }

    public mutating func formUnion(_ other: GuestPageBitmap) {
        precondition(other.slots == slots, "bitmaps of different memory layouts")
        for index in words.indices { words[index] |= other.words[index] }
    }

    /// Calls `body` with the guest-physical address of every page in the set, in ascending order per slot.
    public func forEachPage(_ body: (UInt64) throws -> Void) rethrows {
        for slot in slots {
            for wordIndex in 0 ..< slot.wordCount {
                var word = words[slot.firstWord + wordIndex]
                while word != 0 {
                    let bit = word.trailingZeroBitCount
                    word &= word - 1
                    try body(slot.guestPhysicalAddress + UInt64((wordIndex * 64 + bit) * pageSize))
                }
            }
        }
    }

    /// Every page address in the set; for tests and reports, not for the data path.
    public var guestPhysicalAddresses: [UInt64] {
        var result: [UInt64] = []
        forEachPage { result.append($0) }
        return result
    }

    /// Gives `body` the words of the slot at `slotIndex`, to be filled by KVM or read in bulk.
    public mutating func withSlotWords<R>(_ slotIndex: Int, _ body: (UnsafeMutableBufferPointer<UInt64>) throws -> R) rethrows -> R {
        let slot = slots[slotIndex]
        return try words.withUnsafeMutableBufferPointer { all in
            try body(UnsafeMutableBufferPointer(rebasing: all[slot.firstWord ..< slot.firstWord + slot.wordCount]))
        }
    }

    private func locate(_ address: UInt64) -> (Slot, Int)? {
        for slot in slots where address >= slot.guestPhysicalAddress {
            let page = Int((address - slot.guestPhysicalAddress) / UInt64(pageSize))
            if page < slot.pageCount { return (slot, page) }
        }
        return nil
    }
}
