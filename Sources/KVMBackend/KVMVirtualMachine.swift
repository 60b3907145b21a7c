import CKVM
import Glibc
import LinuxSystem
import Threads

/// A KVM virtual machine: memory slots, in-kernel interrupt controllers and timer, dirty logging, vCPUs.
public final class KVMVirtualMachine: Sendable {
    public let system: KVMSystem
    let handle: KVMHandle
    let savedMSRIndexCache = Locked<[UInt32]?>(nil)

    init(system: KVMSystem, fd: OwnedFileDescriptor) {
        self.system = system
        self.handle = KVMHandle(fd: fd, subject: "VM")
    }

    // MARK: memory

    public struct MemorySlotFlags: OptionSet, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let logDirtyPages = MemorySlotFlags(rawValue: UInt32(KVM_MEM_LOG_DIRTY_PAGES))
        public static let readOnly = MemorySlotFlags(rawValue: UInt32(KVM_MEM_READONLY))
    }

    /// KVM_SET_USER_MEMORY_REGION: maps host memory at `hostAddress` into the guest at `slot.guestPhysicalAddress`.
    public func setMemorySlot(_ slot: MemorySlot, flags: MemorySlotFlags = []) throws {
        var region = kvm_userspace_memory_region(
            slot: slot.id, flags: flags.rawValue, guest_phys_addr: slot.guestPhysicalAddress,
            memory_size: slot.size, userspace_addr: UInt64(UInt(bitPattern: slot.hostAddress)))
        try handle.call("KVM_SET_USER_MEMORY_REGION", CKVM_SET_USER_MEMORY_REGION, &region)
    }

    // MARK: platform

    /// KVM_SET_TSS_ADDR: three pages of guest-physical address space KVM needs for real-mode emulation on Intel.
    public func setTSSAddress(_ address: UInt64) throws {
        try handle.call("KVM_SET_TSS_ADDR", CKVM_SET_TSS_ADDR, value: UInt(address))
    }

    public func setIdentityMapAddress(_ address: UInt64) throws {
        var value = address
        try handle.call("KVM_SET_IDENTITY_MAP_ADDR", CKVM_SET_IDENTITY_MAP_ADDR, &value)
    }

    /// KVM_CREATE_IRQCHIP: in-kernel PIC pair, IOAPIC and a LAPIC per vCPU.
    public func createInterruptControllers() throws {
        try handle.call("KVM_CREATE_IRQCHIP", CKVM_CREATE_IRQCHIP)
    }

    /// KVM_CREATE_PIT2: in-kernel i8254 timer.
    public func createTimer() throws {
        var config = kvm_pit_config()
        try handle.call("KVM_CREATE_PIT2", CKVM_CREATE_PIT2, &config)
    }

    /// The interrupt controllers KVM_GET_IRQCHIP names by chip id.
    public enum InterruptChip: UInt32, CaseIterable, Sendable {
        case picMaster = 0, picSlave = 1, ioapic = 2
    }

    public func interruptChip(_ chip: InterruptChip) throws -> kvm_irqchip {
        var state = zeroed(kvm_irqchip.self)
        state.chip_id = chip.rawValue
        try handle.call("KVM_GET_IRQCHIP", CKVM_GET_IRQCHIP, &state)
        return state
    }

    public func setInterruptChip(_ state: kvm_irqchip) throws {
        try handle.set("KVM_SET_IRQCHIP", CKVM_SET_IRQCHIP, state)
    }

    public func timerState() throws -> kvm_pit_state2 { try handle.get("KVM_GET_PIT2", CKVM_GET_PIT2) }
    public func setTimerState(_ state: kvm_pit_state2) throws { try handle.set("KVM_SET_PIT2", CKVM_SET_PIT2, state) }

    /// KVM_GET_CLOCK: the kvmclock base that guests see.
    public func clock() throws -> kvm_clock_data { try handle.get("KVM_GET_CLOCK", CKVM_GET_CLOCK) }

    public func setClock(_ clock: kvm_clock_data) throws {
        // Only the clock value is restored; KVM rejects flags it did not hand out for this purpose.
        var value = zeroed(kvm_clock_data.self)
        value.clock = clock.clock
        try handle.set("KVM_SET_CLOCK", CKVM_SET_CLOCK, value)
    }

    // MARK: capabilities

    public func enable(_ capability: KVMCapability, arguments: [UInt64] = []) throws {
        var request = zeroed(kvm_enable_cap.self)
        request.cap = UInt32(capability.rawValue)
        withUnsafeMutableBytes(of: &request.args) { args in
            for (index, value) in arguments.prefix(4).enumerated() { args.storeBytes(of: value, toByteOffset: index * 8, as: UInt64.self) }
        }
        do {
            try handle.call("KVM_ENABLE_CAP", CKVM_ENABLE_CAP, &request)
        } catch let error as SystemError {
            throw SystemError("KVM_ENABLE_CAP(\(capability)) on VM", errno: error.errno)
        }
    }

    // MARK: dirty log

    /// KVM_GET_DIRTY_LOG for one slot into `bitmap` (one bit per page, 64-bit words).
    /// With manual protection enabled it reads without re-arming; `clearDirtyLog` re-arms.
    public func dirtyLog(slot: UInt32, into bitmap: UnsafeMutablePointer<UInt64>) throws {
        var request = zeroed(kvm_dirty_log.self)
        request.slot = slot
        request.dirty_bitmap = UnsafeMutableRawPointer(bitmap)
        try handle.call("KVM_GET_DIRTY_LOG", CKVM_GET_DIRTY_LOG, &request)
    }

    /// KVM_CLEAR_DIRTY_LOG: clears, and write-protects again, the pages set in `bitmap` for pages
    /// `firstPage ..< firstPage + pageCount` of a slot. `firstPage` must be a multiple of 64.
    public func clearDirtyLog(slot: UInt32, firstPage: UInt64, pageCount: UInt32,
                              bitmap: UnsafeMutablePointer<UInt64>) throws {
        var request = zeroed(kvm_clear_dirty_log.self)
        request.slot = slot
        request.first_page = firstPage
        request.num_pages = pageCount
        request.dirty_bitmap = UnsafeMutableRawPointer(bitmap)
        try handle.call("KVM_CLEAR_DIRTY_LOG", CKVM_CLEAR_DIRTY_LOG, &request)
    }

    /// KVM_RESET_DIRTY_RINGS: re-arms the pages whose ring entries were marked harvested.
    @discardableResult
    public func resetDirtyRings() throws -> Int {
        Int(try handle.call("KVM_RESET_DIRTY_RINGS", CKVM_RESET_DIRTY_RINGS))
    }

    // MARK: vCPUs

    public func createVCPU(id: UInt32) throws -> KVMVCPU {
        let fd = try handle.call("KVM_CREATE_VCPU", CKVM_CREATE_VCPU, value: UInt(id))
        return try KVMVCPU(vm: self, id: id, fd: OwnedFileDescriptor(taking: fd))
    }
}

/// One KVM memory slot: a range of guest-physical addresses backed by host memory.
///
/// Sendable: plain values; `hostAddress` names guest RAM whose bytes are synchronized by their users.
public struct MemorySlot: @unchecked Sendable, Equatable {
    public let id: UInt32
    public let guestPhysicalAddress: UInt64
    public let size: UInt64
    public let hostAddress: UnsafeMutableRawPointer

    public init(id: UInt32, guestPhysicalAddress: UInt64, size: UInt64, hostAddress: UnsafeMutableRawPointer) {
        self.id = id
        self.guestPhysicalAddress = guestPhysicalAddress
        self.size = size
        self.hostAddress = hostAddress
    }

    public var pageCount: Int { Int(size / UInt64(pageSize)) }
    public var guestPhysicalRange: Range<UInt64> { guestPhysicalAddress ..< guestPhysicalAddress + size }
}

/// x86 base page size: the unit of dirty tracking and migration.
public let pageSize = 4096

extension KVMSystem {
    /// Works on a VM that another program made and keeps (a VMM that links the engine): `fd` must be a KVM VM
    /// descriptor; this object uses a duplicate of it, so the caller may close its own. The VM's capabilities,
    /// devices and slots stay as they were.
    public func adoptVM(duplicating fd: Int32) throws -> KVMVirtualMachine {
        KVMVirtualMachine(system: self, fd: try duplicateKVMDescriptor(fd, named: "kvm-vm"))
    }
}

extension KVMVirtualMachine {
    /// Works on vCPU `id` of this VM, made by another program: `fd` must be that vCPU's descriptor; this object
    /// uses a duplicate of it, and maps its `kvm_run` page again.
    public func adoptVCPU(id: UInt32, duplicating fd: Int32) throws -> KVMVCPU {
        try KVMVCPU(vm: self, id: id, fd: try duplicateKVMDescriptor(fd, named: "kvm-vcpu:\(id)"))
    }
}

/// KVM's descriptors are anonymous inodes whose link in /proc names the object ("anon_inode:kvm-vm",
/// "anon_inode:kvm-vcpu:3"): checking it turns a wrong descriptor into a clear error before any ioctl.
private func duplicateKVMDescriptor(_ fd: Int32, named name: String) throws -> OwnedFileDescriptor {
    var target = [CChar](repeating: 0, count: 64)
    let length = fd >= 0 ? readlink("/proc/self/fd/\(fd)", &target, target.count - 1) : -1
    let found = length > 0 ? String(decoding: target[0 ..< length].map { UInt8(bitPattern: $0) }, as: UTF8.self) : "not open"
    guard found == "anon_inode:\(name)" else {
        throw SystemError("descriptor \(fd) is \(found), not a KVM \(name)", errno: EBADF)
    }
    return OwnedFileDescriptor(taking: try systemCall("fcntl F_DUPFD_CLOEXEC") { fcntl(fd, F_DUPFD_CLOEXEC, 0) })
}
