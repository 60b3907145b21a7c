import CKVM
import Glibc
import LinuxSystem
import Threads

/// How KVM reports the pages a guest writes. The choice is made when the VM is created, because the ring has
/// to be enabled before any vCPU exists, and the two cannot be mixed.
public enum DirtyTrackingMethod: Equatable, Sendable, CustomStringConvertible {
    /// Per-slot bitmaps, read with KVM_GET_DIRTY_LOG and re-armed with KVM_CLEAR_DIRTY_LOG in chunks
    /// (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), so re-arming touches only what was dirty.
    case bitmap
    /// A ring of dirty-page entries per vCPU (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, or KVM_CAP_DIRTY_LOG_RING),
    /// of this many bytes; harvested, then re-armed with KVM_RESET_DIRTY_RINGS.
    case ring(bytesPerVCPU: Int)

    public var description: String {
        switch self {
        case .bitmap: "bitmap"
        case .ring(let bytes): "ring (\(bytes / 1024) KiB per vCPU)"
        }
    }

    /// The ring size used when none is given: 64 Ki entries, 1 MiB per vCPU (the largest this host allows).
    public static let defaultRing = DirtyTrackingMethod.ring(bytesPerVCPU: 1 << 20)

    /// Enables the method's capability on a new VM; must run before the first vCPU is created.
    public func prepare(_ vm: KVMVirtualMachine) throws {
        switch self {
        case .bitmap:
            try vm.enable(.manualDirtyLogProtect2, arguments: [UInt64(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)])
        case .ring(let bytes):
            guard bytes >= pageSize, bytes & (bytes - 1) == 0 else {
                throw SystemError("dirty ring of \(bytes) bytes: must be a power of two of at least \(pageSize)", errno: EINVAL)
            }
            let capability: KVMCapability = vm.system.check(.dirtyLogRingAcquireRelease) > 0 ? .dirtyLogRingAcquireRelease : .dirtyLogRing
            try vm.enable(capability, arguments: [UInt64(bytes)])
        }
    }
}

/// Dirty-page tracking of a VM, whichever method KVM uses underneath.
///
/// `harvest` returns every page written since tracking started or since the previous harvest, and re-arms
/// tracking for those pages before returning, so a write that lands after the harvest is seen by the next one.
/// Pages that the VMM itself writes into guest memory do not pass through KVM: the VMM reports them with
/// `markDirty`, and they are returned by the next harvest like any other.
public protocol DirtyPageTracker: AnyObject, Sendable {
    var method: DirtyTrackingMethod { get }
    func start() throws
    func harvest(into pages: inout GuestPageBitmap) throws
    func stop() throws
    func markDirty(guestPhysicalAddress: UInt64, length: Int)
    /// Called on a vCPU's thread when KVM stops it because its dirty ring is full.
    func vcpuRingFull(_ vcpu: KVMVCPU) throws
}

/// Creates the tracker for a VM whose method was prepared with `DirtyTrackingMethod.prepare`.
public func makeDirtyPageTracker(method: DirtyTrackingMethod, vm: KVMVirtualMachine, slots: [MemorySlot],
                                 vcpus: [KVMVCPU]) throws -> DirtyPageTracker {
    switch method {
    case .bitmap: return BitmapDirtyTracker(vm: vm, slots: slots)
    case .ring(let bytes): return try RingDirtyTracker(vm: vm, slots: slots, vcpus: vcpus, bytesPerVCPU: bytes)
    }
}

/// Pages the VMM wrote on its own, waiting for the next harvest.
final class HostWrites: Sendable {
    private let pending: Locked<GuestPageBitmap>

    init(slots: [MemorySlot]) { pending = Locked(GuestPageBitmap(slots: slots)) }

    func mark(_ address: UInt64, _ length: Int) {
        pending.withLock { $0.insert(guestPhysicalAddress: address, length: length) }
    }

    func drain(into pages: inout GuestPageBitmap) {
        pending.withLock { pending in
            pages.formUnion(pending)
            pending.removeAll()
        }
    }
}

/// Turns KVM_MEM_LOG_DIRTY_PAGES on or off for every slot.
private func setDirtyLogging(_ enabled: Bool, vm: KVMVirtualMachine, slots: [MemorySlot]) throws {
    for slot in slots { try vm.setMemorySlot(slot, flags: enabled ? .logDirtyPages : []) }
}

final class BitmapDirtyTracker: DirtyPageTracker, Sendable {
    let method = DirtyTrackingMethod.bitmap
    private let vm: KVMVirtualMachine
    private let slots: [MemorySlot]
    private let hostWrites: HostWrites
    /// Pages are cleared in chunks of this many, so that KVM holds its MMU lock for a bounded time per call.
    static let clearChunkPages = 1 << 18

    init(vm: KVMVirtualMachine, slots: [MemorySlot]) {
        self.vm = vm
        self.slots = slots
        hostWrites = HostWrites(slots: slots)
    }

    func start() throws { try setDirtyLogging(true, vm: vm, slots: slots) }
    func stop() throws { try setDirtyLogging(false, vm: vm, slots: slots) }

    func markDirty(guestPhysicalAddress: UInt64, length: Int) { hostWrites.mark(guestPhysicalAddress, length) }

    func vcpuRingFull(_ vcpu: KVMVCPU) throws {
        throw SystemError("vCPU \(vcpu.id) reported a full dirty ring, but this VM tracks with bitmaps", errno: EINVAL)
    }

    func harvest(into pages: inout GuestPageBitmap) throws {
        var fresh = GuestPageBitmap(slots: slots)
        for (index, slot) in slots.enumerated() {
            try fresh.withSlotWords(index) { words in
                try vm.dirtyLog(slot: slot.id, into: words.baseAddress!)
                try clearSetChunks(slot: slot, words: words)
            }
        }
        pages.formUnion(fresh)
        hostWrites.drain(into: &pages)
    }

    /// Re-arms exactly the pages just read, one chunk at a time, skipping chunks with nothing dirty.
    private func clearSetChunks(slot: MemorySlot, words: UnsafeMutableBufferPointer<UInt64>) throws {
        let wordsPerChunk = Self.clearChunkPages / 64
        var firstWord = 0
        while firstWord < words.count {
            let lastWord = min(firstWord + wordsPerChunk, words.count)
            if words[firstWord ..< lastWord].contains(where: { $0 != 0 }) {
                let firstPage = firstWord * 64
                let pageCount = min(lastWord * 64, slot.pageCount) - firstPage
                try vm.clearDirtyLog(slot: slot.id, firstPage: UInt64(firstPage), pageCount: UInt32(pageCount),
                                     bitmap: words.baseAddress! + firstWord)
            }
            firstWord = lastWord
        }
    }
}

final class RingDirtyTracker: DirtyPageTracker, Sendable {
    let method: DirtyTrackingMethod
    private let vm: KVMVirtualMachine
    private let slots: [MemorySlot]
    /// Ring entries name slots by id; this finds the slot's place in `slots`.
    private let slotIndex: [UInt32: Int]
    private let hostWrites: HostWrites

    /// One vCPU's ring and how far we have read it.
    private struct Ring {
        let vcpuID: UInt32
        let mapping: MemoryMapping
        let entryCount: UInt32
        var fetchIndex: UInt32 = 0
    }

    /// Rings are read both by the harvester and, when a ring fills up, by that vCPU's thread; pages found
    /// between harvests wait in `collected`.
    private struct Rings {
        var rings: [Ring]
        var collected: GuestPageBitmap
    }
    private let state: Locked<Rings>

    init(vm: KVMVirtualMachine, slots: [MemorySlot], vcpus: [KVMVCPU], bytesPerVCPU: Int) throws {
        self.method = .ring(bytesPerVCPU: bytesPerVCPU)
        self.vm = vm
        self.slots = slots
        slotIndex = Dictionary(uniqueKeysWithValues: slots.enumerated().map { ($1.id, $0) })
        hostWrites = HostWrites(slots: slots)
        let rings = try vcpus.map { vcpu in
            Ring(vcpuID: vcpu.id, mapping: try vcpu.mapDirtyRing(byteCount: bytesPerVCPU),
                 entryCount: UInt32(bytesPerVCPU / MemoryLayout<kvm_dirty_gfn>.stride))
        }
        state = Locked(Rings(rings: rings, collected: GuestPageBitmap(slots: slots)))
    }

    func start() throws { try setDirtyLogging(true, vm: vm, slots: slots) }

    func stop() throws {
        try setDirtyLogging(false, vm: vm, slots: slots)
        // Entries still in the rings belong to the finished tracking session.
        try state.withLock { state in
            try collect(&state)
            state.collected.removeAll()
        }
    }

    func markDirty(guestPhysicalAddress: UInt64, length: Int) { hostWrites.mark(guestPhysicalAddress, length) }

    func vcpuRingFull(_ vcpu: KVMVCPU) throws {
        try state.withLock { try collect(&$0) }
    }

    func harvest(into pages: inout GuestPageBitmap) throws {
        try state.withLock { state in
            try collect(&state)
            pages.formUnion(state.collected)
            state.collected.removeAll()
        }
        hostWrites.drain(into: &pages)
    }

    /// Reads every published entry of every ring, marks it for reset, and has KVM re-arm those pages.
    private func collect(_ state: inout Rings) throws {
        for ringIndex in state.rings.indices {
            let ring = state.rings[ringIndex]
            let entries = ring.mapping.base.assumingMemoryBound(to: kvm_dirty_gfn.self)
            var fetch = ring.fetchIndex
            while true {
                let entry = entries + Int(fetch & (ring.entryCount - 1))
                guard ckvm_dirty_gfn_load_flags(entry) & CKVM_DIRTY_GFN_F_DIRTY != 0 else { break }
                // The slot field holds the address space in its high 16 bits; this VM uses address space 0.
                let slotID = entry.pointee.slot & 0xFFFF
                guard entry.pointee.slot >> 16 == 0, let index = slotIndex[slotID],
                      entry.pointee.offset < UInt64(slots[index].pageCount) else {
                    throw SystemError("dirty ring of vCPU \(ring.vcpuID) names slot \(entry.pointee.slot) page \(entry.pointee.offset), outside guest memory", errno: EIO)
                }
                state.collected.insert(slotIndex: index, page: Int(entry.pointee.offset))
                ckvm_dirty_gfn_store_flags(entry, CKVM_DIRTY_GFN_F_RESET)
                fetch &+= 1
            }
            state.rings[ringIndex].fetchIndex = fetch
        }
        try vm.resetDirtyRings()
    }
}
