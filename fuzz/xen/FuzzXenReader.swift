// libFuzzer target for XenAdapter's image reader. Built by scripts/fuzz-xen.sh from the reader's own
// files (no KVM types) against a MigrationWire module built beside it.
// Each input is parsed as a whole image; on success every page, special page and record is read, so
// AddressSanitizer sees any pointer outside the input; on failure the error must name an offset inside it.
import Foundation
import MigrationWire

private let limits: XenReaderLimits = {
    var l = XenReaderLimits()
    l.maxGuestMemory = 1 << 30  // keep the frame table small; the checks are the same
    l.maxOptionalData = 1 << 20
    return l
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzXenReader(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = UnsafeRawBufferPointer(start: data, count: size)
    do {
        let image = try XenImage(bytes: input, limits: limits)
        var x: UInt8 = 0
        image.forEachDataFrame { frame in
            let page = UnsafeRawBufferPointer(start: image.page(frame: frame)!, count: 4096)
            x ^= page[0] ^ page[4095]
        }
        for (_, page) in image.specialPages { x ^= page.load(fromByteOffset: 4095, as: UInt8.self) }
        for e in image.domainState.hvmContext.entries { x ^= e.data.last ?? 0 }
        _ = image.domainState.hvmContext.encoded()
        fuzzSink ^= x
    } catch let error as XenImageError {
        if error.offset > UInt64(size) { fatalError("error offset \(error.offset) beyond input \(size): \(error)") }
    } catch {
        fatalError("untyped error \(error)")
    }
    return 0
}

nonisolated(unsafe) var fuzzSink: UInt8 = 0

/// With FUZZ_XEN_SEEDS=dir, writes seed images there first: a plain save and a live stream with repeats.
@_cdecl("LLVMFuzzerInitialize")
public func fuzzXenInitialize(_ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>>>) -> CInt {
    guard let directory = ProcessInfo.processInfo.environment["FUZZ_XEN_SEEDS"] else { return 0 }
    var header = [UInt8](repeating: 0, count: 24)
    header.withUnsafeMutableBytes {
        $0.storeBytes(of: HVMContext.headerMagic, toByteOffset: 0, as: UInt32.self)
        $0.storeBytes(of: HVMContext.headerVersion, toByteOffset: 4, as: UInt32.self)
    }
    let context = HVMContext(entries: [HVMSaveEntry(typecode: 1, instance: 0, data: header),
                                       HVMSaveEntry(typecode: 2, instance: 0, data: [UInt8](repeating: 0, count: 1032)),
                                       HVMSaveEntry(typecode: 99, instance: 0, data: [1, 2, 3])])
    let domain = XenDomainState(hvmContext: context, hvmParams: [(36, 8)], cpuidPolicy: [XenCPUIDLeaf(leaf: 0, subleaf: 0xFFFF_FFFF, eax: 0xD, ebx: 0, ecx: 0, edx: 0)],
                                msrPolicy: [XenMSREntry(index: 0xCE, value: 0)], tscInfo: XenTSCInfo(khz: 1000, nanoseconds: 5))
    let page = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
    page.initializeMemory(as: UInt8.self, repeating: 0x5A, count: 4096)
    for (name, passes) in [("plain", 1), ("live", 3)] {
        let fd = open("\(directory)/\(name).xl", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        let writer = try! XenImageWriter(fileDescriptor: fd, configuration: XenDomainConfiguration(name: name, vcpus: 1, memoryBytes: 1 << 20, mmioHoleBytes: 1 << 30),
                                         carriedState: [DeviceState(componentID: 2, instance: 0, componentVersion: 1, blob: ByteSlice([1, 2, 3, 4]))])
        try! writer.writeStaticData(cpuid: domain.cpuidPolicy, msrs: domain.msrPolicy)
        for pass in 0 ..< passes { try! writer.writePages(pass == 0 ? [0, 1, 2] : [1]) { _ in UnsafeRawPointer(page) } }
        try! writer.writeFrames([3, 4], type: .allocateOnly)
        if passes > 1 { try! writer.writeFrames([2], type: .invalid) }
        try! writer.writeDomainState(domain)
        try! writer.writeEmulatorRecord(.emulatorContext, emulatorID: 2, index: 0, data: [7])
        try! writer.finish()
        close(fd)
    }
    page.deallocate()
    return 0
}
