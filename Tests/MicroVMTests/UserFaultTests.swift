import Foundation
import Glibc
import LinuxSystem
import Threads
import XCTest

/// userfaultfd on a memfd mapped MAP_SHARED, as lazy restore uses it: pages appear when first touched, from the
/// resolver or from fills ahead of the faults. Needs no KVM; skipped where userfaultfd cannot be opened.
final class UserFaultTests: XCTestCase {
    let pages = 64
    let page = UserFaultRegion.pageSize
    var file: OwnedFileDescriptor!
    var memory: MemoryMapping!
    var region: UserFaultRegion!
    var source: PatternSource!

    override func setUpWithError() throws {
        file = try makeMemoryFile(name: "uffd-test", size: Int64(pages * page))
        memory = try MemoryMapping(file: file, size: pages * page, flags: MAP_SHARED | MAP_NORESERVE)
        do {
            region = try UserFaultRegion(base: memory.base, length: memory.size)
        } catch let error as SystemError where error.operation == "open userfaultfd" {
            throw XCTSkip("neither /dev/userfaultfd nor the userfaultfd system call may be used: \(error)")
        }
        source = PatternSource(pages: pages)
    }

    override func tearDown() {
        // Before unmapping: close() also releases any reader a failed test left waiting for a page.
        region?.close()
        region = nil
        memory = nil
        file = nil
    }

    // (a)
    func testEachTouchedPageIsFaultedOnceAndFilledByTheResolver() throws {
        let recorder = servePattern()
        XCTAssertTrue(waitUntil { handlerThreads() > 0 }, "no thread named uffd-handler")
        XCTAssertEqual(touch(Array(0 ..< pages)), (0 ..< pages).map(PatternSource.byte))
        XCTAssertEqual(region.faultsServed, pages)
        settle(recorder)
        XCTAssertEqual(recorder.filled.sorted(), Array(0 ..< pages))
        XCTAssertEqual(recorder.errors, [])

        // Present now, so touching again faults no more; and present in the memfd itself, as KVM would see it.
        XCTAssertEqual(touch([0, 17, 63]), [1, 18, 64])
        XCTAssertEqual(region.faultsServed, pages)
        var byte: UInt8 = 0
        try withUnsafeMutableBytes(of: &byte) { try file.read(all: $0, at: Int64(17 * page + 100)) }
        XCTAssertEqual(byte, PatternSource.byte(17))
    }

    // (b)
    func testPagesFilledAheadAreNotFaultedAndAreNotFilledTwice() throws {
        let recorder = servePattern()
        XCTAssertTrue(try region.fill(offset: 0, from: source.page(0), length: 32 * page))
        XCTAssertFalse(try region.fill(offset: 5 * page, from: source.page(5), length: page), "page 5 is present already")
        // 30 and 31 are present, 32 and 33 are not: fill skips the first two and still fills the others.
        XCTAssertFalse(try region.fill(offset: 30 * page, from: source.page(30), length: 4 * page))
        // Only 42 is present: the kernel copies 40 and 41, stops there (a partial copy), and fill goes on after it.
        XCTAssertTrue(try region.fill(offset: 42 * page, from: source.page(42), length: page))
        XCTAssertFalse(try region.fill(offset: 40 * page, from: source.page(40), length: 4 * page))

        XCTAssertEqual(touch(Array(0 ..< pages)), (0 ..< pages).map(PatternSource.byte))
        XCTAssertEqual(region.faultsServed, pages - 34 - 4)
        settle(recorder)
        XCTAssertEqual(recorder.filled.sorted(), Array(34 ..< 40) + Array(44 ..< pages))
        XCTAssertEqual(recorder.errors, [])
    }

    /// The prefetch fills from the last page down while a reader faults from the first page up: whoever is
    /// second to a page sees fill return false, and every page is filled exactly once, with the right bytes.
    func testPrefetchRacingTheHandlerFillsEveryPageOnce() throws {
        let recorder = servePattern()
        let prefetched = Box(0)
        let region = self.region!, source = self.source!, page = self.page, pages = self.pages
        let prefetchDone = DispatchSemaphore(value: 0)
        Thread {
            for index in (0 ..< pages).reversed() where (try? region.fill(offset: index * page, from: source.page(index), length: page)) == true {
                prefetched.value += 1
            }
            prefetchDone.signal()
        }.start()
        XCTAssertEqual(touch(Array(0 ..< pages)), (0 ..< pages).map(PatternSource.byte))
        settle(recorder)
        XCTAssertEqual(prefetchDone.wait(timeout: .now() + 10), .success)

        XCTAssertEqual(prefetched.value + recorder.filled.count, pages, "each page filled exactly once")
        XCTAssertEqual(region.faultsServed, recorder.calls, "every fault reached the resolver")
        XCTAssertEqual(recorder.errors, [])
    }

    // (c)
    func testZeroFill() throws {
        let recorder = servePattern(zeroFor: { $0 % 2 == 1 })
        XCTAssertTrue(try region.fillZero(offset: 0, length: 4 * page))
        XCTAssertFalse(try region.fillZero(offset: page, length: page))
        XCTAssertFalse(try region.fill(offset: 2 * page, from: source.page(2), length: page), "a zero page is present too")

        let expected = (0 ..< pages).map { $0 < 4 || $0 % 2 == 1 ? 0 : PatternSource.byte($0) }
        XCTAssertEqual(touch(Array(0 ..< pages)), expected)
        XCTAssertEqual(region.faultsServed, pages - 4)
        settle(recorder)
        XCTAssertEqual(recorder.filled.sorted(), Array(4 ..< pages))
        XCTAssertEqual(recorder.errors, [])
    }

    // (d)
    /// A resolver that fills nothing leaves the faulting thread waiting, without the handler spinning;
    /// close() releases it, and from then on an unfilled page is an ordinary hole that reads as zeros.
    func testAfterCloseUnfilledPagesReadAsZerosWithoutAHandler() throws {
        let recorder = Recorder()
        region.serve { offset, _ in recorder.recordCall(offset / UserFaultRegion.pageSize) }
        XCTAssertTrue(try region.fill(offset: page, from: source.page(1), length: page))

        let reader = touchInBackground([3])
        XCTAssertTrue(waitUntil { recorder.calls == 1 }, "the fault never reached the resolver")
        XCTAssertNil(reader.result(within: 0.3), "the reader should still wait for page 3")
        XCTAssertEqual(region.faultsServed, 1)

        let handlers = handlerThreads()
        region.close()
        XCTAssertEqual(reader.result(within: 10), [0])
        XCTAssertEqual(handlerThreads(), handlers - 1, "close() returned before the handler thread ended")
        region.close()
        XCTAssertEqual(touch([1, 3, 7]), [PatternSource.byte(1), 0, 0])
        XCTAssertEqual(region.faultsServed, 1)
        XCTAssertEqual(recorder.calls, 1)
        XCTAssertThrowsError(try region.fill(offset: 8 * page, from: source.page(8), length: page)) { error in
            XCTAssertEqual((error as? SystemError)?.errno, ENOENT, "\(error)")
        }
    }

    /// Lazy restore gives up from inside the resolver when a page cannot be read: close() there must not deadlock.
    func testCloseFromTheResolverReleasesTheFaultingThread() throws {
        let region = self.region!
        region.serve { _, _ in region.close() }
        XCTAssertEqual(touch([9]), [0])
        XCTAssertEqual(touch([10]), [0])
        XCTAssertEqual(region.faultsServed, 1)
    }

    // (e)
    func testBadRangesAreRefusedWithAnError() throws {
        func assertInvalid<T>(_ expression: @autoclosure () throws -> T, line: UInt = #line) {
            XCTAssertThrowsError(try expression(), line: line) { error in
                XCTAssertEqual((error as? SystemError)?.errno, EINVAL, "\(error)", line: line)
                XCTAssertTrue("\(error)".contains("multiples of \(page)"), "\(error)", line: line)
            }
        }
        assertInvalid(try UserFaultRegion(base: memory.base + 1, length: page))
        assertInvalid(try UserFaultRegion(base: memory.base, length: page - 1))
        assertInvalid(try UserFaultRegion(base: memory.base, length: 0))
        assertInvalid(try region.fill(offset: 1, from: source.page(0), length: page))
        assertInvalid(try region.fill(offset: 0, from: source.page(0), length: 100))
        assertInvalid(try region.fill(offset: (pages - 1) * page, from: source.page(0), length: 2 * page))
        assertInvalid(try region.fillZero(offset: -page, length: page))
        // The kernel's own refusal comes the same way: a range can belong to one userfaultfd only.
        XCTAssertThrowsError(try UserFaultRegion(base: memory.base, length: page)) { error in
            XCTAssertEqual((error as? SystemError)?.errno, EBUSY, "\(error)")
        }
        XCTAssertTrue(try region.fill(offset: 0, from: source.page(0), length: page), "the region still works")
    }

    // MARK: helpers

    /// Serves each fault from `source`, or with zeros for the pages `zeroFor` selects, recording what happened.
    func servePattern(zeroFor zero: @escaping @Sendable (Int) -> Bool = { _ in false }) -> Recorder {
        let region = self.region!, source = self.source!, page = self.page, recorder = Recorder()
        region.serve { offset, _ in
            let index = offset / page
            recorder.recordCall(index)
            do {
                let filled = zero(index) ? try region.fillZero(offset: offset, length: page)
                    : try region.fill(offset: offset, from: source.page(index), length: page)
                if filled { recorder.recordFill(index) }
            } catch {
                recorder.recordFailure("page \(index): \(error)")
            }
            recorder.recordReturn()
        }
        return recorder
    }

    /// Reads the given pages from a thread of its own and gives each page's byte, or nil for a page whose bytes are
    /// not all the same; nil altogether if the reader is still waiting after 10 s (the test thread must not hang).
    func touch(_ indices: [Int]) -> [UInt8?]? { touchInBackground(indices).result(within: 10) }

    func touchInBackground(_ indices: [Int]) -> Reader {
        let reader = Reader(), base = UInt(bitPattern: memory.base), page = self.page
        Thread {
            reader.finish(indices.map { index in
                let bytes = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: base + UInt(index * page)), count: page)
                let first = bytes[0]
                return bytes.allSatisfy { $0 == first } ? first : nil
            })
        }.start()
        return reader
    }

    /// Waits for the resolver to return from every fault counted so far, before its records are checked.
    func settle(_ recorder: Recorder, line: UInt = #line) {
        XCTAssertTrue(waitUntil { recorder.returned == region.faultsServed }, "the resolver never returned", line: line)
    }

    /// Threads of this process named uffd-handler.
    func handlerThreads() -> Int {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
        return tasks.filter { (try? String(contentsOfFile: "/proc/self/task/\($0)/comm", encoding: .utf8)) == "uffd-handler\n" }.count
    }

    func waitUntil(_ condition: () -> Bool) -> Bool {
        for _ in 0 ..< 1000 where !condition() { usleep(10_000) }
        return condition()
    }
}

extension UserFaultTests {
    /// Page k of the memory-to-be holds the byte k+1 (not k, so that no page looks like an unfilled, zero one).
    final class PatternSource: @unchecked Sendable {
        private let buffer: UnsafeMutableRawBufferPointer

        static func byte(_ page: Int) -> UInt8 { UInt8(truncatingIfNeeded: page + 1) }

        init(pages: Int) {
            let size = UserFaultRegion.pageSize
            buffer = .allocate(byteCount: pages * size, alignment: size)
            for page in 0 ..< pages { memset(buffer.baseAddress! + page * size, Int32(Self.byte(page)), size) }
        }

        func page(_ index: Int) -> UnsafeRawPointer { UnsafeRawPointer(buffer.baseAddress! + index * UserFaultRegion.pageSize) }

        deinit { buffer.deallocate() }
    }

    /// What the resolver was asked and did, from the handler thread.
    final class Recorder: @unchecked Sendable {
        private let lock = NSLock()
        private var calledPages: [Int] = []
        private var filledPages: [Int] = []
        private var failures: [String] = []
        private var returns = 0

        func recordCall(_ page: Int) { lock.withLock { calledPages.append(page) } }
        func recordFill(_ page: Int) { lock.withLock { filledPages.append(page) } }
        func recordFailure(_ message: String) { lock.withLock { failures.append(message) } }
        func recordReturn() { lock.withLock { returns += 1 } }
        /// Resolver calls that have returned: a faulting thread goes on as soon as its page is filled, before that.
        var returned: Int { lock.withLock { returns } }
        var calls: Int { lock.withLock { calledPages.count } }
        var filled: [Int] { lock.withLock { filledPages } }
        var errors: [String] { lock.withLock { failures } }
    }

    /// The outcome of a read on another thread.
    final class Reader: @unchecked Sendable {
        private let done = DispatchSemaphore(value: 0)
        private var bytes: [UInt8?] = []

        func finish(_ bytes: [UInt8?]) {
            self.bytes = bytes
            done.signal()
        }

        func result(within seconds: Double) -> [UInt8?]? {
            guard done.wait(timeout: .now() + seconds) == .success else { return nil }
            done.signal() // so that a later call sees it too
            return bytes
        }
    }

    final class Box<Value>: @unchecked Sendable {
        var value: Value
        init(_ value: Value) { self.value = value }
    }
}

/// Minor faults, as post-copy uses them: the memfd holds pages the mapping has not mapped; each first touch faults
/// until `continueMapping` maps the file's page, which may have been replaced through the file meanwhile.
final class MinorFaultTests: XCTestCase {
    func testAPageTheFileHoldsFaultsUntilMappedAndShowsWhatTheFileHoldsThen() throws {
        let pages = 16, page = UserFaultRegion.pageSize
        let file = try makeMemoryFile(name: "uffd-minor-test", size: Int64(pages * page))
        let memory = try MemoryMapping(file: file, size: pages * page, flags: MAP_SHARED | MAP_NORESERVE)
        // Pages 0 ..< 8 are in the file (written through it, as the receiver writes), 8 ..< 16 are holes.
        for index in 0 ..< 8 {
            let bytes = [UInt8](repeating: UInt8(index + 1), count: page)
            try bytes.withUnsafeBytes { try file.write(all: $0, at: Int64(index * page)) }
        }
        let region: UserFaultRegion
        do {
            region = try UserFaultRegion(base: memory.base, length: memory.size, minorFaults: true)
        } catch let error as SystemError where error.operation == "open userfaultfd" || error.errno == EOPNOTSUPP || error.errno == EINVAL {
            throw XCTSkip("no userfaultfd minor faults on shared memory here: \(error)")
        }
        defer { region.close() }
        let faults = Locked<[(Int, UserFaultRegion.Fault)]>([])
        region.serve { offset, fault in
            faults.withLock { $0.append((offset / page, fault)) }
            switch fault {
            case .minor:
                // Replace page 3 through the file before mapping it: the reader must see the new bytes.
                if offset / page == 3 {
                    let bytes = [UInt8](repeating: 0xAA, count: page)
                    try? bytes.withUnsafeBytes { try file.write(all: $0, at: Int64(3 * page)) }
                }
                _ = try? region.continueMapping(offset: offset, length: page)
            case .missing: _ = try? region.fillZero(offset: offset, length: page)
            }
        }
        // Mapped ahead in one call: pages 4 ..< 8 are in the file, 8 and 9 are holes, which are skipped.
        XCTAssertEqual(try region.continueMapping(offset: 4 * page, length: 6 * page), 4)
        func read(_ index: Int) -> UInt8 { memory.base.load(fromByteOffset: index * page + 100, as: UInt8.self) }
        XCTAssertEqual((0 ..< 10).map(read), [1, 2, 3, 0xAA, 5, 6, 7, 8, 0, 0])
        let seen = faults.withLock { $0.map { "\($0.0):\($0.1)" } }
        XCTAssertEqual(seen, ["0:minor", "1:minor", "2:minor", "3:minor", "8:missing", "9:missing"])
    }
}
