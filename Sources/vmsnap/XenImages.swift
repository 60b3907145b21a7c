import Foundation
import MigratedAPI
import MigrationWire
import Snapshots
import XenAdapter

// Xen `xl save` images in vmsnap: both ways through the seams. A snapshot chain is restored into an image
// sink (XenImageSink), and an image is saved as a snapshot from an image source (XenImageSource), so the
// conversion code is the restore and save code every other guest uses.

/// Whether the file at `path` begins like an `xl save` image.
func isXenImage(_ path: String) -> Bool {
    guard let handle = FileHandle(forReadingAtPath: path) else { return false }
    defer { try? handle.close() }
    return Array(handle.readData(ofLength: XLHeader.magic.count)) == XLHeader.magic
}

enum XenConversion {
    /// A native snapshot (with its chain) into an `xl save` image of the same memory and vCPU state.
    static func snapshotToXen(_ path: String, parents: [String], to output: String, overwrite: Bool, quiet: Bool) throws -> XenConversionReport {
        try refuseExisting(output, overwrite: overwrite)
        let chain = try SnapshotChain.open(path, parents: parents)
        // Read before writing: a blob this build cannot turn back into page data fails here, with its reason.
        let special: XenSpecialPages?
        do {
            special = try chain.top.deviceState.first { $0.componentID == XenDeviceComponent.specialPages }.map(XenSpecialPages.init(deviceState:))
        } catch { throw SnapshotError.corrupt(part: "device state of \(path)", "\(error)") }
        let sink = XenImageSink(path: output)
        let bar = ProgressBar("converting", quiet: quiet)
        // One thread: the image sink records which frames it was handed in a plain array.
        _ = try SnapshotRestore.restore(chain, into: sink, threads: 1) { bar.update(done: $0, total: $1) }
        bar.finish()
        do { try sink.start() } catch { throw SnapshotError.io("writing \(output): \(error)") }
        return XenConversionReport(input: path, output: output, to: "xen", snapshotID: "\(chain.top.header.id)", dataPages: UInt64(chain.dataPages),
                                   bytes: sink.bytesWritten, exactKVMState: nil, special: special,
                                   specialFramesAre: "written back as page data of the image")
    }

    /// An `xl save` image into a full native snapshot.
    static func xenToSnapshot(_ path: String, to output: String, memoryFormat: SnapshotMemoryFormat,
                              compression: SnapshotWriter.Compression, overwrite: Bool) throws -> XenConversionReport {
        let source: XenImageSource
        do { source = try XenImageSource(path: path) } catch { throw SnapshotError.corrupt(part: "xl image \(path)", "\(error)") }
        let options = SnapshotSaveOptions(live: false, keepTracking: false, memoryFormat: memoryFormat, compression: compression, overwrite: overwrite)
        let report = try SnapshotSaver(source: source, path: output, options: options).run()
        return XenConversionReport(input: path, output: output, to: "\(report.header.memoryFormat)", snapshotID: "\(report.header.id)",
                                   dataPages: report.header.dataPages, bytes: nil, exactKVMState: source.usedCarriedState,
                                   special: source.specialPages,
                                   specialFramesAre: String(format: "kept as device state 0x%08x (Xen special pages)", XenDeviceComponent.specialPages))
    }

    private static func refuseExisting(_ path: String, overwrite: Bool) throws {
        if FileManager.default.fileExists(atPath: path) {
            guard overwrite else { throw SnapshotError.io("\(path) exists; refusing to overwrite it") }
            try FileManager.default.removeItem(atPath: path)
        }
    }
}

/// What a conversion between an `xl save` image and a snapshot did, for the operator (`--json` prints it).
/// The special frames are listed one by one: they lie outside the guest's RAM, and an operator should see
/// that none was lost on the way (protocol/xen.md §2.1).
struct XenConversionReport: Codable {
    struct SpecialFrame: Codable, Equatable {
        var pfn: String
        /// "page" (4096 bytes of contents) or "allocate-only" (XALLOC: Xen allocates it, zero).
        var contents: String
    }
    var input: String
    var output: String
    var to: String
    var snapshotId: String
    var dataPages: UInt64
    var bytes: UInt64?
    /// Xen to native: whether the KVM state is the exact one carried in the image, or rebuilt from Xen's records.
    var exactKVMState: Bool?
    /// Every Xen special frame of the input; none is dropped (the reader refuses any other frame outside RAM).
    var specialFrames: [SpecialFrame]
    var specialFramesAre: String
    /// Always empty, and there for scripts to check: a frame that cannot be kept is refused, never dropped.
    var droppedFrames: [SpecialFrame] = []

    init(input: String, output: String, to: String, snapshotID: String, dataPages: UInt64, bytes: UInt64?, exactKVMState: Bool?,
         special: XenSpecialPages?, specialFramesAre: String) {
        (self.input, self.output, self.to, snapshotId, self.dataPages, self.bytes, self.exactKVMState) =
            (input, output, to, snapshotID, dataPages, bytes, exactKVMState)
        let pages = special?.pages.map { SpecialFrame(pfn: hex($0.frame), contents: "page") } ?? []
        let allocated = special?.allocateOnly.map { SpecialFrame(pfn: hex($0), contents: "allocate-only") } ?? []
        specialFrames = pages + allocated
        self.specialFramesAre = specialFrames.isEmpty ? "none in the input" : specialFramesAre
    }

    var text: String {
        var line = "wrote \(output): "
        if to == "xen" {
            line += "xl save image of snapshot \(snapshotId), \(dataPages) data pages, \(Formatting.bytes(Double(bytes ?? 0)))"
        } else {
            line += "\(to) full snapshot \(snapshotId) of \(input), \(dataPages) data pages"
                + (exactKVMState == true ? " (exact KVM state, carried in the image)" : " (KVM state rebuilt from Xen's records)")
        }
        guard !specialFrames.isEmpty else { return line }
        let frames = specialFrames.map { "\($0.pfn)\($0.contents == "page" ? "" : " (allocate-only)")" }.joined(separator: ", ")
        return line + "\nXen special frames outside RAM: \(specialFrames.count), \(specialFramesAre): \(frames); dropped: none"
    }
}

private func hex(_ frame: UInt64) -> String { "0x" + String(frame, radix: 16) }

/// What `vmsnap inspect` shows of an `xl save` image, and says about what it carries.
struct XenInspectDocument: Codable {
    struct Region: Codable { var guestPhysicalAddress: UInt64; var bytes: UInt64 }
    var path: String
    var format = "xl save image (libxl migration stream v2, libxc stream v3)"
    var name: String
    var vcpus: Int
    var memoryBytes: UInt64
    var savedByXen: String
    var fileBytes: UInt64
    var regions: [Region]
    var pageEntries: Int
    var dataPages: Int
    var allocateOnlyFrames: Int
    var specialPages: Int
    var hvmContextEntries: [String]
    var hvmParams: Int
    var cpuidLeaves: Int
    var msrs: Int
    var tscKHz: UInt32
    var emulatorRecords: Int
    var optionalRecords: Int
    var carriesKVMState: Bool
    var carries: String
    var missingForXen: String

    init(path: String) throws {
        let image: XenImage
        do { image = try XenImage(path: path) } catch { throw SnapshotError.corrupt(part: "xl image \(path)", "\(error)") }
        self.path = path
        name = image.configuration.name
        vcpus = image.configuration.vcpus
        memoryBytes = image.configuration.memoryBytes
        savedByXen = "\(image.xenVersion.major).\(image.xenVersion.minor)"
        fileBytes = image.fileSize
        regions = image.layout.regions.map { Region(guestPhysicalAddress: $0.guestPhysicalAddress, bytes: $0.size) }
        pageEntries = image.pageEntries
        dataPages = image.dataPages
        allocateOnlyFrames = image.allocateOnlyFrames
        specialPages = image.specialPages.count
        let context = image.domainState.hvmContext.entries
        hvmContextEntries = context.map { "\(HVMSaveType.name($0.typecode))#\($0.instance) (\($0.data.count) bytes)" }
        hvmParams = image.domainState.hvmParams.count
        cpuidLeaves = image.domainState.cpuidPolicy.count
        msrs = image.domainState.msrPolicy.count
        tscKHz = image.domainState.tscInfo.khz
        emulatorRecords = image.emulatorRecords.count
        optionalRecords = image.optionalRecords.count
        carriesKVMState = image.carriedState != nil
        carries = "guest RAM, vCPU registers and control state (HVM CPU), LAPIC and its registers, PIC, IOAPIC, PIT, RTC, MTRR, "
            + "HVM params, CPUID and MSR policy, TSC info" + (carriesKVMState ? "; and, in the xl optional data, the exact KVM machine state for the way back" : "")
        missingForXen = "a device model's state (QEMU's EMULATOR_CONTEXT: disks, NICs, VGA) and xenstore contents; "
            + "a real Xen host also needs the guest's special pages (xenstore, console rings) set up by its toolstack"
    }

    var table: String {
        func row(_ name: String, _ value: String) -> String { name.padding(toLength: 16, withPad: " ", startingAt: 0) + value }
        var lines = [
            row("file", path),
            row("format", format),
            row("domain", "\(name), \(vcpus) vCPU\(vcpus == 1 ? "" : "s"), \(Formatting.bytes(Double(memoryBytes)))"),
            row("saved by", "Xen \(savedByXen) stream"),
            row("file size", Formatting.bytes(Double(fileBytes))),
            row("pages", "\(dataPages) data (\(Formatting.bytes(Double(dataPages) * 4096))), \(pageEntries) PAGE_DATA entries, \(allocateOnlyFrames) allocate-only, \(specialPages) special"),
            row("records", "\(hvmParams) HVM params, \(cpuidLeaves) CPUID leaves, \(msrs) MSRs, TSC \(tscKHz) kHz, \(emulatorRecords) emulator, \(optionalRecords) optional"),
            row("KVM state", carriesKVMState ? "carried (exact round trip)" : "not carried (rebuilt from Xen's records)"),
            "",
            "regions:",
        ]
        lines += regions.map { String(format: "  0x%012llx  %@", $0.guestPhysicalAddress, Formatting.bytes(Double($0.bytes))) }
        lines += ["", "HVM context:"] + hvmContextEntries.map { "  \($0)" }
        lines += ["", "carries:        \(carries)", "not carried:    \(missingForXen)"]
        return lines.joined(separator: "\n")
    }
}
