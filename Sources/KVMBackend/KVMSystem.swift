import CKVM
import Glibc
import LinuxSystem

/// Capabilities this project asks KVM about (numbers from <linux/kvm.h>).
public enum KVMCapability: UInt, CustomStringConvertible, CaseIterable, Sendable {
    case irqchip = 0
    case userMemory = 3
    case setTSSAddress = 4
    case extCPUID = 7
    case maxVCPUs = 66
    case pitState2 = 35
    case adjustClock = 39
    case vcpuEvents = 41
    case debugRegisters = 50
    case xsave = 55
    case xcrs = 56
    case getTSCkHz = 61
    case immediateExit = 136
    case manualDirtyLogProtect2 = 168
    case dirtyLogRing = 192
    case xsave2 = 208
    case dirtyLogRingAcquireRelease = 223

    public var description: String {
        switch self {
        case .irqchip: "KVM_CAP_IRQCHIP"
        case .userMemory: "KVM_CAP_USER_MEMORY"
        case .setTSSAddress: "KVM_CAP_SET_TSS_ADDR"
        case .extCPUID: "KVM_CAP_EXT_CPUID"
        case .maxVCPUs: "KVM_CAP_MAX_VCPUS"
        case .pitState2: "KVM_CAP_PIT_STATE2"
        case .adjustClock: "KVM_CAP_ADJUST_CLOCK"
        case .vcpuEvents: "KVM_CAP_VCPU_EVENTS"
        case .debugRegisters: "KVM_CAP_DEBUGREGS"
        case .xsave: "KVM_CAP_XSAVE"
        case .xcrs: "KVM_CAP_XCRS"
        case .getTSCkHz: "KVM_CAP_GET_TSC_KHZ"
        case .immediateExit: "KVM_CAP_IMMEDIATE_EXIT"
        case .manualDirtyLogProtect2: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"
        case .dirtyLogRing: "KVM_CAP_DIRTY_LOG_RING"
        case .xsave2: "KVM_CAP_XSAVE2"
        case .dirtyLogRingAcquireRelease: "KVM_CAP_DIRTY_LOG_RING_ACQ_REL"
        }
    }
}

/// `/dev/kvm`: the hypervisor as a whole. Creates VMs and answers questions about what the host supports.
public final class KVMSystem: Sendable {
    public static let devicePath = "/dev/kvm"
    let handle: KVMHandle

    /// Whether this host offers KVM to us at all; tests that need KVM skip themselves when it does not.
    public static var isAvailable: Bool { access(devicePath, R_OK | W_OK) == 0 }

    public init() throws {
        let fd = try OwnedFileDescriptor(opening: Self.devicePath, flags: O_RDWR)
        handle = KVMHandle(fd: fd, subject: Self.devicePath)
        let version = try handle.call("KVM_GET_API_VERSION", CKVM_GET_API_VERSION)
        guard version == 12 else { throw SystemError("KVM API version \(version) (expected 12)", errno: ENOTSUP) }
    }

    /// KVM_CHECK_EXTENSION: 0 when absent, otherwise a capability-specific value (often 1, sometimes a size).
    public func check(_ capability: KVMCapability) -> Int {
        (try? Int(handle.call("KVM_CHECK_EXTENSION", CKVM_CHECK_EXTENSION, value: capability.rawValue))) ?? 0
    }

    public func require(_ capability: KVMCapability) throws {
        if check(capability) == 0 { throw SystemError("this host's KVM lacks \(capability)", errno: ENOTSUP) }
    }

    public func vcpuMappingSize() throws -> Int {
        Int(try handle.call("KVM_GET_VCPU_MMAP_SIZE", CKVM_GET_VCPU_MMAP_SIZE))
    }

    /// KVM_GET_SUPPORTED_CPUID: every leaf the host can offer a guest.
    public func supportedCPUID() throws -> [kvm_cpuid_entry2] {
        try fetchCPUID(subject: handle) { pointer in
            try handle.call("KVM_GET_SUPPORTED_CPUID", CKVM_GET_SUPPORTED_CPUID, pointer)
        }
    }

    /// KVM_GET_MSR_INDEX_LIST: the MSRs that KVM saves and restores for a guest.
    public func msrIndexList() throws -> [UInt32] {
        var capacity = 64
        while true {
            let byteCount = MemoryLayout<kvm_msr_list>.size + capacity * MemoryLayout<UInt32>.size
            let result: [UInt32]? = try withZeroedStorage(of: kvm_msr_list.self, byteCount: byteCount) { pointer in
                pointer.storeBytes(of: UInt32(capacity), as: UInt32.self)
                do {
                    try handle.call("KVM_GET_MSR_INDEX_LIST", CKVM_GET_MSR_INDEX_LIST, pointer)
                } catch let error as SystemError where error.errno == E2BIG {
                    return nil
                }
                let count = Int(pointer.load(as: UInt32.self))
                let indices = (pointer + MemoryLayout<kvm_msr_list>.size).assumingMemoryBound(to: UInt32.self)
                return Array(UnsafeBufferPointer(start: indices, count: count))
            }
            if let result { return result }
            capacity *= 4
            guard capacity <= 1 << 16 else { throw SystemError("KVM_GET_MSR_INDEX_LIST: list too long", errno: E2BIG) }
        }
    }

    public func createVM() throws -> KVMVirtualMachine {
        let fd = try handle.call("KVM_CREATE_VM", CKVM_CREATE_VM, value: 0)
        return KVMVirtualMachine(system: self, fd: OwnedFileDescriptor(taking: fd))
    }
}

/// Fills a `kvm_cpuid2` through `fill`, growing the buffer while the kernel answers E2BIG.
func fetchCPUID(subject: KVMHandle, _ fill: (UnsafeMutableRawPointer) throws -> Void) throws -> [kvm_cpuid_entry2] {
    var capacity = 128
    while true {
        let byteCount = MemoryLayout<kvm_cpuid2>.size + capacity * MemoryLayout<kvm_cpuid_entry2>.stride
        let result: [kvm_cpuid_entry2]? = try withZeroedStorage(of: kvm_cpuid2.self, byteCount: byteCount) { pointer in
            pointer.storeBytes(of: UInt32(capacity), as: UInt32.self)
            do { try fill(pointer) } catch let error as SystemError where error.errno == E2BIG { return nil }
            return readFlexibleArray(pointer, header: kvm_cpuid2.self, of: kvm_cpuid_entry2.self)
        }
        if let result { return result }
        capacity *= 2
        guard capacity <= 4096 else { throw SystemError("CPUID list on \(subject.subject) too long", errno: E2BIG) }
    }
}

/// Reads a kernel structure that starts with a 32-bit count followed by an array (kvm_cpuid2, kvm_msrs).
func readFlexibleArray<Header, Element>(_ pointer: UnsafeMutableRawPointer, header: Header.Type,
                                       of element: Element.Type) -> [Element] {
    let count = Int(pointer.load(as: UInt32.self))
    let first = (pointer + MemoryLayout<Header>.size).assumingMemoryBound(to: Element.self)
    return Array(UnsafeBufferPointer(start: first, count: count))
}

/// Builds a structure of a 32-bit count followed by `elements`, and passes it to `body`.
@discardableResult
func withFlexibleArray<Header, Element, R>(header: Header.Type, elements: [Element],
                                          _ body: (UnsafeMutableRawPointer) throws -> R) rethrows -> R {
    let byteCount = MemoryLayout<Header>.size + elements.count * MemoryLayout<Element>.stride
    return try withZeroedStorage(of: Header.self, byteCount: byteCount) { pointer in
        pointer.storeBytes(of: UInt32(elements.count), as: UInt32.self)
        elements.withUnsafeBytes { bytes in
            if let source = bytes.baseAddress {
                (pointer + MemoryLayout<Header>.size).copyMemory(from: source, byteCount: bytes.count)
            }
        }
        return try body(pointer)
    }
}
