import MigrationWire

/// Copies a paused guest from a source to a sink in this process, with no stream in between: the path of
/// format conversions (a Xen image into a MicroVM, a MicroVM into a Xen image). Pages that the source knows
/// to be zero are not copied; the sink's memory starts zeroed.
public enum GuestCopy {
    /// The longest run handed to the sink at once.
    static let runPages = 256

    /// Prepares the sink, copies memory and restores the device state; does not start the sink.
    /// Returns the number of pages copied.
    @discardableResult
    public static func copy(from source: GuestSource, to sink: GuestSink) throws -> Int {
        do {
            try sink.prepare(layout: source.layout)
            // Runs of consecutive frames, each handed to the sink in one write (GuestSink.write).
            var run: (first: UInt64, pages: [UnsafeRawPointer]) = (0, [])
            var pages = 0
            var failure: Error?
            func flush() {
                guard failure == nil, !run.pages.isEmpty else { return }
                do { try run.pages.withUnsafeBufferPointer { try sink.write(frames: run.first, pages: $0) } } catch { failure = error }
                pages += run.pages.count
                run.pages.removeAll(keepingCapacity: true)
            }
            try source.forEachPopulatedFrame { frame in
                guard failure == nil else { return }
                if frame != run.first + UInt64(run.pages.count) || run.pages.count == runPages { flush() }
                if run.pages.isEmpty { run.first = frame }
                run.pages.append(source.page(frame: frame))
            }
            flush()
            if let failure { throw failure }
            try sink.restore(deviceState: try source.captureDeviceState())
            return pages
        } catch {
            sink.discard()
            throw error
        }
    }
}
