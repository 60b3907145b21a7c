// The libxc records that describe an HVM domain besides its memory, as plain values. Kept free of KVM
// types, so that the reader builds on its own (fuzz/xen compiles it without KVMBackend).

/// A CPUID leaf of Xen's policy (xen_cpuid_leaf_t): leaf, subleaf (0xffffffff when the leaf has none), eax-edx.
public struct XenCPUIDLeaf: Equatable, Sendable {
    public static let noSubleaf: UInt32 = 0xFFFF_FFFF
    public var leaf, subleaf, eax, ebx, ecx, edx: UInt32
    public init(leaf: UInt32, subleaf: UInt32, eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32) {
        (self.leaf, self.subleaf, self.eax, self.ebx, self.ecx, self.edx) = (leaf, subleaf, eax, ebx, ecx, edx)
    }
}

/// An MSR of Xen's policy (xen_msr_entry_t).
public struct XenMSREntry: Equatable, Sendable {
    public var index: UInt32
    public var flags: UInt32
    public var value: UInt64
    public init(index: UInt32, flags: UInt32 = 0, value: UInt64) { (self.index, self.flags, self.value) = (index, flags, value) }
}

/// X86_TSC_INFO: TSC mode, guest TSC rate, elapsed nanoseconds, incarnation.
public struct XenTSCInfo: Equatable, Sendable {
    public var mode: UInt32
    public var khz: UInt32
    public var nanoseconds: UInt64
    public var incarnation: UInt32
    public init(mode: UInt32 = 0, khz: UInt32, nanoseconds: UInt64, incarnation: UInt32 = 0) {
        (self.mode, self.khz, self.nanoseconds, self.incarnation) = (mode, khz, nanoseconds, incarnation)
    }
}

/// Everything an HVM image holds besides memory: the libxc records that describe the domain.
public struct XenDomainState: Equatable, Sendable {
    public var hvmContext: HVMContext
    public var hvmParams: [(index: UInt64, value: UInt64)]
    public var cpuidPolicy: [XenCPUIDLeaf]
    public var msrPolicy: [XenMSREntry]
    public var tscInfo: XenTSCInfo

    public init(hvmContext: HVMContext, hvmParams: [(index: UInt64, value: UInt64)], cpuidPolicy: [XenCPUIDLeaf],
                msrPolicy: [XenMSREntry], tscInfo: XenTSCInfo) {
        self.hvmContext = hvmContext
        self.hvmParams = hvmParams
        self.cpuidPolicy = cpuidPolicy
        self.msrPolicy = msrPolicy
        self.tscInfo = tscInfo
    }

    public static func == (a: XenDomainState, b: XenDomainState) -> Bool {
        a.hvmContext == b.hvmContext && a.cpuidPolicy == b.cpuidPolicy && a.msrPolicy == b.msrPolicy
            && a.tscInfo == b.tscInfo && a.hvmParams.map(\.index) == b.hvmParams.map(\.index)
            && a.hvmParams.map(\.value) == b.hvmParams.map(\.value)
    }
}
