import MigrationWire

/// Copies a paused guest from a source to a sink in this process, with no stream in between: the path of
/// format conversions (a Xen image into a MicroVM, a MicroVM into a Xen image). Pages that the source knows
/// to be zero are not copied; the sink's memory starts zeroed.
public enum GuestCopy {
    /// Prepares the sink, copies memory and restores the device state; does not start the sink.
    /// Returns the number of pages copied.
    @discardableResult
    public static func copy(from source: GuestSource, to sink: GuestSink) throws -> Int {
        do {
            try sink.prepare(layout: source.layout)
            var pages = 0
            try source.forEachPopulatedFrame { frame in
                sink.page(frame: frame).copyMemory(from: source.page(frame: frame), byteCount: 4096)
                pages += 1
            }
            try sink.restore(deviceState: try source.captureDeviceState())
            return pages
        } catch {
            sink.discard()
            throw error
        }
    }
}
