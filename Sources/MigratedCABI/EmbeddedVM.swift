import CMigratedABI
import Foundation
import Glibc
import KVMBackend
import LinuxSystem
import MigrationWire
import Snapshots

/// A `migrated_vm`: a VMM's guest as the engine sees it. Its memory is known from the start (a source) or once
/// the VMM has prepared it for an incoming guest (a destination, which may later be a source in turn). In the
/// KVM modes the handle works on duplicates of the VMM's VM and vCPU descriptors: it runs the dirty log and
/// captures and restores the in-kernel machine state itself.
///
/// Sendable: `knownMemory`, `tracker`, `base` and `operation` are guarded by `lock`; `operation` lets one migration or
/// snapshot use the handle at a time.
final class EmbeddedVM: @unchecked Sendable {
    enum DirtyMode {
        case kvm(DirtyTrackingMethod)
        case callbacks
    }

    let mode: DirtyMode
    let callbacks: VMMCallbacks
    /// KVM modes only.
    let kvm: (vm: KVMVirtualMachine, vcpus: [KVMVCPU])?

    // Guarded by `lock`: the memory once known, the dirty tracker made with it, the base for the next diff
    // snapshot, and whether an operation is using the handle.
    private let lock = NSLock()
    private var knownMemory: VMMMemory?
    private var tracker: DirtyPageTracker?
    private var base: SnapshotBase?
    private var operation: String?

    init(_ config: migrated_vm_config) throws {
        try requireABIVersion(config.abi_version, in: "migrated_vm_config")
        callbacks = VMMCallbacks(config.callbacks)
        let table = config.callbacks
        switch config.dirty_mode {
        case MIGRATED_DIRTY_KVM_BITMAP.rawValue:
            mode = .kvm(.bitmap)
        case MIGRATED_DIRTY_KVM_RING.rawValue:
            mode = .kvm(.ring(bytesPerVCPU: Int(config.dirty_ring_bytes)))
        case MIGRATED_DIRTY_CALLBACK.rawValue:
            mode = .callbacks
            try callbacks.require([("dirty_start", table.dirty_start != nil), ("dirty_harvest", table.dirty_harvest != nil),
                                   ("dirty_stop", table.dirty_stop != nil)])
        default:
            throw CABIError.invalid("dirty_mode \(config.dirty_mode) is none of MIGRATED_DIRTY_KVM_BITMAP, _KVM_RING, _CALLBACK")
        }
        if case .kvm(let method) = mode {
            guard config.vcpu_count > 0, config.vcpu_count <= 1024, let fds = config.kvm_vcpu_fds else {
                throw CABIError.invalid("KVM modes need the vCPUs' fds: vcpu_count is \(config.vcpu_count), kvm_vcpu_fds \(config.kvm_vcpu_fds == nil ? "NULL" : "set")")
            }
            let system = try KVMSystem()
            let vm = try adoptingKVMObject { try system.adoptVM(duplicating: config.kvm_vm_fd) }
            let vcpus = try (0 ..< config.vcpu_count).map { id in try adoptingKVMObject { try vm.adoptVCPU(id: id, duplicating: fds[Int(id)]) } }
            if method == .bitmap { try method.prepare(vm) }
            kvm = (vm, vcpus)
        } else {
            kvm = nil
        }
        if config.region_count > 0 {
            try setMemory(VMMMemory(UnsafeBufferPointer(start: try required(config.regions, "regions"), count: Int(config.region_count))))
        } else if config.regions != nil {
            throw CABIError.invalid("regions is set but region_count is 0")
        }
    }

    /// The guest's memory, or an error saying it has none yet (a destination before its guest arrived).
    func memory() throws -> VMMMemory {
        guard let memory = lock.withLock({ knownMemory }) else {
            throw CABIError.state("this handle has no guest memory yet: create it with regions, or receive or restore a guest into it first")
        }
        return memory
    }

    /// Takes the guest's memory; in the KVM modes, the dirty tracker is made over its slots.
    func setMemory(_ memory: VMMMemory) throws {
        var tracker: DirtyPageTracker?
        if case .kvm(let method) = mode, let kvm {
            tracker = try makeDirtyPageTracker(method: method, vm: kvm.vm, slots: memory.slots, vcpus: kvm.vcpus)
        }
        lock.withLock {
            knownMemory = memory
            self.tracker = tracker
        }
    }

    /// The KVM dirty tracker, once memory is known (KVM modes).
    var kvmTracker: DirtyPageTracker? { lock.withLock { tracker } }

    /// The snapshot the next diff builds on: the last one saved through this handle.
    var snapshotBase: SnapshotBase? {
        get { lock.withLock { base } }
        set { lock.withLock { base = newValue } }
    }

    /// Runs `body` as the handle's only operation: a second one at the same time is refused.
    func exclusively<R>(_ name: String, _ body: () throws -> R) throws -> R {
        try claim(name)
        defer { release() }
        return try body()
    }

    func claim(_ name: String) throws {
        try lock.withLock {
            if let operation { throw CABIError.state("the handle is busy with \(operation); one operation at a time") }
            operation = name
        }
    }

    func release() { lock.withLock { operation = nil } }

    /// Forgets the memory of a guest that failed to arrive.
    func forgetMemory() {
        lock.withLock {
            knownMemory = nil
            tracker = nil
        }
    }
}

/// A descriptor that is not the KVM object it should be is the caller's mistake (MIGRATED_ERR_INVALID_ARGUMENT),
/// not the system's.
private func adoptingKVMObject<T>(_ body: () throws -> T) throws -> T {
    do { return try body() } catch let error as SystemError where error.errno == EBADF { throw CABIError.invalid("\(error)") }
}

// MARK: the exported functions

@_cdecl("migrated_vm_create")
public func migrated_vm_create(_ config: UnsafePointer<migrated_vm_config>?, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    boundary {
        let out = try required(out, "out")
        out.pointee = nil
        out.pointee = handle(of: try EmbeddedVM(try required(config, "config").pointee))
    }
}

@_cdecl("migrated_vm_free")
public func migrated_vm_free(_ vm: OpaquePointer?) {
    if let vm { release(vm, as: EmbeddedVM.self) }
}

@_cdecl("migrated_vm_mark_dirty")
public func migrated_vm_mark_dirty(_ vm: OpaquePointer?, _ address: UInt64, _ length: UInt64) -> Int32 {
    boundary {
        let vm = try object(vm, as: EmbeddedVM.self, "vm")
        guard case .kvm = vm.mode else { throw CABIError.state("migrated_vm_mark_dirty is for the KVM modes; in callback mode the VMM's harvest reports its own writes") }
        guard length <= UInt64(Int.max), address.addingReportingOverflow(length).overflow == false else {
            throw CABIError.invalid("range 0x\(String(address, radix: 16)) + \(length) wraps around")
        }
        vm.kvmTracker?.markDirty(guestPhysicalAddress: address, length: Int(length))
    }
}

@_cdecl("migrated_kvm_enable_dirty_ring")
public func migrated_kvm_enable_dirty_ring(_ vmFD: Int32, _ bytesPerVCPU: UInt32) -> Int32 {
    boundary {
        let vm = try adoptingKVMObject { try KVMSystem().adoptVM(duplicating: vmFD) }
        try DirtyTrackingMethod.ring(bytesPerVCPU: Int(bytesPerVCPU)).prepare(vm)
    }
}

@_cdecl("migrated_vm_dirty_ring_full")
public func migrated_vm_dirty_ring_full(_ vm: OpaquePointer?, _ vcpu: UInt32) -> Int32 {
    boundary {
        let vm = try object(vm, as: EmbeddedVM.self, "vm")
        guard case .kvm(.ring) = vm.mode, let kvm = vm.kvm else { throw CABIError.state("the handle does not track with KVM's dirty ring") }
        guard Int(vcpu) < kvm.vcpus.count else { throw CABIError.invalid("vCPU \(vcpu) of \(kvm.vcpus.count)") }
        guard let tracker = vm.kvmTracker else { throw CABIError.state("the handle has no guest memory yet") }
        try tracker.vcpuRingFull(kvm.vcpus[Int(vcpu)])
    }
}
