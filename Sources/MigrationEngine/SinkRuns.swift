/// Gathers pages on their way into a sink into runs of consecutive frames, and hands each run over in one call:
/// `GuestSink.write` for pages with contents, `GuestSink.zero` for zero pages. A sink writing through a file then
/// makes one system call per run. Pages reach the sink in the order they were added.
///
/// The contents' pointers are kept until the run is flushed: they must stay valid until `flush()`.
struct SinkRuns {
    private let sink: GuestSink
    private let maximumRun: Int
    private var first: UInt64 = 0
    private var count = 0
    private var zeros = false
    private var pages: [UnsafeRawPointer] = []

    init(sink: GuestSink, maximumRun: Int) {
        self.sink = sink
        self.maximumRun = maximumRun
        pages.reserveCapacity(maximumRun)
    }

    /// Adds frame `frame` with the 4096 bytes at `contents`, or as a zero page when `contents` is nil.
    mutating func add(frame: UInt64, contents: UnsafeRawPointer?) throws {
        let zero = contents == nil
        if count > 0, zero != zeros || frame != first + UInt64(count) || count == maximumRun { try flush() }
        if count == 0 { (first, zeros) = (frame, zero) }
        if let contents { pages.append(contents) }
        count += 1
    }

    /// Hands the run gathered so far to the sink.
    mutating func flush() throws {
        guard count > 0 else { return }
        if zeros {
            try sink.zero(frames: first, count: count)
        } else {
            try pages.withUnsafeBufferPointer { try sink.write(frames: first, pages: $0) }
        }
        count = 0
        pages.removeAll(keepingCapacity: true)
    }
}
