import Foundation
import Glibc
import KVMBackend
import MigrationEngine
import MigrationWire

/// A guest becoming an `xl save` image file. Pages are collected in memory (the engine writes them through
/// pointers, in any order and more than once); `start` writes the image to a temporary file next to `path`,
/// fsyncs it and renames it into place, so `path` is either absent or complete.
///
/// Sendable under the `GuestSink` thread contract: only the control calls change its properties; the channels'
/// threads write guest memory and their frames' bytes of `touched`, never the same frame at once.
public final class XenImageSink: GuestSink, @unchecked Sendable {
    public let path: String
    public let name: String
    /// Whether the xl header carries the guest's own device state, for an exact way back to KVM. Without it
    /// the image holds only what Xen's records can express (protocol/xen.md).
    public let carriesDeviceState: Bool
    private var layout: GuestMemoryLayout?
    private var memory: UnsafeMutableRawPointer?
    private var memoryBytes = 0
    /// One byte per frame: whether the engine asked for a pointer to it (the frames that may hold data).
    private var touched = UnsafeMutableBufferPointer<UInt8>(start: nil, count: 0)
    private var deviceState: [DeviceState]?
    /// Set by `start`: the image's size in bytes.
    public private(set) var bytesWritten: UInt64 = 0

    public init(path: String, name: String = "migrated-guest", carriesDeviceState: Bool = true) {
        self.path = path
        self.name = name
        self.carriesDeviceState = carriesDeviceState
    }

    deinit { release() }

    public func prepare(layout: GuestMemoryLayout) throws {
        try XenImageFile.checkLayout(layout)
        let end = Int(layout.regions.last!.guestPhysicalAddress + layout.regions.last!.size)
        guard let base = mmap(nil, end, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              base != MAP_FAILED else { throw XenFileError(operation: "mmap \(end) bytes of guest memory", errno: errno) }
        // Huge pages: a guest's worth of 4 KiB faults costs more than the copy into them.
        madvise(base, end, MADV_HUGEPAGE)
        memory = base
        memoryBytes = end
        touched = .allocate(capacity: end >> 12)
        touched.initialize(repeating: 0)
        self.layout = layout
    }

    public func page(frame: UInt64) -> UnsafeMutableRawPointer {
        touched[Int(frame)] = 1
        return memory! + Int(frame << 12)
    }

    /// Takes the KVM machine state (and any other device state, carried unchanged in the xl header).
    public func restore(deviceState: [DeviceState]) throws {
        guard layout != nil else { throw XenConversionError("device state before memory") }
        let machines = deviceState.filter { $0.componentID == DeviceComponent.kvmVM }
        guard machines.count == 1 else { throw XenConversionError("expected one KVM machine state, got \(machines.count)") }
        machine = try machines[0].blob.withUnsafeBytes { try MachineStateEncoding.decode($0) }
        self.deviceState = deviceState
    }

    private var machine: MachineState?

    /// Writes and publishes the image.
    public func start() throws {
        guard let layout, let deviceState, let memory, machine != nil else {
            throw XenConversionError("start before memory and device state")
        }
        let touched = self.touched
        do {
            bytesWritten = try XenImageFile.write(to: path, name: name, layout: layout, deviceState: deviceState,
                                                  carriesDeviceState: carriesDeviceState,
                                                  isPopulated: { touched[Int($0)] != 0 },
                                                  contents: { UnsafeRawPointer(memory.advanced(by: Int($0 << 12))) })
        } catch {
            release()
            throw error
        }
        release()
    }

    /// Writes the image of a paused guest straight from `source`, with no copy of its memory in between:
    /// what `GuestCopy` into a sink does, minus collecting the pages. Returns the image's size in bytes.
    @discardableResult
    public static func save(_ source: GuestSource, to path: String, name: String = "migrated-guest",
                            carriesDeviceState: Bool = true) throws -> UInt64 {
        let layout = source.layout
        let end = Int((layout.regions.last.map { $0.guestPhysicalAddress + $0.size } ?? 0) >> 12)
        var populated = [UInt8](repeating: 0, count: end)
        try source.forEachPopulatedFrame { populated[Int($0)] = 1 }
        return try XenImageFile.write(to: path, name: name, layout: layout, deviceState: try source.captureDeviceState(),
                                      carriesDeviceState: carriesDeviceState,
                                      isPopulated: { populated[Int($0)] != 0 }, contents: source.page(frame:))
    }

    public func discard() { release() }

    private func release() {
        if let memory { munmap(memory, memoryBytes) }
        memory = nil
        touched.deallocate()
        touched = UnsafeMutableBufferPointer(start: nil, count: 0)
    }
}

/// Writing an image file of a paused guest: to a temporary file beside `path`, synced, renamed into place.
enum XenImageFile {
    static func checkLayout(_ layout: GuestMemoryLayout) throws {
        guard XenDomainConfiguration(layout: layout, name: "", vcpus: 1) != nil else {
            throw XenConversionError("memory layout \(layout.regions) has no xl equivalent: RAM must start at 0 and continue at 4 GiB")
        }
    }

    static func write(to path: String, name: String, layout: GuestMemoryLayout, deviceState: [DeviceState], carriesDeviceState: Bool,
                      isPopulated: (UInt64) -> Bool, contents: (UInt64) -> UnsafeRawPointer) throws -> UInt64 {
        try checkLayout(layout)
        let machines = deviceState.filter { $0.componentID == DeviceComponent.kvmVM }
        guard machines.count == 1 else { throw XenConversionError("expected one KVM machine state, got \(machines.count)") }
        let machine = try machines[0].blob.withUnsafeBytes { try MachineStateEncoding.decode($0) }
        let configuration = XenDomainConfiguration(layout: layout, name: name, vcpus: machine.vcpus.count)!
        // Special pages go back into the page data they came from, not into the carried chunk: the pages
        // are then where Xen looks for them, and the chunk holds nothing twice.
        let specials = deviceState.filter { $0.componentID == XenDeviceComponent.specialPages }
        guard specials.count <= 1 else { throw XenConversionError("expected at most one Xen special pages state, got \(specials.count)") }
        let special = try specials.first.map(XenSpecialPages.init(deviceState:))
        let carried = deviceState.filter { $0.componentID != XenDeviceComponent.specialPages }
        let directory = (path as NSString).deletingLastPathComponent
        var template = Array(((directory.isEmpty ? "." : directory) + "/.xen-image-XXXXXX").utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw XenFileError(operation: "create a temporary file in \(directory)", errno: errno) }
        let temporary = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        let size: UInt64
        do {
            defer { close(fd) }
            let writer = try XenImageWriter(fileDescriptor: fd, configuration: configuration, carriedState: carriesDeviceState ? carried : [])
            let domain = XenStateMapping.domainState(from: machine)
            try writer.writeStaticData(cpuid: domain.cpuidPolicy, msrs: domain.msrPolicy)
            var populated: [UInt64] = [], unpopulated: [UInt64] = []
            for region in layout.regions {
                for frame in (region.guestPhysicalAddress >> 12) ..< ((region.guestPhysicalAddress + region.size) >> 12) {
                    if isPopulated(frame) { populated.append(frame) } else { unpopulated.append(frame) }
                }
            }
            try writer.writePages(populated, contents: contents)
            // RAM never written is zero, but a Xen host must still allocate it.
            try writer.writeFrames(unpopulated, type: LibxcStream.PageType.allocateOnly)
            try special?.write(to: writer, layout: layout)
            try writer.writeDomainState(domain)
            try writer.finish()
            guard fsync(fd) == 0 else { throw XenFileError(operation: "fsync", errno: errno) }
            size = writer.bytesWritten
            guard rename(temporary, path) == 0 else { throw XenFileError(operation: "rename to \(path)", errno: errno) }
        } catch {
            unlink(temporary)
            throw error
        }
        let dirfd = open(directory.isEmpty ? "." : directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dirfd >= 0 { fsync(dirfd); close(dirfd) }
        return size
    }
}

/// An `xl save` image as a paused guest. The device state is the KVM state our writer carried in the xl
/// header when it still describes this image's HVM context (nobody changed the Xen side); otherwise it is
/// built from the HVM records (XenStateMapping), and `usedCarriedState` is false.
///
/// Sendable under the `GuestSource` thread contract: the image is read only, and `carriedMachine` is computed
/// on the control thread.
public final class XenImageSource: GuestSource, @unchecked Sendable {
    public let image: XenImage
    public var layout: GuestMemoryLayout { image.layout }
    private let zeroPage: UnsafeMutableRawPointer

    public init(image: XenImage) {
        self.image = image
        zeroPage = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        zeroPage.initializeMemory(as: UInt8.self, repeating: 0, count: 4096)
    }

    public convenience init(path: String) throws { self.init(image: try XenImage(path: path)) }

    deinit { zeroPage.deallocate() }

    public func page(frame: UInt64) -> UnsafeRawPointer { image.page(frame: frame) ?? UnsafeRawPointer(zeroPage) }

    public func forEachPopulatedFrame(_ visit: (UInt64) -> Void) throws { image.forEachDataFrame(visit) }

    // A file does not run: nothing is ever dirty, and pausing is already done.
    public func startDirtyTracking() throws {}
    public func harvestDirtyFrames(_ visit: (UInt64) -> Void) throws {}
    public func stopDirtyTracking() throws {}
    public func pause() throws {}
    public func resume() {}
    public func setThrottle(_ fraction: Double) {}

    /// Whether the carried KVM state matches the image's Xen state, so that it can be used as it is.
    public var usedCarriedState: Bool { carriedMachine != nil }

    private lazy var carriedMachine: [DeviceState]? = {
        guard let carried = image.carriedState else { return nil }
        let machines = carried.filter { $0.componentID == DeviceComponent.kvmVM }
        guard machines.count == 1,
              let state = try? machines[0].blob.withUnsafeBytes({ try MachineStateEncoding.decode($0) }) else { return nil }
        return XenStateMapping.domainState(from: state) == image.domainState ? carried : nil
    }()

    /// The image's special frames (outside RAM, so not among the pages): they travel as a device state.
    public var specialPages: XenSpecialPages { XenSpecialPages(image: image) }

    /// The KVM machine state (carried or rebuilt), and the special pages when the image has any. The image's
    /// own page data decides the special pages, not a carried copy: a Xen tool may have changed them.
    public func captureDeviceState() throws -> [DeviceState] {
        let special = specialPages
        let extra = special.isEmpty ? [] : [special.deviceState]
        if let carried = carriedMachine { return carried.filter { $0.componentID != XenDeviceComponent.specialPages } + extra }
        let machine = try XenStateMapping.machineState(from: image.domainState)
        return [DeviceState(componentID: DeviceComponent.kvmVM, instance: 0, componentVersion: MachineStateEncoding.currentVersion,
                            blob: ByteSlice(MachineStateEncoding.encode(machine)))] + extra
    }
}

public struct XenConversionError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
