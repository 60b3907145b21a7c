import Foundation
import KVMBackend
import MicroVM
import MigrationEngine
import MigrationWire

/// A running MicroVM as the source of a migration.
///
/// Sendable under the `GuestSource` thread contract: `dirty` is used by the harvest, a control call, alone.
public final class MicroVMGuestSource: GuestSource, @unchecked Sendable {
    public let machine: MicroVM
    public let layout: GuestMemoryLayout
    private var dirty: GuestPageBitmap

    public init(machine: MicroVM) {
        self.machine = machine
        layout = GuestMemoryLayout(regions: machine.memory.slots.map {
            MemoryRegion(guestPhysicalAddress: $0.guestPhysicalAddress, size: $0.size)
        })
        dirty = GuestPageBitmap(slots: machine.memory.slots)
    }

    public func page(frame: UInt64) -> UnsafeRawPointer {
        UnsafeRawPointer(machine.memory.pointer(guestPhysicalAddress: frame << 12, length: pageSize)!)
    }

    /// The memfd knows which of its pages were ever allocated: holes were never written and read as zero,
    /// and reading them through the mapping would allocate them.
    public func forEachPopulatedFrame(_ visit: (UInt64) -> Void) throws {
        let memory = machine.memory
        for range in try memory.dataRanges() {
            for offset in stride(from: UInt64(range.lowerBound), to: UInt64(range.upperBound), by: pageSize) {
                visit(memory.guestPhysicalAddress(fileOffset: offset) >> 12)
            }
        }
    }

    public func startDirtyTracking() throws { try machine.dirtyTracker.start() }
    public func stopDirtyTracking() throws { try machine.dirtyTracker.stop() }

    public func harvestDirtyFrames(_ visit: (UInt64) -> Void) throws {
        dirty.removeAll()
        try machine.dirtyTracker.harvest(into: &dirty)
        dirty.forEachPage { visit($0 >> 12) }
    }

    public func pause() throws { try machine.pause() }
    public func resume() { machine.resume() }
    public func setThrottle(_ fraction: Double) { machine.setThrottle(fraction) }

    public func captureDeviceState() throws -> [DeviceState] {
        let blob = MachineStateEncoding.encode(try machine.captureState())
        return [DeviceState(componentID: DeviceComponent.kvmVM, instance: 0,
                            componentVersion: MachineStateEncoding.currentVersion, blob: ByteSlice(blob))]
    }
}

/// A new MicroVM built from a migration stream. Memory comes first (the layout must be the one MicroVM gives
/// a guest of that size), the VM itself when the device state arrives, and it runs on `start`.
///
/// Sendable under the `GuestSink` thread contract: `memory` and `machine` are set by the control calls, and the
/// channels' threads only read `memory` in between.
public final class MicroVMGuestSink: GuestSink, @unchecked Sendable {
    public private(set) var machine: MicroVM?
    public private(set) var memory: GuestMemory?
    private let console: SerialConsole
    private let dirtyTracking: DirtyTrackingMethod
    private let memoryBacking: GuestMemory.Backing

    public init(console: SerialConsole, dirtyTracking: DirtyTrackingMethod = .bitmap, memoryBacking: GuestMemory.Backing = .sharedMemory) {
        self.console = console
        self.dirtyTracking = dirtyTracking
        self.memoryBacking = memoryBacking
    }

    public func prepare(layout: GuestMemoryLayout) throws {
        let memory = try GuestMemory(size: layout.totalBytes, backing: memoryBacking)
        let expected = memory.slots.map { MemoryRegion(guestPhysicalAddress: $0.guestPhysicalAddress, size: $0.size) }
        guard layout.regions == expected else {
            throw MicroVMError.invalidConfiguration("memory layout \(layout.regions) is not MicroVM's layout for \(layout.totalBytes) bytes")
        }
        self.memory = memory
    }

    public func page(frame: UInt64) -> UnsafeMutableRawPointer {
        memory!.pointer(guestPhysicalAddress: frame << 12, length: pageSize)!
    }

    /// Through the memfd (shared memory): pages arriving from a migration or a snapshot are new to the mapping,
    /// see `GuestMemory.write`.
    public func write(frames first: UInt64, pages: UnsafeBufferPointer<UnsafeRawPointer>) throws {
        try memory!.write(pages: pages, at: first << 12)
    }

    /// Punches the frames out of the memfd, so that a zero page costs no memory (huge pages: zeroes them).
    public func zero(frames first: UInt64, count: Int) throws {
        try memory!.zero(at: first << 12, length: count * pageSize)
    }

    /// Huge pages take writes only through the mapping, which faults in 2 MiB at a time, so pages are best
    /// received straight into it. Shared memory takes them more cheaply through the memfd (`write`) than by
    /// faulting in 4 KiB pages one by one.
    public var takesPagesInPlace: Bool { memoryBacking == .hugePages }

    /// Shared memory punches zero pages out of its memfd, and userfaultfd serves its holes; huge pages are zeroed in
    /// place and cannot be filled 4 KiB at a time.
    public var takesPostCopy: Bool { memoryBacking == .sharedMemory }

    public func restore(deviceState: [DeviceState]) throws {
        guard let memory else { throw MicroVMError.invalidConfiguration("device state before memory") }
        let machines = deviceState.filter { $0.componentID == DeviceComponent.kvmVM }
        guard machines.count == 1, let blob = machines.first?.blob else {
            throw MicroVMError.invalidConfiguration("expected one KVM machine state, got \(machines.count)")
        }
        guard machines[0].componentVersion <= MachineStateEncoding.currentVersion else {
            throw MicroVMError.invalidConfiguration("KVM machine state version \(machines[0].componentVersion) is newer than this build")
        }
        let state = try blob.withUnsafeBytes { try MachineStateEncoding.decode($0) }
        machine = try MicroVM(restoring: state, memory: memory,
                              configuration: MicroVMConfiguration(memorySize: memory.size, dirtyTracking: dirtyTracking, console: console))
    }

    public func start() throws {
        guard let machine else { throw MicroVMError.invalidConfiguration("start before the device state was restored") }
        machine.start()
    }

    public func discard() {
        machine?.stop()
        machine = nil
        memory = nil
    }
}
