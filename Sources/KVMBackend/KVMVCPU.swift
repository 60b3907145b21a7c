import CKVM
import Glibc
import LinuxSystem

/// A virtual CPU: its `kvm_run` page, its run ioctl and the ioctls that read and write its state.
/// Apart from `requestImmediateExit`, a vCPU is used by one thread at a time (its own, or a controller
/// while it is paused).
///
/// Sendable: `vm` is unowned but outlives its vCPUs (the VM holds them); the run page is written by the vCPU's own
/// thread, except `immediate_exit`, which KVM's API lets other threads set.
public final class KVMVCPU: @unchecked Sendable {
    public let id: UInt32
    public unowned let vm: KVMVirtualMachine
    let handle: KVMHandle
    /// The shared `kvm_run` page (and, for the dirty ring, the ring mapped behind it).
    let runMapping: MemoryMapping

    init(vm: KVMVirtualMachine, id: UInt32, fd: OwnedFileDescriptor) throws {
        self.vm = vm
        self.id = id
        self.handle = KVMHandle(fd: fd, subject: "vCPU \(id)")
        runMapping = try MemoryMapping(file: fd, size: try vm.system.vcpuMappingSize())
    }

    public var run: UnsafeMutablePointer<kvm_run> { runMapping.base.assumingMemoryBound(to: kvm_run.self) }

    /// Maps this vCPU's dirty ring of `byteCount` bytes (KVM_CAP_DIRTY_LOG_RING must be enabled on the VM
    /// before the vCPU was created).
    func mapDirtyRing(byteCount: Int) throws -> MemoryMapping {
        try MemoryMapping(file: handle.fd, offset: Int64(CKVM_DIRTY_LOG_PAGE_OFFSET) * Int64(pageSize), size: byteCount)
    }

    // MARK: running

    public enum RunResult {
        /// KVM_RUN returned with an exit for userspace to handle; read it from `run`.
        case exit(UInt32)
        /// A signal or `immediate_exit` interrupted the vCPU: the caller asked for control back.
        case interrupted
    }

    /// KVM_RUN. An interruption is not an error here: it is how a controller takes a vCPU back.
    public func runOnce() throws -> RunResult {
        do {
            try systemCallOnce("KVM_RUN on vCPU \(id)") { ckvm_ioctl_val(handle.fd.rawValue, CKVM_RUN, 0) }
            return .exit(run.pointee.exit_reason)
        } catch let error as SystemError where error.errno == EINTR || error.errno == EAGAIN {
            return .interrupted
        }
    }

    /// Makes the next (or current, together with a signal) KVM_RUN return at once. Safe from any thread.
    public func requestImmediateExit(_ value: Bool) {
        // A plain byte store: KVM reads it on entry, and the signal that follows orders it.
        run.pointee.immediate_exit = value ? 1 : 0
    }

    // MARK: registers

    public func registers() throws -> kvm_regs { try handle.get("KVM_GET_REGS", CKVM_GET_REGS) }
    public func setRegisters(_ value: kvm_regs) throws { try handle.set("KVM_SET_REGS", CKVM_SET_REGS, value) }
    public func specialRegisters() throws -> kvm_sregs { try handle.get("KVM_GET_SREGS", CKVM_GET_SREGS) }
    public func setSpecialRegisters(_ value: kvm_sregs) throws { try handle.set("KVM_SET_SREGS", CKVM_SET_SREGS, value) }
    public func fpu() throws -> kvm_fpu { try handle.get("KVM_GET_FPU", CKVM_GET_FPU) }
    public func setFPU(_ value: kvm_fpu) throws { try handle.set("KVM_SET_FPU", CKVM_SET_FPU, value) }
    public func extendedControlRegisters() throws -> kvm_xcrs { try handle.get("KVM_GET_XCRS", CKVM_GET_XCRS) }
    public func setExtendedControlRegisters(_ value: kvm_xcrs) throws { try handle.set("KVM_SET_XCRS", CKVM_SET_XCRS, value) }
    public func localAPIC() throws -> kvm_lapic_state { try handle.get("KVM_GET_LAPIC", CKVM_GET_LAPIC) }
    public func setLocalAPIC(_ value: kvm_lapic_state) throws { try handle.set("KVM_SET_LAPIC", CKVM_SET_LAPIC, value) }
    public func multiprocessingState() throws -> kvm_mp_state { try handle.get("KVM_GET_MP_STATE", CKVM_GET_MP_STATE) }
    public func setMultiprocessingState(_ value: kvm_mp_state) throws { try handle.set("KVM_SET_MP_STATE", CKVM_SET_MP_STATE, value) }
    public func events() throws -> kvm_vcpu_events { try handle.get("KVM_GET_VCPU_EVENTS", CKVM_GET_VCPU_EVENTS) }
    public func setEvents(_ value: kvm_vcpu_events) throws { try handle.set("KVM_SET_VCPU_EVENTS", CKVM_SET_VCPU_EVENTS, value) }
    public func debugRegisters() throws -> kvm_debugregs { try handle.get("KVM_GET_DEBUGREGS", CKVM_GET_DEBUGREGS) }
    public func setDebugRegisters(_ value: kvm_debugregs) throws { try handle.set("KVM_SET_DEBUGREGS", CKVM_SET_DEBUGREGS, value) }

    /// KVM_GET_TSC_KHZ: the guest's TSC frequency.
    public func tscFrequencyKHz() throws -> UInt32 { UInt32(try handle.call("KVM_GET_TSC_KHZ", CKVM_GET_TSC_KHZ)) }

    /// The XSAVE area: KVM_GET_XSAVE2 with the size KVM_CAP_XSAVE2 reports, or the 4 KiB KVM_GET_XSAVE.
    public func xsave() throws -> [UInt8] {
        let size = max(vm.system.check(.xsave2), MemoryLayout<kvm_xsave>.size)
        return try withZeroedStorage(of: kvm_xsave.self, byteCount: size) { pointer in
            if vm.system.check(.xsave2) > 0 {
                try handle.call("KVM_GET_XSAVE2", CKVM_GET_XSAVE2, pointer)
            } else {
                try handle.call("KVM_GET_XSAVE", CKVM_GET_XSAVE, pointer)
            }
            return Array(UnsafeRawBufferPointer(start: pointer, count: size))
        }
    }

    public func setXsave(_ area: [UInt8]) throws {
        let size = max(vm.system.check(.xsave2), MemoryLayout<kvm_xsave>.size)
        guard area.count <= size else {
            throw SystemError("KVM_SET_XSAVE on vCPU \(id): area of \(area.count) bytes exceeds this host's \(size)", errno: EINVAL)
        }
        try withZeroedStorage(of: kvm_xsave.self, byteCount: size) { pointer in
            area.withUnsafeBytes { pointer.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            try handle.call("KVM_SET_XSAVE", CKVM_SET_XSAVE, pointer)
        }
    }

    /// KVM_GET_MSRS for `indices`; returns the entries the kernel read, which stop at the first it could not.
    public func modelSpecificRegisters(_ indices: [UInt32]) throws -> [kvm_msr_entry] {
        let request = indices.map { kvm_msr_entry(index: $0, reserved: 0, data: 0) }
        return try withFlexibleArray(header: kvm_msrs.self, elements: request) { pointer in
            let count = Int(try handle.call("KVM_GET_MSRS", CKVM_GET_MSRS, pointer))
            pointer.storeBytes(of: UInt32(count), as: UInt32.self)
            return readFlexibleArray(pointer, header: kvm_msrs.self, of: kvm_msr_entry.self)
        }
    }

    public func setModelSpecificRegisters(_ entries: [kvm_msr_entry]) throws {
        try withFlexibleArray(header: kvm_msrs.self, elements: entries) { pointer in
            let count = Int(try handle.call("KVM_SET_MSRS", CKVM_SET_MSRS, pointer))
            guard count == entries.count else {
                let failed = entries[count].index
                throw SystemError("KVM_SET_MSRS on vCPU \(id): MSR 0x\(String(failed, radix: 16)) refused after \(count) of \(entries.count)", errno: EINVAL)
            }
        }
    }

    public func cpuid() throws -> [kvm_cpuid_entry2] {
        try fetchCPUID(subject: handle) { try handle.call("KVM_GET_CPUID2", CKVM_GET_CPUID2, $0) }
    }

    public func setCPUID(_ entries: [kvm_cpuid_entry2]) throws {
        try withFlexibleArray(header: kvm_cpuid2.self, elements: entries) { try handle.call("KVM_SET_CPUID2", CKVM_SET_CPUID2, $0) }
    }
}
