import CMigratedABI
import KVMBackend
import MigrationEngine
import MigrationWire

/// A VMM's running guest as the source of a migration or snapshot: memory read in place through the VMM's
/// mapping, dirty pages from KVM's log (KVM modes) or the VMM's harvest callback, and the rest through callbacks.
///
/// Sendable under the `GuestSource` thread contract: `dirty` is used by the harvest, a control call, alone.
final class VMMGuestSource: GuestSource, @unchecked Sendable {
    let vm: EmbeddedVM
    let memory: VMMMemory
    private var dirty: GuestPageBitmap

    init(_ vm: EmbeddedVM) throws {
        self.vm = vm
        memory = try vm.memory()
        dirty = GuestPageBitmap(slots: memory.slots)
        try vm.callbacks.require([("pause", vm.callbacks.table.pause != nil), ("resume", vm.callbacks.table.resume != nil)])
    }

    var layout: GuestMemoryLayout { memory.layout }
    func page(frame: UInt64) -> UnsafeRawPointer { UnsafeRawPointer(memory.pointer(frame: frame)) }
    func forEachPopulatedFrame(_ visit: (UInt64) -> Void) throws { try memory.forEachPopulatedFrame(visit) }

    func startDirtyTracking() throws {
        if let tracker = vm.kvmTracker { try tracker.start() } else { try vm.callbacks.dirtyStart() }
    }

    func stopDirtyTracking() throws {
        if let tracker = vm.kvmTracker { try tracker.stop() } else { try vm.callbacks.dirtyStop() }
    }

    func harvestDirtyFrames(_ visit: (UInt64) -> Void) throws {
        dirty.removeAll()
        if let tracker = vm.kvmTracker {
            try tracker.harvest(into: &dirty)
        } else {
            for region in memory.slots.indices {
                try dirty.withSlotWords(region) { try vm.callbacks.dirtyHarvest(region: region, into: $0) }
            }
        }
        dirty.forEachPage { visit($0 >> 12) }
    }

    func pause() throws { try vm.callbacks.pause() }
    /// The seam cannot fail here; a VMM whose resume fails is told by its own callback's return, and the
    /// failure is counted for the operation's error code.
    func resume() { try? vm.callbacks.resume() }
    func setThrottle(_ fraction: Double) { try? vm.callbacks.setThrottle(fraction) }

    func captureDeviceState() throws -> [DeviceState] {
        var states: [DeviceState] = []
        if let kvm = vm.kvm { states.append(try KVMMachineComponent.capture(vm: kvm.vm, vcpus: kvm.vcpus)) }
        let list = DeviceList(reserved: vm.kvm == nil ? [] : [DeviceComponent.kvmVM])
        try vm.callbacks.saveDevices(into: list)
        return states + list.states
    }
}

/// Where an incoming guest is rebuilt for a VMM: memory from its prepare_memory callback, the machine state
/// restored by the library (KVM modes), the VMM's own devices and the start through callbacks.
///
/// Sendable under the `GuestSink` thread contract: `memory` is set by `prepare` and cleared by `discard`, and the
/// channels' threads only read it in between.
final class VMMGuestSink: GuestSink, @unchecked Sendable {
    let vm: EmbeddedVM
    private var memory: VMMMemory?

    init(_ vm: EmbeddedVM) throws {
        self.vm = vm
        let table = vm.callbacks.table
        try vm.callbacks.require([("prepare_memory", table.prepare_memory != nil), ("start", table.start != nil)])
    }

    func prepare(layout: GuestMemoryLayout) throws {
        var regions = layout.regions.enumerated().map { index, region in
            migrated_region(slot: UInt32(index), flags: 0, guest_phys_addr: region.guestPhysicalAddress, size: region.size,
                            host_addr: nil, fd: -1, reserved: 0, fd_offset: 0)
        }
        try regions.withUnsafeMutableBufferPointer { try vm.callbacks.prepareMemory($0) }
        // The VMM has made its memory; from here on a failure must let it free it.
        let prepared: VMMMemory
        do {
            for (index, (given, wanted)) in zip(regions, layout.regions).enumerated()
            where given.guest_phys_addr != wanted.guestPhysicalAddress || given.size != wanted.size {
                throw CABIError.invalid("prepare_memory changed region \(index) to 0x\(String(given.guest_phys_addr, radix: 16)) + \(given.size)")
            }
            prepared = try regions.withUnsafeBufferPointer { try VMMMemory($0) }
            try vm.setMemory(prepared)
        } catch {
            vm.callbacks.discard()
            throw error
        }
        memory = prepared
    }

    func page(frame: UInt64) -> UnsafeMutableRawPointer { memory!.pointer(frame: frame) }
    func write(frames first: UInt64, pages: UnsafeBufferPointer<UnsafeRawPointer>) throws { try memory!.write(frames: first, pages: pages) }
    func zero(frames first: UInt64, count: Int) throws { try memory!.zero(frames: first, count: count) }
    var takesPagesInPlace: Bool { memory?.takesPagesInPlace ?? false }

    func restore(deviceState: [DeviceState]) throws {
        var forVMM = deviceState
        if let kvm = vm.kvm { forVMM = try KVMMachineComponent.restore(deviceState, vm: kvm.vm, vcpus: kvm.vcpus) }
        try withDeviceBlobs(forVMM) { try vm.callbacks.restoreDevices($0) }
    }

    func start() throws { try vm.callbacks.start() }

    func discard() {
        guard memory != nil else { return }
        memory = nil
        vm.forgetMemory()
        vm.callbacks.discard()
    }
}
