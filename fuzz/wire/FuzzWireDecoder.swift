// libFuzzer target for MigrationWire's StreamDecoder. Built by scripts/fuzz-wire.sh together
// with the module's sources (one module, so no package build is needed):
//   swiftc -sanitize=fuzzer,address -parse-as-library Sources/MigrationWire/*.swift fuzz/wire/*.swift
// Each input is decoded three times: whole, fed, with checksums verified; then in small chunks written
// straight into the decoder's buffer, with checksum verification off, to reach the checks behind a
// valid checksum; then the same way in place (as a receiver on huge pages), held to an agreement with
// descriptor checksums and unchanged pages, every page payload received into a scratch page. Every yielded payload byte is
// read, so AddressSanitizer sees any slice that points outside its buffer, and any payload written past
// its page.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzWireDecoder(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = UnsafeRawBufferPointer(start: data, count: size)
    decode(input, chunk: size == 0 ? 1 : size, verify: true)
    decode(input, chunk: size % 61 + 1, verify: false)
    decode(input, chunk: size % 37 + 1, verify: false, inPlace: true)
    return 0
}

/// Where payloads received in place go: one page of the largest size, for every frame.
nonisolated(unsafe) let scratchPage = UnsafeMutableRawPointer.allocate(byteCount: 65536, alignment: 4096)

private func decode(_ input: UnsafeRawBufferPointer, chunk: Int, verify: Bool, inPlace: Bool = false) {
    var limits = WireLimits.v1
    limits.maxRecordBody = 1 << 20  // keep the fuzzer's memory small; the checks are the same
    let decoder = StreamDecoder(options: .init(limits: limits, verifyChecksums: verify, payloadsInPlace: inPlace))
    if inPlace {
        decoder.hold(to: Capabilities(codecs: .all, maxChannels: 64, flags: [.wholeBatchCompression, .descriptorChecksum, .unchangedPages]))
    }
    var position = 0
    var sink: UInt8 = 0
    // Bytes from the input, at most `chunk` at a time.
    func read(_ buffer: UnsafeMutableRawBufferPointer) -> Int {
        let n = min(chunk, buffer.count, input.count - position)
        buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: input[position ..< position + n]))
        position += n
        return n
    }
    do {
        while position < input.count {
            if verify {
                let n = min(chunk, input.count - position)
                decoder.feed(UnsafeRawBufferPointer(rebasing: input[position ..< position + n]))
                position += n
            } else {
                // The zero-copy path: bytes written straight into the decoder's buffer.
                decoder.receive(maximum: chunk, read)
            }
            while let event = try decoder.next() {
                if case .pageBatchAwaitingPayload(let b) = event {
                    try decoder.receivePayload(into: { page in
                        if page.length > 65536 { fatalError("page of \(page.length) bytes asked for in place") }
                        return scratchPage
                    }, read)
                    sink ^= UInt8(truncatingIfNeeded: b.pages.count)
                } else {
                    sink ^= touch(event)
                }
            }
        }
        try decoder.finish()
    } catch let error as WireError {
        if error.offset > UInt64(input.count) { fatalError("error offset \(error.offset) beyond input \(input.count)") }
    } catch {
        fatalError("untyped error \(error)")
    }
    fuzzSink ^= sink  // keep the reads
}

nonisolated(unsafe) var fuzzSink: UInt8 = 0

private func touch(_ event: StreamEvent) -> UInt8 {
    var x: UInt8 = 0
    switch event {
    case .pageBatch(let b):
        let total = b.pages.reduce(0) { $0 + $1.length }
        if total != b.uncompressedPayloadLength { fatalError("descriptor lengths disagree with payload length") }
        b.payload.withUnsafeBytes { for byte in $0 { x ^= byte } }
        if b.compression == .none {
            for i in b.pages.indices { b.withPageBytes(i) { p in if let last = p.last { x ^= last } } }
        }
    case .deviceState(let d):
        d.blob.withUnsafeBytes { for byte in $0 { x ^= byte } }
    case .layout(let l):
        if l.regions.count > WireLimits.v1.maxRegions { fatalError("too many regions accepted") }
    default:
        break
    }
    return x
}
