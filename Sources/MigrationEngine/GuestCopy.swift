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
            var runs = SinkRuns(sink: sink, maximumRun: runPages)
            var pages = 0
            var failure: Error?
            try source.forEachPopulatedFrame { frame in
                guard failure == nil else { return }
                do { try runs.add(frame: frame, contents: source.page(frame: frame)) } catch { failure = error }
                pages += 1
            }
            if let failure { throw failure }
            try runs.flush()
            try sink.restore(deviceState: try source.captureDeviceState())
            return pages
        } catch {
            sink.discard()
            throw error
        }
    }
}
