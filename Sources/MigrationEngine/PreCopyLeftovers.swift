import Foundation
import MigrationWire
import PageCodec
import Threads

/// The memory a pre-copy left at its receiver when its link broke (stream.md §6.15): the sink, prepared for `layout`
/// and never started, holding pages of the guest in the versions whose hashes `held` records, under the sender's
/// ticket. A migration that claims the ticket carries on in it; otherwise it is discarded.
///
/// `held` is exact: for every frame, the hash of what the sink's memory holds (zero for a page never written). The
/// receiver builds it from its channels' digests once every page it read is written, and hashes again the pages
/// whose state it cannot vouch for (a payload that stopped halfway into memory).
///
/// Sendable: immutable once made; `sink` follows the `GuestSink` thread contract (one migration at a time uses it).
public final class PreCopyLeftovers: @unchecked Sendable {
    public let sink: GuestSink
    public let layout: GuestMemoryLayout
    public let ticket: ResumeTicket
    /// Who sent the pages, as the receiver's owner names peers (a certificate name or an address).
    public let peer: String
    let held: DigestTracker
    /// Pages held: frames whose hash is not zero.
    public let heldPages: Int

    init(sink: GuestSink, layout: GuestMemoryLayout, ticket: ResumeTicket, peer: String, held: DigestTracker) {
        self.sink = sink
        self.layout = layout
        self.ticket = ticket
        self.peer = peer
        self.held = held
        var count = 0
        held.forEachHeld { _, _ in count += 1 }
        heldPages = count
    }

    /// The held pages as HELD_PAGES records, straight from the hashes `held` records.
    func encodeHeldPages(with encoder: StreamEncoder, into out: inout [UInt8]) {
        precondition(MemoryLayout<PageHash>.size == 16 && MemoryLayout<PageHash>.offset(of: \PageHash.high) == 8, "PageHash is low, high")
        held.forEachHeldRun { first, hashes in encoder.encodeHeldPageRecords(first: first, hashes: UnsafeRawBufferPointer(hashes), into: &out) }
    }
}

/// Where a receiver keeps the memory of pre-copies whose links broke, for a grace period, and where a resumed
/// migration claims it (stream.md §6.15). Kept memory is gone when the grace period ends, when a migration that is
/// not a resume of it starts from the same peer, when a migration claims its ticket from another peer or with
/// another layout, when its sender says it will not resume (`MigrationSender.discardKeptMemory`), or on `discardAll`. It lives in this process's memory only: a receiver that restarts has none,
/// and a resume then falls back to a full migration.
///
/// Sendable: `kept` is guarded by its lock; a discarded set is discarded outside it.
public final class PreCopyLeftoverShelf: Sendable {
    /// Seconds kept memory waits for its resume.
    public let gracePeriod: Double
    private let kept = Locked<[Entry]>([])
    private struct Entry {
        let leftovers: PreCopyLeftovers
        let until: Double
    }

    public init(gracePeriod: Double = 60) {
        self.gracePeriod = gracePeriod
    }

    /// What a shelf holds, for status pages.
    public struct Kept: Sendable, Equatable {
        public var peer: String
        public var ticket: ResumeTicket
        public var heldPages: Int
        public var bytes: UInt64
        public var secondsLeft: Double
    }

    public var contents: [Kept] {
        kept.withLock { entries in
            entries.map {
                Kept(peer: $0.leftovers.peer, ticket: $0.leftovers.ticket, heldPages: $0.leftovers.heldPages,
                     bytes: $0.leftovers.layout.totalBytes, secondsLeft: max(0, $0.until - monotonicSeconds()))
            }
        }
    }

    /// Keeps `leftovers` for the grace period; memory kept before under the same ticket goes.
    func keep(_ leftovers: PreCopyLeftovers) {
        let until = monotonicSeconds() + gracePeriod
        let replaced = kept.withLock { entries in
            let old = entries.filter { $0.leftovers.ticket == leftovers.ticket }
            entries.removeAll { $0.leftovers.ticket == leftovers.ticket }
            entries.append(Entry(leftovers: leftovers, until: until))
            return old
        }
        for entry in replaced { entry.leftovers.sink.discard() }
        let ticket = leftovers.ticket
        DispatchQueue.global().asyncAfter(deadline: .now() + gracePeriod) { [self] in
            discard { $0.leftovers.ticket == ticket && $0.until <= monotonicSeconds() }
        }
    }

    /// The answer to a migration from `peer` that carries `ticket`: the memory it resumes, if it asks to resume and
    /// memory of `layout` from `peer` is kept under the ticket; otherwise why not. A migration that does not resume
    /// is another migration starting: memory kept from `peer` goes, whatever its ticket.
    func claim(_ ticket: PreCopyTicket, peer: String, layout: GuestMemoryLayout) -> Claim {
        let (taken, dropped) = kept.withLock { entries -> (PreCopyLeftovers?, [PreCopyLeftovers]) in
            let dropped = entries.filter { $0.leftovers.ticket == ticket.ticket || (!ticket.resume && $0.leftovers.peer == peer) }
            entries.removeAll { $0.leftovers.ticket == ticket.ticket || (!ticket.resume && $0.leftovers.peer == peer) }
            guard ticket.resume, let match = dropped.first(where: { $0.leftovers.ticket == ticket.ticket }),
                  match.leftovers.peer == peer, match.leftovers.layout == layout else { return (nil, dropped.map(\.leftovers)) }
            return (match.leftovers, dropped.map(\.leftovers).filter { $0 !== match.leftovers })
        }
        let outcome: PreCopyResumed.Outcome
        if taken != nil {
            outcome = .resumed
        } else if let mismatch = dropped.first(where: { $0.ticket == ticket.ticket }) {
            outcome = mismatch.peer != peer ? .peerDiffers : .layoutDiffers
        } else {
            outcome = .nothingKept
        }
        for leftovers in dropped { leftovers.sink.discard() }
        return Claim(leftovers: taken, outcome: outcome)
    }

    struct Claim {
        let leftovers: PreCopyLeftovers?
        let outcome: PreCopyResumed.Outcome
    }

    /// Drops the memory `peer` left under `ticket`, its sender having said it will not resume it; false when none is kept.
    func drop(_ ticket: ResumeTicket, from peer: String) -> Bool {
        let gone = kept.withLock { entries in
            let gone = entries.filter { $0.leftovers.ticket == ticket && $0.leftovers.peer == peer }
            entries.removeAll { $0.leftovers.ticket == ticket && $0.leftovers.peer == peer }
            return gone
        }
        for entry in gone { entry.leftovers.sink.discard() }
        return !gone.isEmpty
    }

    /// Discards everything kept: the receiver stops, or its owner says so.
    public func discardAll() { discard { _ in true } }

    private func discard(where matches: (Entry) -> Bool) {
        let gone = kept.withLock { entries in
            let gone = entries.filter(matches)
            entries.removeAll(where: matches)
            return gone
        }
        for entry in gone { entry.leftovers.sink.discard() }
    }
}
