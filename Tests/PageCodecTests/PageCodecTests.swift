import XCTest
import PageCodec

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
func noise(_ count: Int, seed: UInt64) -> [UInt8] {
    var s = seed | 1
    return (0..<count).map { _ in s ^= s << 13; s ^= s >> 7; s ^= s << 17; return UInt8(truncatingIfNeeded: s) }
}

func textPage(_ seed: Int) -> [UInt8] {
    let words = ["migration", "page", "dirty", "guest", "memory", "the", "of", "and", "vcpu", "switchover", "\n"]
    var out: [UInt8] = []
    var i = UInt(seed)
    while out.count < 4096 { out += Array(words[Int(i % UInt(words.count))].utf8) + [32]; i = i &* 31 &+ 7 }
    return Array(out[..<4096])
}

final class ScanAndChecksumTests: XCTestCase {
    func testZeroDetection() {
        var page = [UInt8](repeating: 0, count: 4096)
        page.withUnsafeBytes { XCTAssertTrue(ZeroPage.isZero($0)) }
        for position in [0, 1, 255, 256, 2047, 4000, 4095] {
            page[position] = 1
            page.withUnsafeBytes { XCTAssertFalse(ZeroPage.isZero($0), "byte \(position)") }
            CPUPaths.forcePortable(true)
            page.withUnsafeBytes { XCTAssertFalse(ZeroPage.isZero($0), "portable, byte \(position)") }
            CPUPaths.forcePortable(false)
            page[position] = 0
        }
        // Odd lengths and tails.
        let odd = [UInt8](repeating: 0, count: 300) + [5]
        odd.withUnsafeBytes { XCTAssertFalse(ZeroPage.isZero($0)); XCTAssertTrue(ZeroPage.isZero(UnsafeRawBufferPointer(rebasing: $0[..<300]))) }
        XCTAssertTrue(ZeroPage.isZero(UnsafeRawBufferPointer(start: nil, count: 0)))
    }

    func testCRC32CKnownAnswersAndPathsAgree() {
        XCTAssertEqual(FastCRC32C.checksum(Array("123456789".utf8)), 0xE306_9283)
        XCTAssertEqual(FastCRC32C.checksum([UInt8](repeating: 0, count: 32)), 0x8A91_36AA)
        XCTAssertEqual(FastCRC32C.checksum([UInt8](repeating: 0xFF, count: 32)), 0x62A8_AB43)
        // Lengths around the three-lane thresholds (3 x 1360, 3 x 16 KiB) and odd tails, hardware vs portable.
        for length in [0, 1, 7, 8, 9, 4079, 4080, 4081, 4096, 8160 + 13, 49151, 49152, 49152 + 4080 + 9, 200_003] {
            let data = noise(length, seed: UInt64(length) + 1)
            let fast = FastCRC32C.checksum(data)
            CPUPaths.forcePortable(true)
            let portable = FastCRC32C.checksum(data)
            CPUPaths.force(.withoutCarrylessMultiply)
            let bitwiseShift = FastCRC32C.checksum(data)
            CPUPaths.force(.best)
            XCTAssertEqual(fast, portable, "length \(length)")
            XCTAssertEqual(fast, bitwiseShift, "length \(length), combine without PCLMULQDQ")
            // Continuation in pieces equals one call.
            let split = data.withUnsafeBytes { b -> UInt32 in
                let cut = length / 3
                return FastCRC32C.update(FastCRC32C.update(0, UnsafeRawBufferPointer(rebasing: b[..<cut])),
                                         UnsafeRawBufferPointer(rebasing: b[cut...]))
            }
            XCTAssertEqual(fast, split, "length \(length) split")
        }
    }
}

final class CompressionTests: XCTestCase {
    let codecs: [CompressionCodec] = [.lz4(acceleration: 1), .lz4(acceleration: 8), .zstd(level: -5), .zstd(level: 1), .zstd(level: 9)]

    func testRoundTripsReusingContexts() throws {
        let pages = [textPage(1), textPage(2), noise(4096, seed: 3), [UInt8](repeating: 7, count: 4096),
                     Array(noise(2048, seed: 4) + [UInt8](repeating: 0, count: 2048))]
        for codec in codecs {
            let c = try BlockCompressor(codec)
            for (i, page) in (pages + pages).enumerated() {
                var out = [UInt8](repeating: 0, count: c.bound(4096))
                let n = try XCTUnwrap(out.withUnsafeMutableBytes { o in page.withUnsafeBytes { c.compress($0, into: o) } },
                                      "\(codec) page \(i)")
                var back = [UInt8](repeating: 0, count: 4096)
                try back.withUnsafeMutableBytes { b in try out.withUnsafeBytes { try c.decompress(UnsafeRawBufferPointer(rebasing: $0[..<n]), into: b) } }
                XCTAssertEqual(back, page, "\(codec) page \(i)")
            }
        }
    }

    func testCorruptInputIsAnErrorNotACrash() throws {
        for codec in codecs {
            let c = try BlockCompressor(codec)
            for seed in 0..<50 as Range<UInt64> {
                let junk = noise(Int(seed * 7 + 1), seed: seed + 100)
                var out = [UInt8](repeating: 0, count: 4096)
                XCTAssertThrowsError(try out.withUnsafeMutableBytes { o in try junk.withUnsafeBytes { try c.decompress($0, into: o) } })
            }
        }
    }

    func testPageEncoderChoices() throws {
        let e = try PageEncoder(codec: .lz4(acceleration: 1))
        var scratch = [UInt8](repeating: 0, count: 4096)
        func kind(_ page: [UInt8]) -> EncodedPageKind {
            scratch.withUnsafeMutableBytes { s in page.withUnsafeBytes { e.encode($0, scratch: s).kind } }
        }
        XCTAssertEqual(kind([UInt8](repeating: 0, count: 4096)), .zero)
        XCTAssertEqual(kind(textPage(5)), .compressed(.lz4))
        XCTAssertEqual(kind(noise(4096, seed: 9)), .raw)   // incompressible: raw, never larger
        try e.use(.none)
        XCTAssertEqual(kind(textPage(5)), .raw)
        XCTAssertThrowsError(try BlockCompressor(.zstd(level: 99)))
        XCTAssertThrowsError(try BlockCompressor(.lz4(acceleration: 0)))
    }
}

final class AdaptiveTests: XCTestCase {
    let lz4 = CompressionCodec.lz4(acceleration: 1), zstd = CompressionCodec.zstd(level: 1)

    func selector(link: Double) -> AdaptiveSelector {
        let s = AdaptiveSelector(candidates: [lz4, zstd], linkBytesPerSecond: link)
        // Measured: lz4 3 GB/s at 2:1, zstd 600 MB/s at 3:1.
        s.record(lz4, input: 3_000_000, output: 1_500_000, seconds: 0.001)
        s.record(zstd, input: 600_000, output: 200_000, seconds: 0.001)
        return s
    }

    func testFastLinkIsNeverSlowedDown() {
        // 10 GB/s link: both codecs compress slower than the link sends raw pages.
        XCTAssertEqual(selector(link: 10e9).choose(), .none)
        // 3.2 GB/s: lz4 at 3 GB/s would still be the bottleneck.
        XCTAssertEqual(selector(link: 3.2e9).choose(), .none)
    }

    func testSlowLinksPickTheCodecThatDeliversMost() {
        // 1.25 GB/s (10 GbE): lz4 delivers min(3, 2.5) = 2.5 GB/s; zstd min(0.6, 3.75) = 0.6.
        XCTAssertEqual(selector(link: 1.25e9).choose(), lz4)
        // 125 MB/s (1 GbE): lz4 250 MB/s, zstd min(600, 375) = 375 MB/s.
        XCTAssertEqual(selector(link: 125e6).choose(), zstd)
        // Two compression threads double what the codecs can feed.
        let s = selector(link: 1.25e9); s.threads = 2
        XCTAssertEqual(s.expectedRate(zstd), 1.2e9)
    }

    func testIncompressibleDataGoesRaw() {
        let s = AdaptiveSelector(candidates: [lz4], linkBytesPerSecond: 125e6)
        s.record(lz4, input: 1_000_000, output: 1_004_000, seconds: 0.0005)
        XCTAssertEqual(s.choose(), .none)
        // ...and the estimate follows the data when it becomes compressible.
        for _ in 0..<20 { s.record(lz4, input: 1_000_000, output: 300_000, seconds: 0.0005) }
        XCTAssertEqual(s.choose(), lz4)
    }

    func testProbingSchedule() {
        let s = AdaptiveSelector(candidates: [lz4, zstd], linkBytesPerSecond: 1e9, probeInterval: 4)
        XCTAssertEqual(s.plan(), .init(codec: .none, probe: lz4))    // nothing measured: probe
        s.record(lz4, input: 1000, output: 900, seconds: 1e-6)
        XCTAssertEqual(s.plan().probe, zstd)
        s.record(zstd, input: 1000, output: 800, seconds: 1e-5)
        var probes = 0
        for _ in 0..<16 { if s.plan().probe != nil { probes += 1 } }
        XCTAssertEqual(probes, 4)   // one batch in probeInterval
    }
}

final class DigestTests: XCTestCase {
    func testZeroPageHashIsZeroAndHashDependsOnFrameAndContent() {
        let zero = [UInt8](repeating: 0, count: 4096)
        zero.withUnsafeBytes { XCTAssertEqual(PageHash.of(frame: 77, page: $0), .zero) }
        let a = textPage(1)
        var b = a; b[4095] ^= 1
        var c = a; c.swapAt(0, 64)  // moved data within the page
        let ha = a.withUnsafeBytes { PageHash.of(frame: 1, page: $0) }
        XCTAssertNotEqual(ha, a.withUnsafeBytes { PageHash.of(frame: 2, page: $0) })
        XCTAssertNotEqual(ha, b.withUnsafeBytes { PageHash.of(frame: 1, page: $0) })
        if c != a { XCTAssertNotEqual(ha, c.withUnsafeBytes { PageHash.of(frame: 1, page: $0) }) }
        // AVX2 and portable paths agree.
        CPUPaths.forcePortable(true)
        let portable = a.withUnsafeBytes { PageHash.of(frame: 1, page: $0) }
        CPUPaths.forcePortable(false)
        XCTAssertEqual(ha, portable)
    }

    func testIncrementalDigestEqualsFullRecompute() {
        // Two regions with a hole; pages written in passes with resends, in random order.
        let regions = [DigestTracker.Region(firstFrame: 0, frameCount: 64), .init(firstFrame: 256, frameCount: 32)]
        let frames = (0..<64).map(UInt64.init) + (256..<288).map(UInt64.init)
        var memory: [UInt64: [UInt8]] = [:]
        for f in frames { memory[f] = [UInt8](repeating: 0, count: 4096) }
        let source = DigestTracker(regions: regions), destination = DigestTracker(regions: regions)
        var rng = SystemRandomNumberGenerator()
        for pass in 0..<4 {
            // The guest dirties some pages; the pass sends them (zero pages as zero).
            for f in frames.shuffled(using: &rng).prefix(pass == 0 ? frames.count : 20) {
                let page: [UInt8]
                switch Int.random(in: 0..<4, using: &rng) {
                case 0: page = [UInt8](repeating: 0, count: 4096)
                case 1: page = textPage(Int(f) + pass)
                default: page = noise(4096, seed: f &* 31 &+ UInt64(pass) &+ 1)
                }
                memory[f] = page
                page.withUnsafeBytes { p in
                    if ZeroPage.isZero(p) { source.updateZero(frame: f) } else { source.update(frame: f, page: p) }
                    destination.update(frame: f, page: p)  // the receiver hashes what it writes
                }
            }
        }
        let full = memory.keys.sorted().reduce(into: MemoryDigest()) { d, f in
            memory[f]!.withUnsafeBytes { d.add(PageHash.of(frame: f, page: $0)) }
        }
        XCTAssertEqual(source.digest, full)
        XCTAssertEqual(destination.digest, full)
        let image = frames.flatMap { memory[$0]! }
        let viaHelper = image.withUnsafeBytes { all in
            DigestTracker.fullDigest(regions: regions, pageSize: 4096) { f in
                let i = frames.firstIndex(of: f)!
                return UnsafeRawBufferPointer(rebasing: all[(i * 4096) ..< (i * 4096 + 4096)])
            }
        }
        XCTAssertEqual(viaHelper, full)
        XCTAssertFalse(source.update(frame: 100, hash: .zero))  // in the hole
        // One lost resend is visible.
        noise(4096, seed: 999).withUnsafeBytes { _ = destination.update(frame: 3, page: $0) }
        XCTAssertNotEqual(destination.digest, full)
        XCTAssertEqual(full.bytes.count, 16)
    }

    /// A reset tracker holds nothing, as a new one: its digest is zero and a page sent again counts once.
    func testResetForgetsEveryPage() {
        let tracker = DigestTracker(regions: [DigestTracker.Region(firstFrame: 16, frameCount: 8)])
        let page = noise(4096, seed: 7)
        page.withUnsafeBytes { for frame in UInt64(16) ..< 24 { tracker.update(frame: frame, page: $0) } }
        tracker.reset()
        XCTAssertEqual(tracker.digest, MemoryDigest())
        XCTAssertEqual(tracker.hash(of: 20), .zero)
        let hash = page.withUnsafeBytes { PageHash.of(frame: 20, page: $0) }
        tracker.update(frame: 20, hash: hash)
        var once = MemoryDigest()
        once.add(hash)
        XCTAssertEqual(tracker.digest, once)
    }
}
