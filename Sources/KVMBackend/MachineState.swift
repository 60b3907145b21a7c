import CKVM
import Glibc
import LinuxSystem

/// Everything KVM holds for one vCPU, as the kernel's own structures.
public struct VCPUState {
    public var id: UInt32
    public var cpuid: [kvm_cpuid_entry2]
    public var multiprocessing: kvm_mp_state
    public var registers: kvm_regs
    public var specialRegisters: kvm_sregs
    public var xsave: [UInt8]
    public var extendedControlRegisters: kvm_xcrs
    public var debugRegisters: kvm_debugregs
    public var localAPIC: kvm_lapic_state
    /// Every MSR of KVM_GET_MSR_INDEX_LIST that reads back on this host, the TSC (0x10) among them.
    public var modelSpecificRegisters: [kvm_msr_entry]
    public var events: kvm_vcpu_events
    public var tscFrequencyKHz: UInt32

    public init(id: UInt32, cpuid: [kvm_cpuid_entry2], multiprocessing: kvm_mp_state, registers: kvm_regs,
                specialRegisters: kvm_sregs, xsave: [UInt8], extendedControlRegisters: kvm_xcrs,
                debugRegisters: kvm_debugregs, localAPIC: kvm_lapic_state, modelSpecificRegisters: [kvm_msr_entry],
                events: kvm_vcpu_events, tscFrequencyKHz: UInt32) {
        self.id = id
        self.cpuid = cpuid
        self.multiprocessing = multiprocessing
        self.registers = registers
        self.specialRegisters = specialRegisters
        self.xsave = xsave
        self.extendedControlRegisters = extendedControlRegisters
        self.debugRegisters = debugRegisters
        self.localAPIC = localAPIC
        self.modelSpecificRegisters = modelSpecificRegisters
        self.events = events
        self.tscFrequencyKHz = tscFrequencyKHz
    }
}

/// The VM-wide devices that live in the kernel.
public struct VMDeviceState {
    public var picMaster: kvm_irqchip
    public var picSlave: kvm_irqchip
    public var ioapic: kvm_irqchip
    public var timer: kvm_pit_state2
    public var clock: kvm_clock_data

    public init(picMaster: kvm_irqchip, picSlave: kvm_irqchip, ioapic: kvm_irqchip, timer: kvm_pit_state2, clock: kvm_clock_data) {
        self.picMaster = picMaster
        self.picSlave = picSlave
        self.ioapic = ioapic
        self.timer = timer
        self.clock = clock
    }
}

/// The complete in-kernel state of a paused VM: what, together with guest memory, lets another VM carry on.
public struct MachineState {
    public var devices: VMDeviceState
    public var vcpus: [VCPUState]

    public init(devices: VMDeviceState, vcpus: [VCPUState]) {
        self.devices = devices
        self.vcpus = vcpus
    }
}

extension KVMVirtualMachine {
    public func captureDevices() throws -> VMDeviceState {
        VMDeviceState(picMaster: try interruptChip(.picMaster), picSlave: try interruptChip(.picSlave),
                      ioapic: try interruptChip(.ioapic), timer: try timerState(), clock: try clock())
    }

    public func restoreDevices(_ state: VMDeviceState) throws {
        try setInterruptChip(state.picMaster)
        try setInterruptChip(state.picSlave)
        try setInterruptChip(state.ioapic)
        try setTimerState(state.timer)
        try setClock(state.clock)
    }

    /// The MSRs worth saving: those of KVM_GET_MSR_INDEX_LIST that this vCPU can read back. Some listed MSRs
    /// depend on CPU features the host lacks; reading them fails, so they are probed one at a time, once.
    public func savedMSRIndices(probingWith vcpu: KVMVCPU) throws -> [UInt32] {
        if let cached = savedMSRIndexCache.withLock({ $0 }) { return cached }
        let readable = try system.msrIndexList().filter { index in
            (try? vcpu.modelSpecificRegisters([index]).count) == 1
        }
        savedMSRIndexCache.withLock { $0 = readable }
        return readable
    }
}

extension KVMVCPU {
    /// Captures the vCPU's whole state. The vCPU must not be running. The order follows what KVM needs:
    /// the MP state first, because reading it makes KVM process pending APIC events.
    public func captureState(msrIndices: [UInt32]) throws -> VCPUState {
        let multiprocessing = try multiprocessingState()
        let registers = try registers()
        let specialRegisters = try specialRegisters()
        let xsave = try xsave()
        let xcrs = try extendedControlRegisters()
        let debug = try debugRegisters()
        let lapic = try localAPIC()
        let msrs = try modelSpecificRegisters(msrIndices)
        guard msrs.count == msrIndices.count else {
            throw SystemError("KVM_GET_MSRS on vCPU \(id): MSR 0x\(String(msrIndices[msrs.count], radix: 16)) did not read back", errno: EIO)
        }
        let events = try events()
        return VCPUState(id: id, cpuid: try cpuid(), multiprocessing: multiprocessing, registers: registers,
                         specialRegisters: specialRegisters, xsave: xsave, extendedControlRegisters: xcrs,
                         debugRegisters: debug, localAPIC: lapic, modelSpecificRegisters: msrs,
                         events: events, tscFrequencyKHz: try tscFrequencyKHz())
    }

    /// Restores a state captured by `captureState` into a fresh vCPU. CPUID comes first (it decides which
    /// registers and MSRs are valid), the LAPIC before the MSRs (the TSC deadline needs it), events last.
    public func restoreState(_ state: VCPUState) throws {
        guard state.id == id else {
            throw SystemError("restoring the state of vCPU \(state.id) into vCPU \(id)", errno: EINVAL)
        }
        let hostTSC = try tscFrequencyKHz()
        guard Self.tscFrequenciesMatch(state.tscFrequencyKHz, hostTSC) else {
            // KVM_CAP_TSC_CONTROL is absent here, so the guest's TSC rate cannot be set: refuse rather than
            // let the guest's clock run at the wrong speed.
            throw SystemError("vCPU \(id): saved TSC runs at \(state.tscFrequencyKHz) kHz, this host's at \(hostTSC) kHz", errno: ENOTSUP)
        }
        try setCPUID(state.cpuid)
        try setMultiprocessingState(state.multiprocessing)
        try setRegisters(state.registers)
        try setSpecialRegisters(state.specialRegisters)
        try setXsave(state.xsave)
        try setExtendedControlRegisters(state.extendedControlRegisters)
        try setDebugRegisters(state.debugRegisters)
        try setLocalAPIC(state.localAPIC)
        try setModelSpecificRegisters(state.modelSpecificRegisters)
        try setEvents(state.events)
    }

    /// Hosts report their TSC rate with a little jitter; 0.1% is the tolerance of NTP-disciplined clocks.
    static func tscFrequenciesMatch(_ a: UInt32, _ b: UInt32) -> Bool {
        let difference = a > b ? a - b : b - a
        return UInt64(difference) * 1000 <= UInt64(max(a, b))
    }
}

extension MachineState {
    /// Captures the complete in-kernel state of `vm` and its `vcpus`, none of which may be running.
    public static func capture(vm: KVMVirtualMachine, vcpus: [KVMVCPU]) throws -> MachineState {
        guard let first = vcpus.first else { throw SystemError("capturing a VM without vCPUs", errno: EINVAL) }
        let msrs = try vm.savedMSRIndices(probingWith: first)
        let vcpuStates = try vcpus.map { try $0.captureState(msrIndices: msrs) }
        return MachineState(devices: try vm.captureDevices(), vcpus: vcpuStates)
    }

    /// Restores this state into a fresh VM whose vCPUs have not run yet, one for each saved vCPU.
    public func restore(vm: KVMVirtualMachine, vcpus: [KVMVCPU]) throws {
        guard vcpus.count == self.vcpus.count else {
            throw SystemError("restoring \(self.vcpus.count) saved vCPUs into a VM with \(vcpus.count)", errno: EINVAL)
        }
        for (vcpu, saved) in zip(vcpus, self.vcpus) { try vcpu.restoreState(saved) }
        try vm.restoreDevices(devices)
    }
}
