import CKVM
import KVMBackend

/// MSR numbers the mapping moves between KVM's MSR list and Xen's save entries.
enum MSR {
    static let tsc: UInt32 = 0x10, tscAdjust: UInt32 = 0x3B, platformInfo: UInt32 = 0xCE
    static let archCapabilities: UInt32 = 0x10A, mtrrCap: UInt32 = 0xFE
    static let sysenterCS: UInt32 = 0x174, sysenterESP: UInt32 = 0x175, sysenterEIP: UInt32 = 0x176
    static let mtrrPhysBase0: UInt32 = 0x200, pat: UInt32 = 0x277, mtrrDefType: UInt32 = 0x2FF
    static let mtrrFixed: [UInt32] = [0x250, 0x258, 0x259, 0x268, 0x269, 0x26A, 0x26B, 0x26C, 0x26D, 0x26E, 0x26F]
    static let tscDeadline: UInt32 = 0x6E0
    static let star: UInt32 = 0xC000_0081, lstar: UInt32 = 0xC000_0082, cstar: UInt32 = 0xC000_0083
    static let sfmask: UInt32 = 0xC000_0084, kernelGSBase: UInt32 = 0xC000_0102, tscAux: UInt32 = 0xC000_0103
    static let defaultPAT: UInt64 = 0x0007_0406_0007_0406
}

/// Maps KVM's machine state to Xen's HVM records and back (protocol/xen.md, "State mapping").
public enum XenStateMapping {
    // MARK: KVM -> Xen

    public static func domainState(from machine: MachineState) -> XenDomainState {
        let vcpus = machine.vcpus
        var entries: [HVMSaveEntry] = []
        var header = EntryBytes(count: 24)
        header[UInt32.self, 0] = HVMContext.headerMagic
        header[UInt32.self, 4] = HVMContext.headerVersion
        header[UInt32.self, 16] = vcpus.first?.cpuid.first { $0.function == 1 }?.eax ?? 0
        header[UInt32.self, 20] = vcpus.first?.tscFrequencyKHz ?? 0
        entries.append(HVMSaveEntry(typecode: HVMSaveType.header, instance: 0, data: header.bytes))
        // Xen saves entries by typecode, and per-vCPU entries by vCPU within a typecode.
        for v in vcpus { entries.append(entry(HVMSaveType.cpu, v, cpu(v))) }
        entries.append(HVMSaveEntry(typecode: HVMSaveType.pic, instance: 0, data: pic(machine.devices.picMaster.chip.pic, master: true)))
        entries.append(HVMSaveEntry(typecode: HVMSaveType.pic, instance: 1, data: pic(machine.devices.picSlave.chip.pic, master: false)))
        entries.append(HVMSaveEntry(typecode: HVMSaveType.ioapic, instance: 0, data: ioapic(machine.devices.ioapic)))
        for v in vcpus { entries.append(entry(HVMSaveType.lapic, v, lapic(v))) }
        for v in vcpus {
            entries.append(entry(HVMSaveType.lapicRegisters, v, withUnsafeBytes(of: v.localAPIC.regs) { Array($0) }))
        }
        entries.append(HVMSaveEntry(typecode: HVMSaveType.pit, instance: 0, data: pit(machine.devices.timer)))
        entries.append(HVMSaveEntry(typecode: HVMSaveType.rtc, instance: 0, data: rtc()))
        for v in vcpus { entries.append(entry(HVMSaveType.mtrr, v, mtrr(v))) }
        for v in vcpus { entries.append(entry(HVMSaveType.cpuXsave, v, xsave(v))) }
        for v in vcpus {
            if let adjust = msr(v, MSR.tscAdjust) {
                var e = EntryBytes(count: 8)
                e[UInt64.self, 0] = adjust
                entries.append(entry(HVMSaveType.tscAdjust, v, e.bytes))
            }
        }
        let policy = (vcpus.first?.cpuid ?? []).map { e in
            XenCPUIDLeaf(leaf: e.function, subleaf: e.flags & UInt32(KVM_CPUID_FLAG_SIGNIFCANT_INDEX) != 0 ? e.index : XenCPUIDLeaf.noSubleaf,
                         eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx)
        }
        // Xen's MSR policy holds only these two; a real Xen refuses others.
        let msrPolicy = [MSR.platformInfo, MSR.archCapabilities].compactMap { index in
            vcpus.first.flatMap { msr($0, index) }.map { XenMSREntry(index: index, value: $0) }
        }
        return XenDomainState(
            hvmContext: HVMContext(entries: entries),
            hvmParams: [(HVMParam.x87FIPWidth, 8)],
            cpuidPolicy: policy, msrPolicy: msrPolicy,
            tscInfo: XenTSCInfo(khz: vcpus.first?.tscFrequencyKHz ?? 0, nanoseconds: machine.devices.clock.clock))
    }

    private static func entry(_ type: UInt16, _ v: VCPUState, _ data: [UInt8]) -> HVMSaveEntry {
        HVMSaveEntry(typecode: type, instance: UInt16(truncatingIfNeeded: v.id), data: data)
    }

    static func msr(_ v: VCPUState, _ index: UInt32) -> UInt64? {
        v.modelSpecificRegisters.first { $0.index == index }?.data
    }

    /// Xen's segment attribute word, VMX access-rights style: type, S, DPL, P, AVL, L, D/B, G in bits 0-11.
    static func attributes(_ s: kvm_segment) -> UInt32 {
        UInt32(s.type & 0xF) | UInt32(s.s & 1) << 4 | UInt32(s.dpl & 3) << 5 | UInt32(s.present & 1) << 7
            | UInt32(s.avl & 1) << 8 | UInt32(s.l & 1) << 9 | UInt32(s.db & 1) << 10 | UInt32(s.g & 1) << 11
    }

    static func segment(selector: UInt32, limit: UInt32, base: UInt64, attributes a: UInt32) -> kvm_segment {
        var s = kvm_segment()
        s.base = base
        s.limit = limit
        s.selector = UInt16(truncatingIfNeeded: selector)
        s.type = UInt8(a & 0xF)
        s.s = UInt8(a >> 4 & 1)
        s.dpl = UInt8(a >> 5 & 3)
        s.present = UInt8(a >> 7 & 1)
        s.avl = UInt8(a >> 8 & 1)
        s.l = UInt8(a >> 9 & 1)
        s.db = UInt8(a >> 10 & 1)
        s.g = UInt8(a >> 11 & 1)
        s.unusable = s.present == 0 ? 1 : 0
        return s
    }

    static func cpu(_ v: VCPUState) -> [UInt8] {
        var c = EntryBytes(count: CPUField.size)
        v.xsave.withUnsafeBytes { c.copy(UnsafeRawBufferPointer(rebasing: $0.prefix(512)), to: CPUField.fpu) }
        let r = v.registers
        let gprs = [r.rax, r.rbx, r.rcx, r.rdx, r.rbp, r.rsi, r.rdi, r.rsp, r.r8, r.r9, r.r10, r.r11, r.r12,
                    r.r13, r.r14, r.r15, r.rip, r.rflags]
        for (i, value) in gprs.enumerated() { c[UInt64.self, CPUField.gpr + 8 * i] = value }
        let s = v.specialRegisters
        c[UInt64.self, CPUField.cr0] = s.cr0
        c[UInt64.self, CPUField.cr2] = s.cr2
        c[UInt64.self, CPUField.cr3] = s.cr3
        c[UInt64.self, CPUField.cr4] = s.cr4
        let d = v.debugRegisters
        for (i, value) in [d.db.0, d.db.1, d.db.2, d.db.3, d.dr6, d.dr7].enumerated() { c[UInt64.self, CPUField.dr + 8 * i] = value }
        let segments = [s.cs, s.ds, s.es, s.fs, s.gs, s.ss, s.tr, s.ldt]
        for (i, seg) in segments.enumerated() {
            c[UInt32.self, CPUField.selectors + 4 * i] = UInt32(seg.selector)
            c[UInt32.self, CPUField.limits + 4 * i] = seg.limit
            c[UInt64.self, CPUField.bases + 8 * i] = seg.base
            c[UInt32.self, CPUField.arbytes + 4 * i] = attributes(seg)
        }
        c[UInt32.self, CPUField.limits + 4 * 8] = UInt32(s.idt.limit)
        c[UInt32.self, CPUField.limits + 4 * 9] = UInt32(s.gdt.limit)
        c[UInt64.self, CPUField.bases + 8 * 8] = s.idt.base
        c[UInt64.self, CPUField.bases + 8 * 9] = s.gdt.base
        let msrFields: [(Int, UInt32)] = [
            (CPUField.sysenterCS, MSR.sysenterCS), (CPUField.sysenterESP, MSR.sysenterESP), (CPUField.sysenterEIP, MSR.sysenterEIP),
            (CPUField.shadowGS, MSR.kernelGSBase), (CPUField.lstar, MSR.lstar), (CPUField.star, MSR.star),
            (CPUField.cstar, MSR.cstar), (CPUField.sfmask, MSR.sfmask), (CPUField.tscAux, MSR.tscAux), (CPUField.tsc, MSR.tsc),
        ]
        for (offset, index) in msrFields { c[UInt64.self, offset] = msr(v, index) ?? 0 }
        c[UInt64.self, CPUField.efer] = s.efer
        // The event being delivered: vector 0-7, type 8-10 (0 external interrupt, 2 NMI, 3 hardware
        // exception), error code valid 11, valid 31, as in VMX's interruption-information field.
        let e = v.events
        var pending: UInt32 = 0
        if e.exception.injected != 0 {
            pending = UInt32(e.exception.nr) | 3 << 8 | UInt32(e.exception.has_error_code & 1) << 11 | 1 << 31
            c[UInt32.self, CPUField.errorCode] = e.exception.error_code
        } else if e.nmi.injected != 0 {
            pending = 2 | 2 << 8 | 1 << 31
        } else if e.interrupt.injected != 0 {
            pending = UInt32(e.interrupt.nr) | 1 << 31
        }
        c[UInt32.self, CPUField.pendingEvent] = pending
        c[UInt32.self, CPUField.flags] = CPUField.fpuInitialised
        return c.bytes
    }

    static func lapic(_ v: VCPUState) -> [UInt8] {
        var l = EntryBytes(count: 24)
        let base = v.specialRegisters.apic_base
        let svr: UInt32 = withUnsafeBytes(of: v.localAPIC.regs) { $0.le(UInt32.self, at: 0xF0) }
        let tdcr: UInt32 = withUnsafeBytes(of: v.localAPIC.regs) { $0.le(UInt32.self, at: 0x3E0) }
        l[UInt64.self, 0] = base
        // VLAPIC_SW_DISABLED: SVR bit 8 clear; VLAPIC_HW_DISABLED: APIC base bit 11 clear.
        l[UInt32.self, 8] = (svr & 0x100 == 0 ? 1 : 0) | (base & 0x800 == 0 ? 2 : 0)
        let shift = ((tdcr & 3) | (tdcr & 8) >> 1) + 1
        l[UInt32.self, 12] = UInt32(1) << (shift & 7)
        l[UInt64.self, 16] = msr(v, MSR.tscDeadline) ?? 0
        return l.bytes
    }

    static func pic(_ p: kvm_pic_state, master: Bool) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 8)
        b[0] = p.irr
        b[1] = p.imr
        b[2] = p.isr
        b[3] = p.irq_base
        b[4] = (p.init_state & 3) | (p.init4 & 1) << 2 | (p.priority_add & 7) << 4
        b[5] = (p.read_reg_select & 1) | (p.poll & 1) << 1 | (p.auto_eoi & 1) << 2 | (p.rotate_on_auto_eoi & 1) << 3
            | (p.special_fully_nested_mode & 1) << 4 | (p.special_mask & 1) << 5 | (master ? 1 : 0) << 6
        b[6] = p.elcr
        // Xen keeps the PIC's INT output; KVM recomputes it. An unmasked request not in service raises it.
        b[7] = p.irr & ~p.imr & ~p.isr != 0 ? 1 : 0
        return b
    }

    static func ioapic(_ chip: kvm_irqchip) -> [UInt8] {
        var b = EntryBytes(count: 400)
        let state = chip.chip.ioapic
        b[UInt64.self, 0] = state.base_address
        b[UInt32.self, 8] = state.ioregsel
        b[UInt32.self, 12] = state.id
        // KVM's redirection table (an array of anonymous unions Swift does not name) starts at byte 24.
        withUnsafeBytes(of: state) { b.copy(UnsafeRawBufferPointer(rebasing: $0[24 ..< 24 + 8 * Int(KVM_IOAPIC_NUM_PINS)]), to: 16) }
        // Xen has 48 pins, KVM 24: the rest are masked.
        for pin in Int(KVM_IOAPIC_NUM_PINS) ..< 48 { b[UInt64.self, 16 + 8 * pin] = 1 << 16 }
        return b.bytes
    }

    static func pit(_ t: kvm_pit_state2) -> [UInt8] {
        var b = EntryBytes(count: 56)
        var channels = t.channels
        withUnsafeBytes(of: &channels) { raw in
            // Xen's channel is KVM's without count_load_time: the first 16 of KVM's 24 bytes.
            for i in 0 ..< 3 { b.copy(UnsafeRawBufferPointer(rebasing: raw[24 * i ..< 24 * i + 16]), to: 16 * i) }
        }
        b[UInt32.self, 48] = t.flags & UInt32(KVM_PIT_FLAGS_SPEAKER_DATA_ON) != 0 ? 1 : 0
        return b.bytes
    }

    /// MicroVM has no RTC; a Xen host needs one, so the image carries a valid, idle CMOS clock at zero.
    static func rtc() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 24)
        b[0x0B] = 0x02  // register B: 24-hour mode, binary off, no interrupts
        b[0x0D] = 0x80  // register D: valid RAM and time
        return b
    }

    static func mtrr(_ v: VCPUState) -> [UInt8] {
        var b = EntryBytes(count: 240)
        b[UInt64.self, 0] = msr(v, MSR.pat) ?? MSR.defaultPAT
        for i in 0 ..< 16 { b[UInt64.self, 8 + 8 * i] = msr(v, MSR.mtrrPhysBase0 + UInt32(i)) ?? 0 }
        for (i, index) in MSR.mtrrFixed.enumerated() { b[UInt64.self, 136 + 8 * i] = msr(v, index) ?? 0 }
        // 8 variable ranges, fixed ranges and write-combining: what KVM emulates.
        b[UInt64.self, 224] = msr(v, MSR.mtrrCap) ?? 0x508
        b[UInt64.self, 232] = msr(v, MSR.mtrrDefType) ?? 0
        return b.bytes
    }

    static func xcr0(_ v: VCPUState) -> UInt64 {
        var xcrs = v.extendedControlRegisters
        let count = Int(min(xcrs.nr_xcrs, 16))
        return withUnsafeBytes(of: &xcrs.xcrs) { raw in
            for i in 0 ..< count where raw.le(UInt32.self, at: 16 * i) == 0 { return raw.le(UInt64.self, at: 16 * i + 8) }
            return 1
        }
    }

    /// The standard-format XSAVE area size for the components in `xcr0`, from CPUID leaf 0xD.
    static func xsaveSize(xcr0: UInt64, cpuid: [kvm_cpuid_entry2]) -> Int {
        var size = 576
        for bit in 2 ..< 63 where xcr0 & (1 << UInt64(bit)) != 0 {
            if let leaf = cpuid.first(where: { $0.function == 0xD && $0.index == UInt32(bit) }) {
                size = max(size, Int(leaf.ebx) + Int(leaf.eax))
            }
        }
        return size
    }

    static func xsave(_ v: VCPUState) -> [UInt8] {
        let x = xcr0(v)
        let size = min(xsaveSize(xcr0: x, cpuid: v.cpuid), v.xsave.count)
        var b = EntryBytes(count: 24 + size)
        b[UInt64.self, 0] = x
        b[UInt64.self, 8] = x
        b[UInt64.self, 16] = x
        v.xsave.withUnsafeBytes { b.copy(UnsafeRawBufferPointer(rebasing: $0.prefix(size)), to: 24) }
        return b.bytes
    }

    // MARK: Xen -> KVM

    public struct MappingError: Error, CustomStringConvertible {
        public let reason: String
        public var description: String { "Xen state cannot become a KVM machine: \(reason)" }
    }

    /// Builds a KVM machine from an image's HVM records alone. What Xen does not save (protocol/xen.md lists
    /// it) takes KVM's reset value: the PIT's load time, the PIC's edge latch, the IOAPIC's IRR, the
    /// interrupt shadow, MSRs outside the mapping.
    public static func machineState(from xen: XenDomainState) throws -> MachineState {
        let context = xen.hvmContext
        let cpus = context.entries(HVMSaveType.cpu)
        guard !cpus.isEmpty else { throw MappingError(reason: "no CPU entry in the HVM context") }
        guard let header = context.entry(HVMSaveType.header) else { throw MappingError(reason: "no HEADER") }
        let khz = xen.tscInfo.khz != 0 ? xen.tscInfo.khz : EntryBytes(header.data)[UInt32.self, 20]
        var vcpus: [VCPUState] = []
        for (position, entry) in cpus.enumerated() {
            guard entry.instance == position else { throw MappingError(reason: "CPU entries are not vCPUs 0..\(cpus.count - 1)") }
            vcpus.append(try vcpu(entry, context: context, xen: xen, khz: khz))
        }
        guard let master = context.entry(HVMSaveType.pic, instance: 0), let slave = context.entry(HVMSaveType.pic, instance: 1),
              let ioapicEntry = context.entry(HVMSaveType.ioapic), let pitEntry = context.entry(HVMSaveType.pit) else {
            throw MappingError(reason: "the HVM context lacks PIC, IOAPIC or PIT")
        }
        var clock = kvm_clock_data()
        clock.clock = xen.tscInfo.nanoseconds
        let devices = VMDeviceState(picMaster: picChip(master.data, id: 0), picSlave: picChip(slave.data, id: 1),
                                    ioapic: ioapicChip(ioapicEntry.data), timer: pitState(pitEntry.data), clock: clock)
        return MachineState(devices: devices, vcpus: vcpus)
    }

    static func vcpu(_ entry: HVMSaveEntry, context: HVMContext, xen: XenDomainState, khz: UInt32) throws -> VCPUState {
        let id = entry.instance
        var c = EntryBytes(entry.data)
        if entry.data.count == 1016 {
            // Pre-4.7 compat layout: no msr_tsc_aux; tsc, pending_event and error_code sit 8 bytes earlier.
            var widened = EntryBytes(count: CPUField.size)
            widened.copy(entry.data.withUnsafeBytes { UnsafeRawBufferPointer(rebasing: $0.prefix(CPUField.tscAux)) }, to: 0)
            widened[UInt64.self, CPUField.tsc] = c[UInt64.self, CPUField.tscAux]
            widened[UInt32.self, CPUField.pendingEvent] = c[UInt32.self, CPUField.tsc]
            widened[UInt32.self, CPUField.errorCode] = c[UInt32.self, CPUField.tsc + 4]
            c = widened
        }
        var r = kvm_regs()
        let g = { (i: Int) in c[UInt64.self, CPUField.gpr + 8 * i] }
        (r.rax, r.rbx, r.rcx, r.rdx, r.rbp, r.rsi, r.rdi, r.rsp) = (g(0), g(1), g(2), g(3), g(4), g(5), g(6), g(7))
        (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) = (g(8), g(9), g(10), g(11), g(12), g(13), g(14), g(15))
        (r.rip, r.rflags) = (g(16), g(17))

        var s = kvm_sregs()
        let seg = { (i: Int) in
            segment(selector: c[UInt32.self, CPUField.selectors + 4 * i], limit: c[UInt32.self, CPUField.limits + 4 * i],
                    base: c[UInt64.self, CPUField.bases + 8 * i], attributes: c[UInt32.self, CPUField.arbytes + 4 * i])
        }
        (s.cs, s.ds, s.es, s.fs, s.gs, s.ss, s.tr, s.ldt) = (seg(0), seg(1), seg(2), seg(3), seg(4), seg(5), seg(6), seg(7))
        s.idt.limit = UInt16(truncatingIfNeeded: c[UInt32.self, CPUField.limits + 32])
        s.gdt.limit = UInt16(truncatingIfNeeded: c[UInt32.self, CPUField.limits + 36])
        s.idt.base = c[UInt64.self, CPUField.bases + 64]
        s.gdt.base = c[UInt64.self, CPUField.bases + 72]
        s.cr0 = c[UInt64.self, CPUField.cr0]
        s.cr2 = c[UInt64.self, CPUField.cr2]
        s.cr3 = c[UInt64.self, CPUField.cr3]
        s.cr4 = c[UInt64.self, CPUField.cr4]
        s.efer = c[UInt64.self, CPUField.efer]

        var lapicState = kvm_lapic_state()
        if let regs = context.entry(HVMSaveType.lapicRegisters, instance: id) {
            regs.data.withUnsafeBytes { src in withUnsafeMutableBytes(of: &lapicState.regs) { $0.copyMemory(from: src) } }
        }
        let tpr: UInt32 = withUnsafeBytes(of: lapicState.regs) { $0.le(UInt32.self, at: 0x80) }
        s.cr8 = UInt64(tpr >> 4 & 0xF)
        let lapicEntry = context.entry(HVMSaveType.lapic, instance: id).map { EntryBytes($0.data) }
        s.apic_base = lapicEntry?[UInt64.self, 0] ?? 0xFEE0_0900

        var d = kvm_debugregs()
        d.db = (c[UInt64.self, CPUField.dr], c[UInt64.self, CPUField.dr + 8], c[UInt64.self, CPUField.dr + 16], c[UInt64.self, CPUField.dr + 24])
        d.dr6 = c[UInt64.self, CPUField.dr + 32]
        d.dr7 = c[UInt64.self, CPUField.dr + 40]

        let cpuid = xen.cpuidPolicy.map { leaf -> kvm_cpuid_entry2 in
            var e = kvm_cpuid_entry2()
            e.function = leaf.leaf
            e.index = leaf.subleaf == XenCPUIDLeaf.noSubleaf ? 0 : leaf.subleaf
            e.flags = leaf.subleaf == XenCPUIDLeaf.noSubleaf ? 0 : UInt32(KVM_CPUID_FLAG_SIGNIFCANT_INDEX)
            (e.eax, e.ebx, e.ecx, e.edx) = (leaf.eax, leaf.ebx, leaf.ecx, leaf.edx)
            switch e.function {  // the policy is the domain's; the APIC ID is this vCPU's
            case 1: e.ebx = (e.ebx & 0x00FF_FFFF) | UInt32(id) << 24
            case 0xB, 0x1F: e.edx = UInt32(id)
            default: break
            }
            return e
        }
        func has(_ leaf: UInt32, _ register: KeyPath<kvm_cpuid_entry2, UInt32>, bit: Int) -> Bool {
            cpuid.first { $0.function == leaf && $0.index == 0 }.map { $0[keyPath: register] >> UInt32(bit) & 1 == 1 } ?? false
        }

        var msrs: [(UInt32, UInt64)] = [
            (MSR.tsc, c[UInt64.self, CPUField.tsc]),
            (MSR.sysenterCS, c[UInt64.self, CPUField.sysenterCS]), (MSR.sysenterESP, c[UInt64.self, CPUField.sysenterESP]),
            (MSR.sysenterEIP, c[UInt64.self, CPUField.sysenterEIP]),
            (MSR.star, c[UInt64.self, CPUField.star]), (MSR.lstar, c[UInt64.self, CPUField.lstar]),
            (MSR.cstar, c[UInt64.self, CPUField.cstar]), (MSR.sfmask, c[UInt64.self, CPUField.sfmask]),
            (MSR.kernelGSBase, c[UInt64.self, CPUField.shadowGS]),
        ]
        // Only MSRs the vCPU's CPUID allows: KVM refuses the rest.
        if has(0x8000_0001, \.edx, bit: 27) { msrs.append((MSR.tscAux, c[UInt64.self, CPUField.tscAux])) }
        if let m = context.entry(HVMSaveType.mtrr, instance: id).map({ EntryBytes($0.data) }) {
            msrs.append((MSR.pat, m[UInt64.self, 0]))
            for i in 0 ..< 16 { msrs.append((MSR.mtrrPhysBase0 + UInt32(i), m[UInt64.self, 8 + 8 * i])) }
            for (i, index) in MSR.mtrrFixed.enumerated() { msrs.append((index, m[UInt64.self, 136 + 8 * i])) }
            msrs.append((MSR.mtrrDefType, m[UInt64.self, 232]))
        }
        if let adjust = context.entry(HVMSaveType.tscAdjust, instance: id), has(7, \.ebx, bit: 1) {
            msrs.append((MSR.tscAdjust, EntryBytes(adjust.data)[UInt64.self, 0]))
        }
        if let l = lapicEntry, has(1, \.ecx, bit: 24) { msrs.append((MSR.tscDeadline, l[UInt64.self, 16])) }
        let msrEntries = msrs.map { index, value -> kvm_msr_entry in
            var e = kvm_msr_entry()
            e.index = index
            e.data = value
            return e
        }

        var xcr0: UInt64 = 1
        var area = [UInt8](repeating: 0, count: 4096)
        if let x = context.entry(HVMSaveType.cpuXsave, instance: id), x.data.count >= 24 + 576 {
            xcr0 = EntryBytes(x.data)[UInt64.self, 8]
            let n = min(x.data.count - 24, area.count)
            area.replaceSubrange(0 ..< n, with: x.data[24 ..< 24 + n])
        } else {
            area.replaceSubrange(0 ..< 512, with: c.slice(CPUField.fpu, 512))
            area.withUnsafeMutableBytes { $0.storeBytes(of: UInt64(3).littleEndian, toByteOffset: 512, as: UInt64.self) }
            xcr0 = 3
        }
        var xcrs = kvm_xcrs()
        xcrs.nr_xcrs = 1
        xcrs.xcrs.0.xcr = 0
        xcrs.xcrs.0.value = xcr0

        var events = kvm_vcpu_events()
        let pending = c[UInt32.self, CPUField.pendingEvent]
        if pending & 1 << 31 != 0 {
            let vector = UInt8(pending & 0xFF)
            switch pending >> 8 & 7 {
            case 3:
                events.exception.injected = 1
                events.exception.nr = vector
                events.exception.has_error_code = UInt8(pending >> 11 & 1)
                events.exception.error_code = c[UInt32.self, CPUField.errorCode]
            case 2: events.nmi.injected = 1
            default:
                events.interrupt.injected = 1
                events.interrupt.nr = vector
            }
        }
        var mp = kvm_mp_state()
        mp.mp_state = UInt32(KVM_MP_STATE_RUNNABLE)
        return VCPUState(id: UInt32(id), cpuid: cpuid, multiprocessing: mp, registers: r, specialRegisters: s, xsave: area,
                         extendedControlRegisters: xcrs, debugRegisters: d, localAPIC: lapicState,
                         modelSpecificRegisters: msrEntries, events: events, tscFrequencyKHz: khz)
    }

    static func picChip(_ b: [UInt8], id: UInt32) -> kvm_irqchip {
        var chip = kvm_irqchip()
        chip.chip_id = id
        var p = kvm_pic_state()
        p.irr = b[0]
        p.last_irr = b[0]
        p.imr = b[1]
        p.isr = b[2]
        p.irq_base = b[3]
        p.init_state = b[4] & 3
        p.init4 = b[4] >> 2 & 1
        p.priority_add = b[4] >> 4
        p.read_reg_select = b[5] & 1
        p.poll = b[5] >> 1 & 1
        p.auto_eoi = b[5] >> 2 & 1
        p.rotate_on_auto_eoi = b[5] >> 3 & 1
        p.special_fully_nested_mode = b[5] >> 4 & 1
        p.special_mask = b[5] >> 5 & 1
        p.elcr = b[6]
        p.elcr_mask = id == 0 ? 0xF8 : 0xDE  // KVM's fixed masks: which lines may be level-triggered
        chip.chip.pic = p
        return chip
    }

    static func ioapicChip(_ b: [UInt8]) -> kvm_irqchip {
        var chip = kvm_irqchip()
        chip.chip_id = UInt32(KVM_IRQCHIP_IOAPIC)
        var state = kvm_ioapic_state()
        let e = EntryBytes(b)
        state.base_address = e[UInt64.self, 0]
        state.ioregsel = e[UInt32.self, 8]
        state.id = e[UInt32.self, 12]
        withUnsafeMutableBytes(of: &state) { dst in
            let table = 8 * Int(KVM_IOAPIC_NUM_PINS)
            b.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: dst[24 ..< 24 + table]).copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[16 ..< 16 + table])) }
        }
        chip.chip.ioapic = state
        return chip
    }

    static func pitState(_ b: [UInt8]) -> kvm_pit_state2 {
        var t = kvm_pit_state2()
        withUnsafeMutableBytes(of: &t.channels) { dst in
            b.withUnsafeBytes { src in
                for i in 0 ..< 3 {
                    UnsafeMutableRawBufferPointer(rebasing: dst[24 * i ..< 24 * i + 16])
                        .copyMemory(from: UnsafeRawBufferPointer(rebasing: src[16 * i ..< 16 * i + 16]))
                }
            }
        }
        t.flags = EntryBytes(b)[UInt32.self, 48] != 0 ? UInt32(KVM_PIT_FLAGS_SPEAKER_DATA_ON) : 0
        return t
    }
}
