import Foundation
import LinuxSystem
import MigrationEngine
import MigrationWire
import PageCodec
import Threads

/// What a restore measured.
public struct RestoreReport: Sendable, Codable, Equatable {
    public var lazy: Bool
    public var dataPages: Int
    public var bytesRead: Int
    /// From the start of the restore until the guest may run (`sink.start()` may be called).
    public var secondsToReady: Double
    /// From the start of the restore until all of memory is in place (equals `secondsToReady` when eager).
    public var secondsToResident: Double?
    /// Pages a lazy restore served on demand, because the guest touched them before the prefetch got there.
    public var faultsServed: Int

    public init(lazy: Bool, dataPages: Int, bytesRead: Int, secondsToReady: Double, secondsToResident: Double?, faultsServed: Int) {
        self.lazy = lazy
        self.dataPages = dataPages
        self.bytesRead = bytesRead
        self.secondsToReady = secondsToReady
        self.secondsToResident = secondsToResident
        self.faultsServed = faultsServed
    }
}

/// Eager restore: reads every page of a chain into a sink's memory, checking each page's CRC32C and the
/// memory digest of the result, then restores the device state. The caller starts the sink.
public enum SnapshotRestore {
    /// Pages read per system call.
    static let runPages = 256

    /// `threads` readers work on alternate runs of pages at once (the read and the write into guest memory both
    /// scale with cores); the sink must take `write` calls for different frames from several threads, as the
    /// migration receiver's channels already make them.
    public static func restore(_ chain: SnapshotChain, into sink: GuestSink, threads: Int = 2,
                               progress: ((_ done: Int, _ total: Int) -> Void)? = nil) throws(SnapshotError) -> RestoreReport {
        let started = monotonicSeconds()
        do throws(SnapshotError) {
            let total = try prepare(chain, sink)
            var found: [(file: Int, first: Int, count: Int)] = []
            try chain.forEachDataRun(maximumPages: runPages) { (file, first, count) throws(SnapshotError) in found.append((file, first, count)) }
            let runs = found
            let shared = RestoreProgress(total: total, report: progress)
            let workers = max(1, min(threads, runs.count))
            DispatchQueue.concurrentPerform(iterations: workers) { worker in
                let reader = ChainReader(chain)
                let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: runPages * SnapshotFormat.pageSize, alignment: 4096)
                defer { bounce.deallocate() }
                var digest = MemoryDigest()
                do throws(SnapshotError) {
                    for run in stride(from: worker, to: runs.count, by: workers) where !shared.failed {
                        let (file, first, count) = runs[run]
                        try restoreRun(reader: reader, sink: sink, file: file, first: first, count: count, bounce: bounce, digest: &digest)
                        shared.add(count)
                    }
                    shared.add(digest)
                } catch {
                    shared.fail(error)
                }
            }
            if let error = shared.error { throw error }
            let digest = shared.digest
            guard digest == chain.top.memoryDigest else {
                throw SnapshotError.digestMismatch(expected: "\(chain.top.memoryDigest)", actual: "\(digest)")
            }
            try restoreDevices(chain, sink)
            let seconds = monotonicSeconds() - started
            return RestoreReport(lazy: false, dataPages: total, bytesRead: total * SnapshotFormat.pageSize,
                                 secondsToReady: seconds, secondsToResident: seconds, faultsServed: 0)
        } catch {
            sink.discard()
            throw error
        }
    }

    /// Reads one run of pages, checks and hashes them into `digest`, and hands them to the sink in one write:
    /// through a buffer, as a sink writes memory the mapping has not touched yet more cheaply than a read into
    /// the mapping would fault it in (`GuestSink.write`).
    private static func restoreRun(reader: ChainReader, sink: GuestSink, file: Int, first: Int, count: Int,
                                   bounce: UnsafeMutableRawBufferPointer, digest: inout MemoryDigest) throws(SnapshotError) {
        let firstFrame = reader.chain.top.frames.frame(at: first)
        let pageSize = SnapshotFormat.pageSize
        try reader.read(file: file, firstIndex: first, count: count, into: bounce.baseAddress!)
        let pages = (0 ..< count).map { UnsafeRawPointer(bounce.baseAddress! + $0 * pageSize) }
        for (k, page) in pages.enumerated() {
            digest.add(PageHash.of(frame: firstFrame + UInt64(k), page: UnsafeRawBufferPointer(start: page, count: pageSize)))
        }
        do {
            try pages.withUnsafeBufferPointer { try sink.write(frames: firstFrame, pages: $0) }
        } catch {
            throw .guest("writing \(count) pages from frame \(firstFrame): \(error)")
        }
    }

    /// Prepares the sink's memory; returns the number of data pages to restore.
    static func prepare(_ chain: SnapshotChain, _ sink: GuestSink) throws(SnapshotError) -> Int {
        do { try sink.prepare(layout: chain.top.layout) } catch { throw .guest("preparing memory: \(error)") }
        return chain.dataPages
    }

    static func restoreDevices(_ chain: SnapshotChain, _ sink: GuestSink) throws(SnapshotError) {
        do { try sink.restore(deviceState: chain.top.deviceState) } catch { throw .guest("restoring device state: \(error)") }
    }
}

/// Lazy restore: the guest may start as soon as its device state is restored. Its memory stays empty and
/// registered with userfaultfd; a handler thread serves each page the guest touches from the snapshot, while
/// a prefetch thread fills in the rest in order. When the prefetch is done the registration is dropped.
///
/// The sink must keep each memory region contiguous in host memory (MicroVM does). Every page is checked
/// against its CRC32C before the guest sees it; a bad page cannot be served, so `onFailure` is called (the
/// caller stops the guest) and the registration is dropped so that no thread waits forever.
///
/// Sendable: `regions` and `readyAt` are set by `start` before the fault handler threads begin; the handler's reader
/// and page belong to the one handler thread; `residentAt` and `failure` are Locked.
public final class LazyRestore: @unchecked Sendable {
    public let chain: SnapshotChain
    private let sink: GuestSink
    private var regions: [UserFaultRegion] = []
    private let started = monotonicSeconds()
    private var readyAt: Double?
    private let resident = DispatchSemaphore(value: 0)
    private let residentAt = Locked<Double?>(nil)
    private let failure = Locked<SnapshotError?>(nil)
    /// Called once, from the handler or prefetch thread, when a page cannot be served.
    public var onFailure: (@Sendable (SnapshotError) -> Void)?

    private let handlerReader: ChainReader
    private let handlerPage = UnsafeMutableRawPointer.allocate(byteCount: SnapshotFormat.pageSize, alignment: 4096)

    public init(_ chain: SnapshotChain, into sink: GuestSink) {
        self.chain = chain
        self.sink = sink
        handlerReader = ChainReader(chain)
    }

    deinit {
        for region in regions { region.close() }
        handlerPage.deallocate()
    }

    /// Prepares memory, registers it, restores the device state and starts the handler and prefetch threads.
    /// After it returns the caller starts the sink.
    public func prepare() throws(SnapshotError) {
        do throws(SnapshotError) {
            _ = try SnapshotRestore.prepare(chain, sink)
            let frames = chain.top.frames
            for run in frames.runs {
                let base = sink.page(frame: run.firstFrame)
                let last = sink.page(frame: run.firstFrame + UInt64(run.count - 1))
                guard last == base + (run.count - 1) * SnapshotFormat.pageSize else {
                    throw SnapshotError.unsupported("lazy restore needs guest memory that is contiguous per region")
                }
                let region = try fileOperation("registering guest memory with userfaultfd") {
                    try UserFaultRegion(base: base, length: run.count * SnapshotFormat.pageSize)
                }
                regions.append(region)
            }
            for (region, run) in zip(regions, frames.runs) {
                region.serve { [self] offset, _ in
                    serveFault(region: region, index: run.firstIndex + offset / SnapshotFormat.pageSize, offset: offset)
                }
            }
            try SnapshotRestore.restoreDevices(chain, sink)
            readyAt = monotonicSeconds() - started
            startThread(named: "snapshot-prefetch") { [self] in prefetch() }
        } catch {
            for region in regions { region.close() }
            sink.discard()
            throw error
        }
    }

    /// Runs on the handler thread, the only user of `handlerReader` and `handlerPage`.
    private func serveFault(region: UserFaultRegion, index: Int, offset: Int) {
        do throws(SnapshotError) {
            if try handlerReader.readPage(index: index, into: handlerPage) {
                _ = try fileOperation("filling a guest page") { try region.fill(offset: offset, from: handlerPage, length: SnapshotFormat.pageSize) }
            } else {
                _ = try fileOperation("filling a guest page") { try region.fillZero(offset: offset, length: SnapshotFormat.pageSize) }
            }
        } catch {
            fail(error)
        }
    }

    private func prefetch() {
        let reader = ChainReader(chain)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: SnapshotRestore.runPages * SnapshotFormat.pageSize, alignment: 4096)
        defer { buffer.deallocate() }
        let frames = chain.top.frames
        do throws(SnapshotError) {
            try chain.forEachDataRun(maximumPages: SnapshotRestore.runPages) { (file, first, count) throws(SnapshotError) in
                guard failure.withLock({ $0 }) == nil else { return }
                try reader.read(file: file, firstIndex: first, count: count, into: buffer.baseAddress!)
                let regionIndex = frames.runs.lastIndex { $0.firstIndex <= first }!
                let offset = (first - frames.runs[regionIndex].firstIndex) * SnapshotFormat.pageSize
                // A page the guest already faulted in is skipped: fill reports it, page by page.
                _ = try fileOperation("filling guest memory") {
                    try regions[regionIndex].fill(offset: offset, from: buffer.baseAddress!, length: count * SnapshotFormat.pageSize)
                }
            }
        } catch {
            fail(error)
        }
        // Zero pages need no filling: once unregistered, the guest's first touch allocates them zeroed.
        for region in regions { region.close() }
        residentAt.withLock { $0 = monotonicSeconds() - started }
        resident.signal()
    }

    private func fail(_ error: Error) {
        let snapshotError = error as? SnapshotError ?? .io("\(error)")
        let first = failure.withLock { current -> Bool in
            guard current == nil else { return false }
            current = snapshotError
            return true
        }
        guard first else { return }
        onFailure?(snapshotError)
        for region in regions { region.close() }
    }

    /// Waits until all of memory is in place; returns what the restore measured, or the error that stopped it.
    public func waitUntilResident() throws(SnapshotError) -> RestoreReport {
        resident.wait()
        resident.signal()
        if let error = failure.withLock({ $0 }) { throw error }
        return RestoreReport(lazy: true, dataPages: chain.dataPages, bytesRead: chain.dataPages * SnapshotFormat.pageSize,
                             secondsToReady: readyAt ?? 0, secondsToResident: residentAt.withLock { $0 },
                             faultsServed: regions.reduce(0) { $0 + $1.faultsServed })
    }
}


/// What the threads of an eager restore share: pages done, the digest so far, and the first error.
///
/// Sendable: `done`, `digest` and `error` are guarded by `lock`.
private final class RestoreProgress: @unchecked Sendable {
    private let lock = NSLock()
    private let total: Int
    private let report: ((Int, Int) -> Void)?
    private var done = 0
    private(set) var digest = MemoryDigest()
    private(set) var error: SnapshotError?

    init(total: Int, report: ((Int, Int) -> Void)?) {
        self.total = total
        self.report = report
    }

    var failed: Bool { lock.withLock { error != nil } }

    func add(_ pages: Int) {
        lock.withLock {
            done += pages
            report?(done, total)
        }
    }

    func add(_ partial: MemoryDigest) {
        lock.withLock {
            digest.low &+= partial.low
            digest.high &+= partial.high
        }
    }

    func fail(_ error: SnapshotError) { lock.withLock { if self.error == nil { self.error = error } } }
}
