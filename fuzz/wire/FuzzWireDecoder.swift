// libFuzzer target for MigrationWire's StreamDecoder. Built by scripts/fuzz-wire.sh together
// with the module's sources (one module, so no package build is needed):
//   swiftc -sanitize=fuzzer,address -parse-as-library Sources/MigrationWire/*.swift fuzz/wire/*.swift
// Each input is decoded twice: whole, fed, with checksums verified; then in small chunks written
// straight into the decoder's buffer, with checksum verification off, to reach the checks behind a
// valid checksum. Every yielded
// payload byte is read, so AddressSanitizer sees any slice that points outside its buffer.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzWireDecoder(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = UnsafeRawBufferPointer(start: data, count: size)
    decode(input, chunk: size == 0 ? 1 : size, verify: true)
    decode(input, chunk: size % 61 + 1, verify: false)
    return 0
}

private func decode(_ input: UnsafeRawBufferPointer, chunk: Int, verify: Bool) {
    var limits = WireLimits.v1
    limits.maxRecordBody = 1 << 20  // keep the fuzzer's memory small; the checks are the same
    let decoder = StreamDecoder(options: .init(limits: limits, verifyChecksums: verify))
    var position = 0
    var sink: UInt8 = 0
    do {
        while position < input.count {
            let n = min(chunk, input.count - position)
            if verify {
                decoder.feed(UnsafeRawBufferPointer(rebasing: input[position ..< position + n]))
            } else {
                // The zero-copy path: bytes written straight into the decoder's buffer.
                decoder.receive(maximum: n) { buffer in
                    buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: input[position ..< position + n]))
                    return n
                }
            }
            position += n
            while let event = try decoder.next() { sink ^= touch(event) }
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
