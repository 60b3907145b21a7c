// Codec benchmark: single-core throughput and ratio of PageCodec and MigrationWire on four
// kinds of guest memory image. Run in release mode (see bench/README.md):
//   swift run -c release --scratch-path .build-wire codec-bench [MiB per image, default 32] [repetitions, default 5]
// Every figure is the median of the repetitions. GB/s means 10^9 bytes of guest memory per second.

import Foundation
import MigrationWire
import PageCodec

let pageSize = 4096
let args = CommandLine.arguments
let imageMiB = args.count > 1 ? Int(args[1]) ?? 32 : 32
let repetitions = args.count > 2 ? Int(args[2]) ?? 5 : 5
let imageBytes = imageMiB << 20
let pageCount = imageBytes / pageSize

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
}

/// Median seconds of `repetitions` runs of `body`.
func time(_ body: () -> Void) -> Double {
    var samples: [Double] = []
    for _ in 0..<repetitions {
        let t0 = now()
        body()
        samples.append(now() - t0)
    }
    samples.sort()
    return samples[samples.count / 2]
}

func gbps(_ bytes: Int, _ seconds: Double) -> String { String(format: "%6.2f", Double(bytes) / seconds / 1e9) }

// MARK: images

/// Fills `count` bytes from files found under `roots` whose names pass `accept`, in path order.
func collect(_ roots: [String], count: Int, accept: (String) -> Bool) -> [UInt8] {
    var out: [UInt8] = []
    out.reserveCapacity(count)
    for root in roots {
        guard let e = FileManager.default.enumerator(atPath: root) else { continue }
        var paths: [String] = []
        while let p = e.nextObject() as? String { if accept(p) { paths.append(root + "/" + p) } }
        for p in paths.sorted() {
            guard let attributes = try? FileManager.default.attributesOfItem(atPath: p),
                  attributes[.type] as? FileAttributeType == .typeRegular,
                  let d = FileManager.default.contents(atPath: p) else { continue }
            out += d.prefix(count - out.count)
            if out.count >= count { return out }
        }
    }
    while out.count < count { out += out.prefix(count - out.count) }  // not enough files: repeat
    return out
}

func xorshiftBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    var s = seed
    out.withUnsafeMutableBytes { b in
        let words = b.bindMemory(to: UInt64.self)
        for i in words.indices { s ^= s << 13; s ^= s >> 7; s ^= s << 17; words[i] = s }
    }
    return out
}

let isELF: (String) -> Bool = { path in
    guard let h = FileHandle(forReadingAtPath: path) else { return false }
    defer { try? h.close() }
    return (try? h.read(upToCount: 4)) == Data([0x7F, 0x45, 0x4C, 0x46])
}

print("building \(imageMiB) MiB images...")
let text = collect(["/usr/include", "/usr/share/common-licenses", "/usr/share/perl5"], count: imageBytes) {
    $0.hasSuffix(".h") || $0.hasSuffix(".pm") || !$0.contains(".")
}
let binaries = collect(["/usr/bin", "/usr/lib/x86_64-linux-gnu"], count: imageBytes) { p in
    !p.hasSuffix(".a") && isELF(p.hasPrefix("/") ? p : (FileManager.default.fileExists(atPath: "/usr/bin/" + p) ? "/usr/bin/" + p : "/usr/lib/x86_64-linux-gnu/" + p))
}
let random = xorshiftBytes(imageBytes, seed: 0x9E37_79B9_7F4A_7C15)
/// Idle guest: 90% zero pages; the rest are pages of kernel text and binaries, and a few
/// pages that are mostly zero with a little data (page tables, sparse structures).
var mostlyZero = [UInt8](repeating: 0, count: imageBytes)
do {
    var s: UInt64 = 12345
    for page in 0..<pageCount {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17
        let o = page * pageSize
        switch s % 100 {
        case 0..<4: mostlyZero.replaceSubrange(o ..< o + pageSize, with: binaries[o ..< o + pageSize])
        case 4..<7: mostlyZero.replaceSubrange(o ..< o + pageSize, with: text[o ..< o + pageSize])
        case 7..<10: mostlyZero.replaceSubrange(o ..< o + 128, with: random[o ..< o + 128])
        default: break
        }
    }
}
let images: [(String, [UInt8])] = [("mostly-zero", mostlyZero), ("text", text), ("binaries", binaries), ("random", random)]

// MARK: physical limits and scans

var sink: UInt64 = 0
print("\nCPU paths: \(CPUPaths.description); image \(imageMiB) MiB; median of \(repetitions)\n")
print("== single-core scans (\(imageMiB) MiB buffer) ==")
let zeros = [UInt8](repeating: 0, count: imageBytes)
var copyTarget = [UInt8](repeating: 1, count: imageBytes)
zeros.withUnsafeBytes { z in
    copyTarget.withUnsafeMutableBytes { t in
        let s = time { memcpy(t.baseAddress!, z.baseAddress!, imageBytes) }
        print("memcpy (limit reference)          \(gbps(imageBytes, s)) GB/s")
    }
    let sumSeconds = time {
        var acc: UInt64 = 0
        let w = z.bindMemory(to: UInt64.self)
        for i in stride(from: 0, to: w.count, by: 8) { acc &+= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7] }
        sink &+= acc
    }
    print("plain 64-bit read loop (Swift)    \(gbps(imageBytes, sumSeconds)) GB/s")
    let zs = time {
        var n = 0
        for p in 0..<pageCount where ZeroPage.isZero(UnsafeRawBufferPointer(rebasing: z[(p * pageSize) ..< (p * pageSize + pageSize)])) { n += 1 }
        sink &+= UInt64(n)
    }
    print("zero detection, all-zero pages    \(gbps(imageBytes, zs)) GB/s")
}
for (name, image) in images {
    image.withUnsafeBytes { b in
        var zeroPages = 0
        let s = time {
            zeroPages = 0
            for p in 0..<pageCount where ZeroPage.isZero(UnsafeRawBufferPointer(rebasing: b[(p * pageSize) ..< (p * pageSize + pageSize)])) { zeroPages += 1 }
        }
        print("zero detection, \(name.padding(toLength: 12, withPad: " ", startingAt: 0))      \(gbps(imageBytes, s)) GB/s  (\(zeroPages * 100 / pageCount)% zero pages)")
    }
}
random.withUnsafeBytes { b in
    let chunk = 4 << 20
    let hw = time { var c: UInt32 = 0; for o in stride(from: 0, to: imageBytes, by: chunk) { c = FastCRC32C.update(c, UnsafeRawBufferPointer(rebasing: b[o ..< o + chunk])) }; sink &+= UInt64(c) }
    print("CRC32C, SSE4.2 three lanes        \(gbps(imageBytes, hw)) GB/s")
    let page = time { var c: UInt32 = 0; for p in 0..<pageCount { c ^= FastCRC32C.update(0, UnsafeRawBufferPointer(rebasing: b[(p * pageSize) ..< (p * pageSize + pageSize)])) }; sink &+= UInt64(c) }
    print("CRC32C, SSE4.2, per 4 KiB page    \(gbps(imageBytes, page)) GB/s")
    let sw = time { var c: UInt32 = 0; for o in stride(from: 0, to: imageBytes, by: chunk) { c = CRC32C.update(c, UnsafeRawBufferPointer(rebasing: b[o ..< o + chunk])) }; sink &+= UInt64(c) }
    print("CRC32C, portable Swift (Wire)     \(gbps(imageBytes, sw)) GB/s")
    let digest = time {
        var d = MemoryDigest()
        for p in 0..<pageCount { d.add(PageHash.of(frame: UInt64(p), page: UnsafeRawBufferPointer(rebasing: b[(p * pageSize) ..< (p * pageSize + pageSize)]))) }
        sink &+= d.low
    }
    print("memory digest (page hash + sum)   \(gbps(imageBytes, digest)) GB/s  (random pages: full hash of every page)")
    let tracker = DigestTracker(regions: [.init(firstFrame: 0, frameCount: pageCount)])
    let tracked = time {
        for p in 0..<pageCount { tracker.update(frame: UInt64(p), page: UnsafeRawBufferPointer(rebasing: b[(p * pageSize) ..< (p * pageSize + pageSize)])) }
    }
    print("digest tracker update (resends)   \(gbps(imageBytes, tracked)) GB/s")
}

// MARK: codecs

let perPage: [CompressionCodec] = [.lz4(acceleration: 1), .lz4(acceleration: 4), .lz4(acceleration: 16), .lz4(acceleration: 64),
                                   .zstd(level: -10), .zstd(level: -5), .zstd(level: -1), .zstd(level: 1), .zstd(level: 3), .zstd(level: 9)]
let batchCodecs: [CompressionCodec] = [.lz4(acceleration: 1), .zstd(level: -5), .zstd(level: -1), .zstd(level: 1), .zstd(level: 3)]

print("\n== per-page encoding: zero check, then compress each 4 KiB page, raw if not smaller ==")
print("GB/s = guest bytes per second, one core; ratio = guest bytes / encoded bytes; decode = decompress GB/s")
print("codec        " + images.map { $0.0.padding(toLength: 26, withPad: " ", startingAt: 0) }.joined())
var scratch = [UInt8](repeating: 0, count: imageBytes + imageBytes / 8)
for codec in [CompressionCodec.none] + perPage {
    var line = codec.description.padding(toLength: 13, withPad: " ", startingAt: 0)
    let encoder = try! PageEncoder(codec: codec)
    for (_, image) in images {
        var encodedBytes = 0
        var kinds: [(EncodedPageKind, Int, Int)] = []  // kind, offset in scratch, length
        let s = image.withUnsafeBytes { b in scratch.withUnsafeMutableBytes { out in
            time {
                encodedBytes = 0
                kinds.removeAll(keepingCapacity: true)
                for p in 0..<pageCount {
                    let page = UnsafeRawBufferPointer(rebasing: b[(p * pageSize) ..< (p * pageSize + pageSize)])
                    let r = encoder.encode(page, scratch: UnsafeMutableRawBufferPointer(rebasing: out[encodedBytes ..< encodedBytes + pageSize]))
                    kinds.append((r.kind, encodedBytes, r.length))
                    if case .compressed = r.kind { encodedBytes += r.length } else if r.kind == .raw { encodedBytes += pageSize }
                }
            }
        } }
        // Decompression (the receiver's side), also verifying the round trip.
        var decodeSeconds = 0.0
        if codec != .none {
            let decompressor = try! BlockCompressor(codec)
            var page = [UInt8](repeating: 0, count: pageSize)
            decodeSeconds = scratch.withUnsafeBytes { enc in page.withUnsafeMutableBytes { dst in
                time {
                    for (kind, offset, length) in kinds {
                        if case .compressed = kind { try! decompressor.decompress(UnsafeRawBufferPointer(rebasing: enc[offset ..< offset + length]), into: dst) }
                    }
                }
            } }
        }
        let ratio = Double(imageBytes) / Double(max(encodedBytes, 1))
        let cell = "\(gbps(imageBytes, s)) \(String(format: ratio >= 100 ? "%6.0fx" : "%6.2fx", ratio))" + (codec == .none || !kinds.contains { if case .compressed = $0.0 { true } else { false } } ? "" : " d\(gbps(imageBytes, decodeSeconds))")
        line += cell.padding(toLength: 26, withPad: " ", startingAt: 0)
    }
    print(line)
}

print("\n== whole-batch compression: 64 pages (256 KiB) per batch, non-zero pages only ==")
print("codec        " + images.map { $0.0.padding(toLength: 26, withPad: " ", startingAt: 0) }.joined())
for codec in batchCodecs {
    var line = codec.description.padding(toLength: 13, withPad: " ", startingAt: 0)
    let c = try! BlockCompressor(codec)
    for (_, image) in images {
        var out = [UInt8](repeating: 0, count: c.bound(64 * pageSize))
        var batch = [UInt8](repeating: 0, count: 64 * pageSize)
        var encodedBytes = 0
        let s = image.withUnsafeBytes { b in batch.withUnsafeMutableBytes { batchBuffer in out.withUnsafeMutableBytes { o in
            time {
                encodedBytes = 0
                var filled = 0
                for p in 0..<pageCount {
                    let page = UnsafeRawBufferPointer(rebasing: b[(p * pageSize) ..< (p * pageSize + pageSize)])
                    if ZeroPage.isZero(page) { continue }
                    (batchBuffer.baseAddress! + filled).copyMemory(from: page.baseAddress!, byteCount: pageSize)
                    filled += pageSize
                    if filled == batchBuffer.count || p == pageCount - 1 {
                        let n = c.compress(UnsafeRawBufferPointer(rebasing: batchBuffer[..<filled]), into: o) ?? filled
                        encodedBytes += min(n, filled)
                        filled = 0
                    }
                }
                if filled > 0 { encodedBytes += c.compress(UnsafeRawBufferPointer(rebasing: batchBuffer[..<filled]), into: o) ?? filled }
            }
        } } }
        let ratio = Double(imageBytes) / Double(max(encodedBytes, 1))
        line += "\(gbps(imageBytes, s)) \(String(format: ratio >= 100 ? "%6.0fx" : "%6.2fx", ratio))".padding(toLength: 26, withPad: " ", startingAt: 0)
    }
    print(line)
}

// MARK: framing

print("\n== framing: native stream, 256 pages per batch, per-page lz4 (raw when not smaller) ==")
print("image         payload MiB  wire MiB  overhead  encode raw pages GB/s: copy+CRC, writev prefix+CRC  decode+CRC GB/s: wire bytes, guest bytes")
for (name, image) in images {
    let encoder = try! PageEncoder(codec: .lz4(acceleration: 1))
    var wire: [UInt8] = []
    var payload = 0
    image.withUnsafeBytes { b in
        var compressed = [UInt8](repeating: 0, count: 256 * pageSize)
        var streamEncoder = StreamEncoder(header: StreamHeader(features: .snapshotFile), checksum: FastCRC32C.function)
        streamEncoder.encodeHeader(into: &wire)
        streamEncoder.encodeLayout(GuestMemoryLayout(regions: [MemoryRegion(guestPhysicalAddress: 0, size: UInt64(imageBytes))]), into: &wire)
        compressed.withUnsafeMutableBytes { scratchBytes in
            var sources: [PageSource] = []
            var used = 0
            for p in 0..<pageCount {
                let page = UnsafeRawBufferPointer(rebasing: b[(p * pageSize) ..< (p * pageSize + pageSize)])
                let r = encoder.encode(page, scratch: UnsafeMutableRawBufferPointer(rebasing: scratchBytes[used...]))
                switch r.kind {
                case .zero: sources.append(.zero(frame: UInt64(p)))
                case .raw: sources.append(PageSource(frame: UInt64(p), encoding: .raw, bytes: page)); payload += pageSize
                case .compressed:
                    sources.append(PageSource(frame: UInt64(p), encoding: .lz4, bytes: UnsafeRawBufferPointer(rebasing: scratchBytes[used ..< used + r.length])))
                    used += r.length; payload += r.length
                }
                if sources.count == 256 || p == pageCount - 1 {
                    streamEncoder.encodePageBatch(pass: 0, pages: sources, into: &wire)
                    sources.removeAll(keepingCapacity: true); used = 0
                }
            }
        }
        streamEncoder.encodeEnd(End(digestAlgorithm: 0, digest: []), into: &wire)
    }
    /// Times `encode` over every 256-page batch of this image's pages, described as raw page sources.
    func timeBatches(outputLength: Int, _ encode: (inout StreamEncoder, [PageSource], UnsafeMutableRawBufferPointer) -> Void) -> Double {
        image.withUnsafeBytes { b -> Double in
            var out = [UInt8](repeating: 0, count: outputLength)
            var enc = StreamEncoder(header: StreamHeader(), checksum: FastCRC32C.function)
            return out.withUnsafeMutableBytes { o in
                var sources = [PageSource]()
                sources.reserveCapacity(256)
                return time {
                    for first in stride(from: 0, to: pageCount, by: 256) {
                        sources.removeAll(keepingCapacity: true)
                        for p in first ..< min(first + 256, pageCount) {
                            sources.append(PageSource(frame: UInt64(p), encoding: .raw, bytes: UnsafeRawBufferPointer(rebasing: b[(p * pageSize) ..< (p * pageSize + pageSize)])))
                        }
                        encode(&enc, sources, o)
                    }
                }
            }
        }
    }
    // Encode speed of the framing alone (prefix + copy + CRC), on raw pages of this image.
    let rawSeconds = timeBatches(outputLength: StreamEncoder.batchLength(pageCount: 256, payloadLength: 256 * pageSize)) {
        $0.encodePageBatch(pass: 0, pages: $1, into: $2)
    }
    // The writev path: only the prefix is written; page bytes stay where they are (CRC reads them).
    let prefixSeconds = timeBatches(outputLength: StreamEncoder.batchPrefixLength(pageCount: 256)) {
        $0.encodePageBatchPrefix(pass: 0, pages: $1, into: $2)
    }
    let decodeSeconds = time {
        let d = StreamDecoder(checksum: FastCRC32C.function)
        wire.withUnsafeBytes { w in
            for o in stride(from: 0, to: w.count, by: 1 << 20) {
                d.feed(UnsafeRawBufferPointer(rebasing: w[o ..< min(o + (1 << 20), w.count)]))
                while let e = try! d.next() { if case .pageBatch(let batch) = e { sink &+= UInt64(batch.pages.count) } }
            }
        }
        try! d.finish()
    }
    let overhead = Double(wire.count - payload) / Double(max(payload, 1)) * 100
    print("\(name.padding(toLength: 14, withPad: " ", startingAt: 0))\(String(format: "%11.2f  %8.2f  %7.2f%%", Double(payload) / 1048576, Double(wire.count) / 1048576, overhead))  \(gbps(imageBytes, rawSeconds)), \(gbps(imageBytes, prefixSeconds))                   \(gbps(wire.count, decodeSeconds)), \(gbps(imageBytes, decodeSeconds))")
}
print("\nframing per page: 16-byte descriptor; per batch: 8-byte record header + 32-byte batch header + <8 padding")
print("raw 4 KiB pages: \(String(format: "%.3f", (16.0 + 40.0 / 256) / 4096 * 100))% of payload at 256 pages per batch")
if sink == 42 { print("") }
