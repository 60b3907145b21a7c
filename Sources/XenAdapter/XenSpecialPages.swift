import MigrationWire

// The toolstack's special pages (xenstore, console and ioreq rings, in frames 0xfeff0-0xfefff of the MMIO
// hole) lie outside the guest's RAM, so a native snapshot's memory cannot hold them, and MicroVM must not
// see them as RAM (its layout check would refuse the guest). They travel instead as one device-state blob,
// which MicroVM ignores (it takes only the KVM machine state) and the Xen writer turns back into page data:
// Xen -> native -> Xen gives the same frames, byte for byte (protocol/xen.md §2.1).

extension XenDeviceComponent {
    /// "Xen special pages": the blob of `XenSpecialPages`.
    public static let specialPages: UInt32 = DeviceComponent.vmmPrivateBase + 0x5850
}

/// The special frames of an image: those with contents and those it only allocates (XALLOC).
///
/// The blob is the body of one PAGE_DATA record (§2): `count:u32, reserved:u32, pfn-word[count]:u64`, then
/// 4096 bytes for each entry of type normal (0), in order; the other entries are XALLOC (0xE) and carry none.
/// Reusing the record's shape means no new format to learn, and the writer emits the pages as Xen sent them.
public struct XenSpecialPages: Equatable, Sendable {
    public struct Page: Equatable, Sendable {
        public var frame: UInt64
        public var bytes: [UInt8]
        public init(frame: UInt64, bytes: [UInt8]) { (self.frame, self.bytes) = (frame, bytes) }
    }
    public static let version: UInt32 = 1

    /// Frames with contents, ascending.
    public var pages: [Page]
    /// Frames only allocated, ascending.
    public var allocateOnly: [UInt64]

    public init(pages: [Page], allocateOnly: [UInt64]) { (self.pages, self.allocateOnly) = (pages, allocateOnly) }

    public var isEmpty: Bool { pages.isEmpty && allocateOnly.isEmpty }

    /// The special frames `image` holds, as the last copy of each in its stream left them.
    public init(image: XenImage) {
        pages = image.specialPages.keys.sorted().map { frame in
            Page(frame: frame, bytes: Array(UnsafeRawBufferPointer(start: image.specialPages[frame]!, count: LibxcStream.pageSize)))
        }
        allocateOnly = image.specialAllocateOnlyFrames
    }

    /// Reads the blob of a device state of component `XenDeviceComponent.specialPages`, refusing anything
    /// our writer would not produce: it will become page data of a Xen image, so it is checked as strictly.
    public init(deviceState: DeviceState) throws {
        guard deviceState.componentID == XenDeviceComponent.specialPages else {
            throw XenConversionError("device state 0x\(String(deviceState.componentID, radix: 16)) is not Xen special pages")
        }
        guard deviceState.componentVersion <= Self.version else {
            throw XenConversionError("Xen special pages version \(deviceState.componentVersion) is newer than this build")
        }
        let blob = deviceState.blob.withUnsafeBytes { Array($0) }
        func fail(_ reason: String) -> XenConversionError { XenConversionError("Xen special pages blob of \(blob.count) bytes: \(reason)") }
        func le64(_ at: Int) -> UInt64 { blob.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt64.self)) } }
        guard blob.count >= 8 else { throw fail("no header") }
        let count = Int(blob.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(as: UInt32.self)) })
        guard blob[4 ..< 8].allSatisfy({ $0 == 0 }) else { throw fail("reserved bytes are not zero") }
        guard count <= xenSpecialPageFrames.count, blob.count >= 8 + 8 * count else { throw fail("\(count) entries") }
        var pages: [Page] = [], allocateOnly: [UInt64] = []
        var data = 8 + 8 * count
        for i in 0 ..< count {
            let word = le64(8 + 8 * i)
            let frame = word & LibxcStream.pfnMask
            guard word & LibxcStream.pfnReservedMask == 0, xenSpecialPageFrames.contains(frame) else {
                throw fail("entry \(i) (0x\(String(word, radix: 16))) is not a frame of the special window")
            }
            switch LibxcStream.PageType(rawValue: word >> 60) {
            case .normal:
                guard blob.count - data >= LibxcStream.pageSize else { throw fail("page of entry \(i) is cut short") }
                pages.append(Page(frame: frame, bytes: Array(blob[data ..< data + LibxcStream.pageSize])))
                data += LibxcStream.pageSize
            case .allocateOnly:
                allocateOnly.append(frame)
            default:
                throw fail("entry \(i) has page type \(word >> 60), neither normal nor XALLOC")
            }
        }
        guard data == blob.count else { throw fail("\(blob.count - data) bytes after the last page") }
        let frames = pages.map(\.frame) + allocateOnly
        guard Set(frames).count == frames.count else { throw fail("a frame is named twice") }
        self.pages = pages.sorted { $0.frame < $1.frame }
        self.allocateOnly = allocateOnly.sorted()
    }

    /// The device state that carries these frames through a native snapshot.
    public var deviceState: DeviceState {
        var b = LEBytes()
        b.u32(UInt32(pages.count + allocateOnly.count))
        b.u32(0)
        for p in pages { b.u64(p.frame | LibxcStream.PageType.normal.rawValue << 60) }
        for f in allocateOnly { b.u64(f | LibxcStream.PageType.allocateOnly.rawValue << 60) }
        for p in pages { b.raw(p.bytes) }
        return DeviceState(componentID: XenDeviceComponent.specialPages, instance: 0, componentVersion: Self.version,
                           blob: ByteSlice(b.bytes))
    }

    /// Writes the frames back as page data: contents as normal pages, the rest as XALLOC. Refuses a frame
    /// inside `layout`'s RAM, where it would overwrite a guest page.
    func write(to writer: XenImageWriter, layout: GuestMemoryLayout) throws {
        if let clash = (pages.map(\.frame) + allocateOnly).first(where: { layout.contains(frame: $0, pageShift: 12) }) {
            throw XenConversionError("Xen special frame 0x\(String(clash, radix: 16)) lies in the guest's RAM \(layout.regions)")
        }
        let contents = pages.flatMap(\.bytes)
        let slot = Dictionary(uniqueKeysWithValues: pages.enumerated().map { ($1.frame, $0 * LibxcStream.pageSize) })
        try contents.withUnsafeBytes { all in
            try writer.writePages(pages.map(\.frame)) { all.baseAddress! + slot[$0]! }
        }
        if !allocateOnly.isEmpty { try writer.writeFrames(allocateOnly, type: .allocateOnly) }
    }
}
