import CKVM
import Foundation
import Glibc
import KVMBackend
import LinuxSystem
import Threads

/// How to build a MicroVM.
public struct MicroVMConfiguration {
    public var memorySize: UInt64
    public var vcpuCount: Int
    public var dirtyTracking: DirtyTrackingMethod
    public var console: SerialConsole
    public var memoryBacking: GuestMemory.Backing

    public init(memorySize: UInt64, vcpuCount: Int = 1, dirtyTracking: DirtyTrackingMethod = .bitmap,
                console: SerialConsole = SerialConsole(), memoryBacking: GuestMemory.Backing = .sharedMemory) {
        self.memorySize = memorySize
        self.vcpuCount = vcpuCount
        self.dirtyTracking = dirtyTracking
        self.console = console
        self.memoryBacking = memoryBacking
    }
}

/// Why a MicroVM stopped running.
public enum MicroVMStop: Equatable, Sendable, CustomStringConvertible {
    /// The guest wrote this code to the debug-exit port.
    case guestExit(UInt8)
    /// `stop()` was called.
    case requested
    /// KVM reported something the VMM cannot carry on from (triple fault, emulation failure, ...).
    case failed(String)

    public var description: String {
        switch self {
        case .guestExit(let code):
            "guest exited with code 0x\(String(code, radix: 16)) (\(GuestExitCode(rawValue: code)?.description ?? "unknown code"))"
        case .requested: "stopped on request"
        case .failed(let why): "failed: \(why)"
        }
    }
}

public enum MicroVMError: Error, CustomStringConvertible {
    case pauseTimedOut(parked: Int, of: Int, seconds: TimeInterval)
    case notPaused(String)
    case invalidConfiguration(String)

    public var description: String {
        switch self {
        case .pauseTimedOut(let parked, let total, let seconds):
            "only \(parked) of \(total) vCPUs paused within \(seconds) s"
        case .notPaused(let what): "\(what) needs the VM paused"
        case .invalidConfiguration(let why): "invalid VM configuration: \(why)"
        }
    }
}

/// The project's small VMM: guest RAM in a memfd, in-kernel interrupt controllers and timer, vCPUs on threads
/// of their own, a serial console, a debug-exit port, dirty tracking, and complete state capture and restore.
///
/// Sendable: `serial` is Locked (any vCPU may use the port); `stopReason` and `started` are guarded by
/// `stopState`; `onSync` is set before the vCPUs start.
public final class MicroVM: @unchecked Sendable {
    public let system: KVMSystem
    public let vm: KVMVirtualMachine
    public let memory: GuestMemory
    public let vcpus: [KVMVCPU]
    public let dirtyTracker: DirtyPageTracker
    public let console: SerialConsole
    /// Called on the vCPU's thread when the guest writes to the sync port; the guest waits until it returns.
    public var onSync: ((UInt32) -> Void)?

    private let controller: VCPUController
    private let serial = Locked(SerialPort())
    private let stopState = NSCondition()
    private var stopReason: MicroVMStop?
    private var started = false

    public static let maximumVCPUs = 64

    /// Creates the VM and its vCPUs over `memory` (new when nil). A new guest is offered the host's supported
    /// CPUID; a restored one gets its saved CPUID with the rest of the vCPU state.
    private init(configuration: MicroVMConfiguration, memory existingMemory: GuestMemory?, settingCPUID: Bool) throws {
        guard (1 ... Self.maximumVCPUs).contains(configuration.vcpuCount) else {
            throw MicroVMError.invalidConfiguration("\(configuration.vcpuCount) vCPUs (1...\(Self.maximumVCPUs) supported)")
        }
        try GuestMemory.validate(size: configuration.memorySize)
        system = try KVMSystem()
        for capability in [KVMCapability.irqchip, .immediateExit, .userMemory, .pitState2, .vcpuEvents, .xsave, .xcrs, .debugRegisters] {
            try system.require(capability)
        }
        let vm = try system.createVM()
        self.vm = vm
        try configuration.dirtyTracking.prepare(vm)
        if system.check(.setTSSAddress) > 0 {
            // Intel's real-mode emulation needs three pages of address space; these sit just below the BIOS.
            try vm.setTSSAddress(0xFFFB_D000)
        }
        try vm.createInterruptControllers()
        try vm.createTimer()
        if let existingMemory, existingMemory.size != configuration.memorySize {
            throw MicroVMError.invalidConfiguration("memory of \(existingMemory.size) bytes for a VM configured with \(configuration.memorySize)")
        }
        memory = try existingMemory ?? GuestMemory(size: configuration.memorySize, backing: configuration.memoryBacking)
        for slot in memory.slots { try vm.setMemorySlot(slot) }
        let supported = settingCPUID ? try system.supportedCPUID() : []
        vcpus = try (0 ..< UInt32(configuration.vcpuCount)).map { id in
            let vcpu = try vm.createVCPU(id: id)
            if settingCPUID { try vcpu.setCPUID(Self.cpuid(supported, apicID: id)) }
            return vcpu
        }
        dirtyTracker = try makeDirtyPageTracker(method: configuration.dirtyTracking, vm: vm, slots: memory.slots, vcpus: vcpus)
        console = configuration.console
        controller = VCPUController(vcpus: vcpus)
    }

    /// A VM ready to boot `kernel` (a PVH ELF) with `commandLine`; call `start()` to run it.
    public convenience init(booting kernel: [UInt8], commandLine: String, configuration: MicroVMConfiguration) throws {
        let image = try PVHImage(elf: kernel)
        try self.init(configuration: configuration, memory: nil, settingCPUID: true)
        let startInfo = try image.load(into: memory, commandLine: commandLine)
        let boot = vcpus[0]
        let (registers, special) = image.bootRegisters(startInfo: startInfo, base: try boot.specialRegisters())
        try boot.setSpecialRegisters(special)
        try boot.setRegisters(registers)
    }

    /// A VM that carries on from `state` over `memory`, which already holds the guest's RAM.
    /// The vCPU count comes from the state. Call `start()` to run it.
    public convenience init(restoring state: MachineState, memory: GuestMemory, configuration: MicroVMConfiguration) throws {
        var configuration = configuration
        configuration.vcpuCount = state.vcpus.count
        configuration.memorySize = memory.size
        configuration.memoryBacking = memory.backing
        try self.init(configuration: configuration, memory: memory, settingCPUID: false)
        try state.restore(vm: vm, vcpus: vcpus)
    }

    /// The host's CPUID with this vCPU's APIC ID in the leaves that carry one.
    static func cpuid(_ supported: [kvm_cpuid_entry2], apicID: UInt32) -> [kvm_cpuid_entry2] {
        supported.map { entry in
            var entry = entry
            switch entry.function {
            case 1: entry.ebx = (entry.ebx & 0x00FF_FFFF) | (apicID << 24)
            case 0xB, 0x1F: entry.edx = apicID
            default: break
            }
            return entry
        }
    }

    // MARK: lifecycle

    public func start() {
        stopState.lock()
        precondition(!started, "MicroVM started twice")
        started = true
        stopState.unlock()
        controller.start { [self] vcpu in self.step(vcpu) }
    }

    /// Pauses every vCPU; they are out of KVM_RUN when this returns. Throws if that took longer than `timeout`.
    public func pause(timeout: TimeInterval = 1) throws { try controller.pause(timeout: timeout) }
    public func resume() { controller.resume() }

    /// Makes the vCPUs sleep this fraction of the time (0 = full speed, up to 0.99).
    public func setThrottle(_ fraction: Double) { controller.setThrottle(fraction) }
    public var throttle: Double { controller.throttle }

    /// Stops the vCPUs and waits for their threads; the VM cannot run again afterwards.
    public func stop(timeout: TimeInterval = 5) {
        finish(.requested)
        _ = controller.waitUntilStopped(timeout: timeout)
    }

    /// Waits until the VM stops by itself (guest exit or failure) or `timeout` passes.
    public func waitForStop(timeout: TimeInterval) -> MicroVMStop? {
        let deadline = Date(timeIntervalSinceNow: timeout)
        stopState.lock()
        defer { stopState.unlock() }
        while stopReason == nil {
            if !stopState.wait(until: deadline) { return nil }
        }
        return stopReason
    }

    public var stopped: MicroVMStop? {
        stopState.lock()
        defer { stopState.unlock() }
        return stopReason
    }

    deinit {
        controller.requestStop()
        _ = controller.waitUntilStopped(timeout: 5)
    }

    private func finish(_ reason: MicroVMStop) {
        stopState.lock()
        if stopReason == nil { stopReason = reason }
        stopState.broadcast()
        stopState.unlock()
        controller.requestStop()
    }

    // MARK: state

    /// Captures the complete in-kernel state. The VM must be paused.
    public func captureState() throws -> MachineState {
        guard controller.isPaused || stopped != nil || !stopState.withLock({ started }) else { throw MicroVMError.notPaused("capturing state") }
        return try MachineState.capture(vm: vm, vcpus: vcpus)
    }

    // MARK: exits

    /// Runs the vCPU once and handles its exit; false stops the VM.
    private func step(_ vcpu: KVMVCPU) -> Bool {
        do {
            switch try vcpu.runOnce() {
            case .interrupted:
                return true
            case .exit(let reason):
                return try handleExit(reason, vcpu: vcpu)
            }
        } catch {
            finish(.failed("vCPU \(vcpu.id): \(error)"))
            return false
        }
    }

    private func handleExit(_ reason: UInt32, vcpu: KVMVCPU) throws -> Bool {
        let run = vcpu.run
        switch Int32(reason) {
        case KVM_EXIT_IO:
            return handlePortIO(ckvm_run_io(run), run: UnsafeMutableRawPointer(run), vcpu: vcpu)
        case KVM_EXIT_MMIO:
            // Nothing is mapped outside RAM: reads see all ones, as on a bus with no device; writes are dropped.
            let access = ckvm_run_mmio(run)
            if access.is_write == 0 {
                ckvm_run_set_mmio_data(run, [UInt8](repeating: 0xFF, count: 8), access.len)
            }
            return true
        case KVM_EXIT_HLT, KVM_EXIT_INTR, KVM_EXIT_IRQ_WINDOW_OPEN:
            return true
        case KVM_EXIT_DIRTY_RING_FULL:
            try dirtyTracker.vcpuRingFull(vcpu)
            return true
        case KVM_EXIT_SHUTDOWN:
            finish(.failed("guest shut down (triple fault) at rip 0x\(String((try? vcpu.registers().rip) ?? 0, radix: 16))"))
            return false
        case KVM_EXIT_SYSTEM_EVENT:
            finish(.failed("guest asked for system event \(ckvm_run_system_event_type(run))"))
            return false
        case KVM_EXIT_INTERNAL_ERROR:
            let rip = (try? vcpu.registers().rip) ?? 0
            finish(.failed("KVM internal error, suberror \(ckvm_run_internal_suberror(run)) (1 = instruction emulation failed) at rip 0x\(String(rip, radix: 16))"))
            return false
        case KVM_EXIT_FAIL_ENTRY:
            finish(.failed("VM entry failed, hardware reason 0x\(String(ckvm_run_fail_entry_reason(run), radix: 16))"))
            return false
        default:
            finish(.failed("unexpected KVM exit \(reason)"))
            return false
        }
    }

    private func handlePortIO(_ io: ckvm_io_exit, run: UnsafeMutableRawPointer, vcpu: KVMVCPU) -> Bool {
        let data = run + Int(io.data_offset)
        let isOut = io.direction == UInt8(KVM_EXIT_IO_OUT)
        for repetition in 0 ..< Int(io.count) {
            let item = data + repetition * Int(io.size)
            func value() -> UInt32 {
                switch io.size {
                case 1: UInt32(item.load(as: UInt8.self))
                case 2: UInt32(item.loadUnaligned(as: UInt16.self))
                default: item.loadUnaligned(as: UInt32.self)
                }
            }
            switch io.port {
            case Ports.serial:
                let offset = io.port - Ports.serial.lowerBound
                if isOut {
                    if let byte = serial.withLock({ $0.write(offset: offset, value: UInt8(truncatingIfNeeded: value())) }) { console.transmit(byte) }
                } else {
                    item.storeBytes(of: serial.withLock { $0.read(offset: offset) }, as: UInt8.self)
                }
            case Ports.debugExit where isOut:
                finish(.guestExit(UInt8(truncatingIfNeeded: value())))
                return false
            case Ports.sync where isOut:
                onSync?(value())
            default:
                // No device: reads float high, writes vanish.
                if !isOut { item.initializeMemory(as: UInt8.self, repeating: 0xFF, count: Int(io.size)) }
            }
        }
        return true
    }
}
