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
    static func snapshotToXen(_ path: String, parents: [String], to output: String, overwrite: Bool) throws {
        try refuseExisting(output, overwrite: overwrite)
        let chain = try SnapshotChain.open(path, parents: parents)
        let sink = XenImageSink(path: output)
        let bar = ProgressBar("converting")
        // One thread: the image sink records which frames it was handed in a plain array.
        _ = try SnapshotRestore.restore(chain, into: sink, threads: 1) { bar.update(done: $0, total: $1) }
        bar.finish()
        do { try sink.start() } catch { throw SnapshotError.io("writing \(output): \(error)") }
        print("wrote \(output): xl save image of snapshot \(chain.top.header.id), \(chain.dataPages) data pages, \(Formatting.bytes(Double(sink.bytesWritten)))")
    }

    /// An `xl save` image into a full native snapshot.
    static func xenToSnapshot(_ path: String, to output: String, memoryFormat: SnapshotMemoryFormat,
                              compression: SnapshotWriter.Compression, overwrite: Bool) throws {
        let source: XenImageSource
        do { source = try XenImageSource(path: path) } catch { throw SnapshotError.corrupt(part: "xl image \(path)", "\(error)") }
        let options = SnapshotSaveOptions(live: false, keepTracking: false, memoryFormat: memoryFormat, compression: compression, overwrite: overwrite)
        let report = try SnapshotSaver(source: source, path: output, options: options).run()
        print("wrote \(output): \(report.header.memoryFormat) full snapshot \(report.header.id) of \(path), \(report.header.dataPages) data pages"
            + (source.usedCarriedState ? " (exact KVM state, carried in the image)" : " (KVM state rebuilt from Xen's records)"))
    }

    private static func refuseExisting(_ path: String, overwrite: Bool) throws {
        if FileManager.default.fileExists(atPath: path) {
            guard overwrite else { throw SnapshotError.io("\(path) exists; refusing to overwrite it") }
            try FileManager.default.removeItem(atPath: path)
        }
    }
}

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
