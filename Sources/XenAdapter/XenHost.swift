import Glibc
import KVMBackend
import MigrationEngine
import MigrationWire

/// Why the live Xen backend cannot run here.
public struct XenHostError: Error, CustomStringConvertible {
    public let reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { "Xen host: \(reason)" }
}

/// libxenctrl and libxenforeignmemory, loaded with dlopen when first needed, so that our binaries run on
/// hosts without Xen. The declarations are those of Xen 4.17's headers (Debian's libxen-dev).
final class XenLibraries {
    typealias Handle = OpaquePointer
    let interfaceOpen: @convention(c) (UnsafeMutableRawPointer?, UnsafeMutableRawPointer?, UInt32) -> Handle?
    let interfaceClose: @convention(c) (Handle) -> Int32
    let domainPause: @convention(c) (Handle, UInt32) -> Int32
    let domainUnpause: @convention(c) (Handle, UInt32) -> Int32
    let getContext: @convention(c) (Handle, UInt32, UnsafeMutablePointer<UInt8>?, UInt32) -> Int32
    let setContext: @convention(c) (Handle, UInt32, UnsafeMutablePointer<UInt8>, UInt32) -> Int32
    /// xc_shadow_control(xch, domid, sop, mb, mode): log-dirty on and off.
    let shadowControl: @convention(c) (Handle, UInt32, UInt32, UnsafeMutablePointer<UInt32>?, UInt32) -> Int32
    /// xc_logdirty_control(xch, domid, sop, bitmap, pages, mode, stats): CLEAN and PEEK.
    let logDirtyControl: @convention(c) (Handle, UInt32, UInt32, UnsafeMutableRawPointer?, UInt, UInt32, UnsafeMutableRawPointer?) -> Int64
    let allocatePages: @convention(c) (Handle, UnsafeMutableRawPointer, Int32) -> UnsafeMutableRawPointer?
    let freePages: @convention(c) (Handle, UnsafeMutableRawPointer, Int32) -> Void
    let populatePhysmap: @convention(c) (Handle, UInt32, UInt, UInt32, UInt32, UnsafeMutablePointer<UInt>) -> Int32
    let foreignOpen: @convention(c) (UnsafeMutableRawPointer?, UInt32) -> Handle?
    let foreignClose: @convention(c) (Handle) -> Int32
    let foreignMap: @convention(c) (Handle, UInt32, Int32, Int, UnsafePointer<UInt>, UnsafeMutablePointer<Int32>) -> UnsafeMutableRawPointer?
    let foreignUnmap: @convention(c) (Handle, UnsafeMutableRawPointer, Int) -> Int32

    static func load() throws -> XenLibraries {
        func open(_ names: [String]) throws -> UnsafeMutableRawPointer {
            var errors: [String] = []
            for name in names {
                if let handle = dlopen(name, RTLD_NOW | RTLD_LOCAL) { return handle }
                errors.append(String(cString: dlerror()))
            }
            throw XenHostError("not a Xen host: cannot load \(names[0]) (\(errors.joined(separator: "; ")))")
        }
        let ctrl = try open(["libxenctrl.so.4.17", "libxenctrl.so"])
        let foreign = try open(["libxenforeignmemory.so.1", "libxenforeignmemory.so"])
        func symbol<T>(_ library: UnsafeMutableRawPointer, _ name: String, as: T.Type) throws -> T {
            guard let pointer = dlsym(library, name) else { throw XenHostError("\(name) is missing from the Xen libraries (not Xen 4.17?)") }
            return unsafeBitCast(pointer, to: T.self)
        }
        return XenLibraries(
            interfaceOpen: try symbol(ctrl, "xc_interface_open", as: (@convention(c) (UnsafeMutableRawPointer?, UnsafeMutableRawPointer?, UInt32) -> Handle?).self),
            interfaceClose: try symbol(ctrl, "xc_interface_close", as: (@convention(c) (Handle) -> Int32).self),
            domainPause: try symbol(ctrl, "xc_domain_pause", as: (@convention(c) (Handle, UInt32) -> Int32).self),
            domainUnpause: try symbol(ctrl, "xc_domain_unpause", as: (@convention(c) (Handle, UInt32) -> Int32).self),
            getContext: try symbol(ctrl, "xc_domain_hvm_getcontext", as: (@convention(c) (Handle, UInt32, UnsafeMutablePointer<UInt8>?, UInt32) -> Int32).self),
            setContext: try symbol(ctrl, "xc_domain_hvm_setcontext", as: (@convention(c) (Handle, UInt32, UnsafeMutablePointer<UInt8>, UInt32) -> Int32).self),
            shadowControl: try symbol(ctrl, "xc_shadow_control", as: (@convention(c) (Handle, UInt32, UInt32, UnsafeMutablePointer<UInt32>?, UInt32) -> Int32).self),
            logDirtyControl: try symbol(ctrl, "xc_logdirty_control", as: (@convention(c) (Handle, UInt32, UInt32, UnsafeMutableRawPointer?, UInt, UInt32, UnsafeMutableRawPointer?) -> Int64).self),
            allocatePages: try symbol(ctrl, "xc__hypercall_buffer_alloc_pages", as: (@convention(c) (Handle, UnsafeMutableRawPointer, Int32) -> UnsafeMutableRawPointer?).self),
            freePages: try symbol(ctrl, "xc__hypercall_buffer_free_pages", as: (@convention(c) (Handle, UnsafeMutableRawPointer, Int32) -> Void).self),
            populatePhysmap: try symbol(ctrl, "xc_domain_populate_physmap_exact", as: (@convention(c) (Handle, UInt32, UInt, UInt32, UInt32, UnsafeMutablePointer<UInt>) -> Int32).self),
            foreignOpen: try symbol(foreign, "xenforeignmemory_open", as: (@convention(c) (UnsafeMutableRawPointer?, UInt32) -> Handle?).self),
            foreignClose: try symbol(foreign, "xenforeignmemory_close", as: (@convention(c) (Handle) -> Int32).self),
            foreignMap: try symbol(foreign, "xenforeignmemory_map", as: (@convention(c) (Handle, UInt32, Int32, Int, UnsafePointer<UInt>, UnsafeMutablePointer<Int32>) -> UnsafeMutableRawPointer?).self),
            foreignUnmap: try symbol(foreign, "xenforeignmemory_unmap", as: (@convention(c) (Handle, UnsafeMutableRawPointer, Int) -> Int32).self))
    }

    private init(interfaceOpen: @escaping @convention(c) (UnsafeMutableRawPointer?, UnsafeMutableRawPointer?, UInt32) -> Handle?,
                 interfaceClose: @escaping @convention(c) (Handle) -> Int32,
                 domainPause: @escaping @convention(c) (Handle, UInt32) -> Int32,
                 domainUnpause: @escaping @convention(c) (Handle, UInt32) -> Int32,
                 getContext: @escaping @convention(c) (Handle, UInt32, UnsafeMutablePointer<UInt8>?, UInt32) -> Int32,
                 setContext: @escaping @convention(c) (Handle, UInt32, UnsafeMutablePointer<UInt8>, UInt32) -> Int32,
                 shadowControl: @escaping @convention(c) (Handle, UInt32, UInt32, UnsafeMutablePointer<UInt32>?, UInt32) -> Int32,
                 logDirtyControl: @escaping @convention(c) (Handle, UInt32, UInt32, UnsafeMutableRawPointer?, UInt, UInt32, UnsafeMutableRawPointer?) -> Int64,
                 allocatePages: @escaping @convention(c) (Handle, UnsafeMutableRawPointer, Int32) -> UnsafeMutableRawPointer?,
                 freePages: @escaping @convention(c) (Handle, UnsafeMutableRawPointer, Int32) -> Void,
                 populatePhysmap: @escaping @convention(c) (Handle, UInt32, UInt, UInt32, UInt32, UnsafeMutablePointer<UInt>) -> Int32,
                 foreignOpen: @escaping @convention(c) (UnsafeMutableRawPointer?, UInt32) -> Handle?,
                 foreignClose: @escaping @convention(c) (Handle) -> Int32,
                 foreignMap: @escaping @convention(c) (Handle, UInt32, Int32, Int, UnsafePointer<UInt>, UnsafeMutablePointer<Int32>) -> UnsafeMutableRawPointer?,
                 foreignUnmap: @escaping @convention(c) (Handle, UnsafeMutableRawPointer, Int) -> Int32) {
        (self.interfaceOpen, self.interfaceClose, self.domainPause, self.domainUnpause) = (interfaceOpen, interfaceClose, domainPause, domainUnpause)
        (self.getContext, self.setContext, self.shadowControl, self.logDirtyControl) = (getContext, setContext, shadowControl, logDirtyControl)
        (self.allocatePages, self.freePages, self.populatePhysmap) = (allocatePages, freePages, populatePhysmap)
        (self.foreignOpen, self.foreignClose, self.foreignMap, self.foreignUnmap) = (foreignOpen, foreignClose, foreignMap, foreignUnmap)
    }
}

/// A connection to the hypervisor from a Xen control domain: the calls the live backend needs, one method
/// each, errors carrying errno.
public final class XenHost {
    let libraries: XenLibraries
    let control: XenLibraries.Handle
    let foreign: XenLibraries.Handle

    /// Domain control operations of xen/include/public/domctl.h.
    enum ShadowOp: UInt32 { case off = 0, enableLogDirty = 2, clean = 11, peek = 12 }

    /// Opens the hypervisor interfaces. Fails with a `XenHostError` that says why on a host that is not a
    /// Xen control domain (no privcmd device, no Xen libraries, or no permission).
    public static func open() throws -> XenHost {
        guard access("/dev/xen/privcmd", F_OK) == 0 || access("/proc/xen/privcmd", F_OK) == 0 else {
            throw XenHostError("not a Xen host: neither /dev/xen/privcmd nor /proc/xen/privcmd exists (this kernel does not run as a Xen control domain)")
        }
        let libraries = try XenLibraries.load()
        guard let control = libraries.interfaceOpen(nil, nil, 0) else {
            throw XenHostError("xc_interface_open failed: \(String(cString: strerror(errno))) (not dom0, or not root?)")
        }
        guard let foreign = libraries.foreignOpen(nil, 0) else {
            _ = libraries.interfaceClose(control)
            throw XenHostError("xenforeignmemory_open failed: \(String(cString: strerror(errno)))")
        }
        return XenHost(libraries: libraries, control: control, foreign: foreign)
    }

    private init(libraries: XenLibraries, control: XenLibraries.Handle, foreign: XenLibraries.Handle) {
        self.libraries = libraries
        self.control = control
        self.foreign = foreign
    }

    deinit {
        _ = libraries.foreignClose(foreign)
        _ = libraries.interfaceClose(control)
    }

    func check(_ result: Int32, _ what: String, domain: UInt32) throws {
        guard result == 0 else { throw XenFileError(operation: "\(what) of domain \(domain)", errno: errno) }
    }

    public func pause(domain: UInt32) throws { try check(libraries.domainPause(control, domain), "xc_domain_pause", domain: domain) }
    public func unpause(domain: UInt32) throws { try check(libraries.domainUnpause(control, domain), "xc_domain_unpause", domain: domain) }

    /// The domain's HVM context blob (§3 of protocol/xen.md).
    public func hvmContext(domain: UInt32) throws -> [UInt8] {
        let size = libraries.getContext(control, domain, nil, 0)
        guard size > 0 else { throw XenFileError(operation: "xc_domain_hvm_getcontext (size) of domain \(domain)", errno: errno) }
        var blob = [UInt8](repeating: 0, count: Int(size))
        let written = blob.withUnsafeMutableBufferPointer { libraries.getContext(control, domain, $0.baseAddress, UInt32(size)) }
        guard written > 0 else { throw XenFileError(operation: "xc_domain_hvm_getcontext of domain \(domain)", errno: errno) }
        return Array(blob.prefix(Int(written)))
    }

    public func setHVMContext(domain: UInt32, _ blob: [UInt8]) throws {
        var blob = blob
        try check(blob.withUnsafeMutableBufferPointer { libraries.setContext(control, domain, $0.baseAddress!, UInt32($0.count)) },
                  "xc_domain_hvm_setcontext", domain: domain)
    }

    func shadow(_ op: ShadowOp, domain: UInt32) throws {
        try check(libraries.shadowControl(control, domain, op.rawValue, nil, 0), "log-dirty \(op)", domain: domain)
    }

    /// CLEAN (read and reset) or PEEK the log-dirty bitmap of `pages` frames into `bitmap`, a hypercall
    /// buffer of `XenDirtyBitmap`.
    func logDirty(_ op: ShadowOp, domain: UInt32, bitmap: XenDirtyBitmap) throws {
        let result = libraries.logDirtyControl(control, domain, op.rawValue, bitmap.descriptor, UInt(bitmap.pages), 0, nil)
        guard result >= 0 else { throw XenFileError(operation: "log-dirty \(op) of domain \(domain)", errno: errno) }
    }

    /// Maps `frames` of `domain` into this process; frames that fail to map are reported in the returned
    /// error array (0 = mapped).
    func map(domain: UInt32, frames: [UInt], writable: Bool) throws -> (UnsafeMutableRawPointer, [Int32]) {
        var errors = [Int32](repeating: 0, count: frames.count)
        let base = frames.withUnsafeBufferPointer { pfns in
            errors.withUnsafeMutableBufferPointer {
                libraries.foreignMap(foreign, domain, writable ? PROT_READ | PROT_WRITE : PROT_READ, pfns.count, pfns.baseAddress!, $0.baseAddress!)
            }
        }
        guard let base else { throw XenFileError(operation: "xenforeignmemory_map of \(frames.count) frames of domain \(domain)", errno: errno) }
        return (base, errors)
    }

    func unmap(_ base: UnsafeMutableRawPointer, pages: Int) { _ = libraries.foreignUnmap(foreign, base, pages) }

    /// Gives `domain` memory at `frames` (4 KiB each), as a restore must before writing pages.
    func populate(domain: UInt32, frames: [UInt]) throws {
        var frames = frames
        try check(frames.withUnsafeMutableBufferPointer { libraries.populatePhysmap(control, domain, UInt($0.count), 0, 0, $0.baseAddress!) },
                  "xc_domain_populate_physmap_exact", domain: domain)
    }
}

/// A log-dirty bitmap in hypercall-safe memory, with the xc_hypercall_buffer_t that names it.
final class XenDirtyBitmap {
    let host: XenHost
    let pages: Int
    let descriptor: UnsafeMutableRawPointer
    let bytes: UnsafeMutableRawPointer
    let bufferPages: Int32

    init(host: XenHost, pages: Int) throws {
        self.host = host
        self.pages = pages
        // struct xc_hypercall_buffer: hbuf, param_shadow, dir, ubuf, sz — 40 bytes on x86-64, zeroed.
        descriptor = UnsafeMutableRawPointer.allocate(byteCount: 40, alignment: 8)
        descriptor.initializeMemory(as: UInt8.self, repeating: 0, count: 40)
        bufferPages = Int32((pages / 8 + 4095) / 4096)
        guard let memory = host.libraries.allocatePages(host.control, descriptor, bufferPages) else {
            descriptor.deallocate()
            throw XenFileError(operation: "hypercall buffer of \(bufferPages) pages", errno: errno)
        }
        bytes = memory
    }

    deinit {
        host.libraries.freePages(host.control, descriptor, bufferPages)
        descriptor.deallocate()
    }

    func forEachSetBit(_ visit: (UInt64) -> Void) {
        let words = bytes.bindMemory(to: UInt64.self, capacity: (pages + 63) / 64)
        for w in 0 ..< (pages + 63) / 64 where words[w] != 0 {
            var word = words[w]
            while word != 0 {
                let bit = word.trailingZeroBitCount
                let frame = UInt64(w * 64 + bit)
                if frame < pages { visit(frame) }
                word &= word - 1
            }
        }
    }
}

/// The device-state component holding a raw Xen HVM context blob, for guests that come from a live Xen
/// domain: the engine carries it; `XenDomainSink` restores it.
public enum XenDeviceComponent {
    public static let hvmContext: UInt32 = DeviceComponent.vmmPrivateBase + 0x5848
}

/// A running HVM domain on this Xen host as the source of a migration. Its RAM layout comes from the
/// caller (the domain's xl configuration: `XenDomainConfiguration.layout`).
///
/// Sendable under the `GuestSource` thread contract: `mappings` is set in `init`, and `page(frame:)` only reads
/// it; the host's handles and `bitmap` are used by the control calls alone.
public final class XenDomainSource: GuestSource, @unchecked Sendable {
    public let host: XenHost
    public let domain: UInt32
    public let layout: GuestMemoryLayout
    private var mappings: [(firstFrame: UInt64, base: UnsafeMutableRawPointer, pages: Int, errors: [Int32])] = []
    private let zeroPage: UnsafeMutableRawPointer
    private var bitmap: XenDirtyBitmap?

    public init(host: XenHost, domain: UInt32, layout: GuestMemoryLayout) throws {
        self.host = host
        self.domain = domain
        self.layout = layout
        zeroPage = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        zeroPage.initializeMemory(as: UInt8.self, repeating: 0, count: 4096)
        for region in layout.regions {
            let first = region.guestPhysicalAddress >> 12
            let frames = (0 ..< region.size >> 12).map { UInt(first + $0) }
            let (base, errors) = try host.map(domain: domain, frames: frames, writable: false)
            mappings.append((first, base, frames.count, errors))
        }
    }

    deinit {
        for m in mappings { host.unmap(m.base, pages: m.pages) }
        zeroPage.deallocate()
    }

    private func mapping(_ frame: UInt64) -> (UnsafeMutableRawPointer, Bool)? {
        for m in mappings where frame >= m.firstFrame && frame - m.firstFrame < UInt64(m.pages) {
            let index = Int(frame - m.firstFrame)
            return (m.base + index * 4096, m.errors[index] == 0)
        }
        return nil
    }

    public func page(frame: UInt64) -> UnsafeRawPointer {
        guard let (pointer, mapped) = mapping(frame), mapped else { return UnsafeRawPointer(zeroPage) }
        return UnsafeRawPointer(pointer)
    }

    /// Frames Xen could map: the others are not populated in the domain and read as zero.
    public func forEachPopulatedFrame(_ visit: (UInt64) -> Void) throws {
        for m in mappings { for i in 0 ..< m.pages where m.errors[i] == 0 { visit(m.firstFrame + UInt64(i)) } }
    }

    public func startDirtyTracking() throws {
        let end = Int(layout.regions.last.map { ($0.guestPhysicalAddress + $0.size) >> 12 } ?? 0)
        bitmap = try XenDirtyBitmap(host: host, pages: end)
        try host.shadow(.enableLogDirty, domain: domain)
    }

    public func harvestDirtyFrames(_ visit: (UInt64) -> Void) throws {
        guard let bitmap else { throw XenHostError("dirty tracking is not started") }
        try host.logDirty(.clean, domain: domain, bitmap: bitmap)
        bitmap.forEachSetBit { frame in if layout.contains(frame: frame, pageShift: 12) { visit(frame) } }
    }

    public func stopDirtyTracking() throws {
        try host.shadow(.off, domain: domain)
        bitmap = nil
    }

    public func pause() throws { try host.pause(domain: domain) }
    public func resume() { try? host.unpause(domain: domain) }
    /// Xen has no per-domain duty-cycle knob here; the scheduler's cap would be the tool. Not throttled.
    public func setThrottle(_ fraction: Double) {}

    public func captureDeviceState() throws -> [DeviceState] {
        [DeviceState(componentID: XenDeviceComponent.hvmContext, instance: 0, componentVersion: 1,
                     blob: ByteSlice(try host.hvmContext(domain: domain)))]
    }
}

/// An HVM domain on this Xen host, created paused and empty by the toolstack, rebuilt from a migration:
/// RAM is populated and mapped on `prepare`, the HVM context set on `restore` (from a Xen blob, or mapped
/// from a KVM machine state), and the domain unpaused on `start`.
///
/// Sendable under the `GuestSink` thread contract: `mappings` changes only in the control calls, and the
/// channels' threads only read it; the host's handles are used by the control calls alone.
public final class XenDomainSink: GuestSink, @unchecked Sendable {
    public let host: XenHost
    public let domain: UInt32
    private var mappings: [(firstFrame: UInt64, base: UnsafeMutableRawPointer, pages: Int)] = []

    public init(host: XenHost, domain: UInt32) {
        self.host = host
        self.domain = domain
    }

    deinit { unmapAll() }

    public func prepare(layout: GuestMemoryLayout) throws {
        for region in layout.regions {
            let first = region.guestPhysicalAddress >> 12
            let frames = (0 ..< region.size >> 12).map { UInt(first + $0) }
            try host.populate(domain: domain, frames: frames)
            let (base, errors) = try host.map(domain: domain, frames: frames, writable: true)
            guard errors.allSatisfy({ $0 == 0 }) else {
                host.unmap(base, pages: frames.count)
                throw XenHostError("domain \(domain): \(errors.filter { $0 != 0 }.count) populated frames could not be mapped")
            }
            mappings.append((first, base, frames.count))
        }
    }

    public func page(frame: UInt64) -> UnsafeMutableRawPointer {
        let m = mappings.first { frame >= $0.firstFrame && frame - $0.firstFrame < UInt64($0.pages) }!
        return m.base + Int(frame - m.firstFrame) * 4096
    }

    public func restore(deviceState: [DeviceState]) throws {
        if let xen = deviceState.first(where: { $0.componentID == XenDeviceComponent.hvmContext }) {
            try host.setHVMContext(domain: domain, xen.blob.bytes)
        } else if let kvm = deviceState.first(where: { $0.componentID == DeviceComponent.kvmVM }) {
            let machine = try kvm.blob.withUnsafeBytes { try MachineStateEncoding.decode($0) }
            try host.setHVMContext(domain: domain, XenStateMapping.domainState(from: machine).hvmContext.encoded())
        } else {
            throw XenHostError("no HVM context or KVM machine state among \(deviceState.count) device states")
        }
    }

    public func start() throws {
        unmapAll()
        try host.unpause(domain: domain)
    }

    /// Leaves the domain paused for the toolstack to destroy.
    public func discard() { unmapAll() }

    private func unmapAll() {
        for m in mappings { host.unmap(m.base, pages: m.pages) }
        mappings = []
    }
}
