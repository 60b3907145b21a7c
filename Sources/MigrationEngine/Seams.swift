import MigrationWire

/// The hypervisor seam, source side: what the engine needs from a running guest. KVM implements it
/// in-process (KVMMigration), a Xen image file or a Xen host can implement it too.
///
/// Memory is read in place: `page(frame:)` returns a pointer into the guest's RAM, so pages are never copied
/// except into compression or transport buffers.
///
/// Threads: the engine makes every call but `page(frame:)` from the migration's one control thread, one at a
/// time; `page(frame:)` comes from the channels' threads at once, alongside those calls. A source that keeps its
/// own state only in what the control calls touch needs no lock, and says so where it declares itself Sendable.
public protocol GuestSource: AnyObject, Sendable {
    /// The guest-physical RAM regions, page aligned, sorted and disjoint.
    var layout: GuestMemoryLayout { get }
    /// The host address of guest frame `frame` (guest-physical address / page size), which lies in `layout`. It
    /// stays valid as long as the source: the engine may hand it to the kernel to send a batch later.
    func page(frame: UInt64) -> UnsafeRawPointer
    /// Calls `visit` with every frame that may hold data, in order. Frames left out are known to be zero
    /// (never written), so pass 0 skips them without reading them. Sources that cannot tell visit them all.
    func forEachPopulatedFrame(_ visit: (UInt64) -> Void) throws

    func startDirtyTracking() throws
    /// Calls `visit` with every frame written since tracking started or since the last harvest, and re-arms
    /// tracking for them before returning.
    func harvestDirtyFrames(_ visit: (UInt64) -> Void) throws
    func stopDirtyTracking() throws
    /// What the running guest dirties in windows of up to `seconds`, for predicting a migration before it starts
    /// (`ConvergenceDryRun`); `armed` is called once tracking is on, when the windows start. The default
    /// (DirtySampling.swift) uses the three tracking calls above; a source that can measure more cheaply or more finely
    /// implements it. The guest must not be paused, and tracking must be off again when it returns.
    func sampleDirtyPages(for seconds: Double, armed: () -> Void) throws -> DirtySample

    /// Stops the guest's vCPUs; returns once none runs.
    func pause() throws
    func resume()
    /// Makes the guest's vCPUs sleep this fraction of the time (auto-converge); 0 lifts it.
    func setThrottle(_ fraction: Double)
    /// The device state of the paused guest, as versioned blobs.
    func captureDeviceState() throws -> [DeviceState]
}

/// The hypervisor seam, destination side: where the engine rebuilds a guest.
///
/// Threads: `prepare`, `restore`, `start` and `discard` come from the receiver's control thread, one at a time,
/// `prepare` before any channel's thread starts and the others after every one has been joined. `page`, `write`
/// and `zero` come from the channels' threads at once, never for the same frame at a time (every version of a
/// frame travels on the same channel, and moves to another only once the receiver is done with a lost one). A sink
/// whose mutable state only the control calls touch needs no lock, and says so where it declares itself Sendable.
public protocol GuestSink: AnyObject, Sendable {
    /// Creates guest memory for `layout`, zero filled. Throws if this sink cannot hold it.
    func prepare(layout: GuestMemoryLayout) throws
    /// The host address of guest frame `frame`, for writing; the decoder has checked it lies in the layout.
    func page(frame: UInt64) -> UnsafeMutableRawPointer
    /// Writes consecutive frames from `first`, frame `first + i` from the 4096 bytes at `pages[i]`; the frames lie
    /// in the layout. A sink that can write its memory other than through `page(frame:)` more cheaply does so
    /// here; the default copies through `page(frame:)`.
    func write(frames first: UInt64, pages: UnsafeBufferPointer<UnsafeRawPointer>) throws
    /// Makes `count` consecutive frames from `first` read as zero; the default clears them through `page(frame:)`.
    func zero(frames first: UInt64, count: Int) throws
    /// Whether raw pages should be received straight into `page(frame:)` memory, rather than into a buffer and
    /// then through `write`: for memory that takes writes through its mapping as cheaply as any other way. The
    /// default is false.
    var takesPagesInPlace: Bool { get }
    /// Whether a migration may finish in post-copy into this sink (stream.md §6.13): its memory is shared memory (a
    /// memfd) that userfaultfd can register for missing and minor faults, each region contiguous behind
    /// `page(frame:)`, and `write` puts pages into the file without mapping them. The default is false.
    var takesPostCopy: Bool { get }
    /// Rebuilds the guest from its device state, without starting it.
    func restore(deviceState: [DeviceState]) throws
    /// Starts the rebuilt guest.
    func start() throws
    /// Throws away whatever was built; the migration failed before the guest started.
    func discard()
}

extension GuestSink {
    public func write(frames first: UInt64, pages: UnsafeBufferPointer<UnsafeRawPointer>) throws {
        for (i, bytes) in pages.enumerated() { page(frame: first + UInt64(i)).copyMemory(from: bytes, byteCount: 4096) }
    }

    public func zero(frames first: UInt64, count: Int) throws {
        for i in 0 ..< count { page(frame: first + UInt64(i)).initializeMemory(as: UInt8.self, repeating: 0, count: 4096) }
    }

    public var takesPagesInPlace: Bool { false }
    public var takesPostCopy: Bool { false }
}

/// A bidirectional byte stream between sender and receiver: a TCP or Unix socket, with or without TLS.
/// Several may be used at once, one thread each; `close` may come from any thread, to end a blocked call.
public protocol MigrationChannel: AnyObject, Sendable {
    /// Sends all bytes of every buffer, in order.
    func send(_ buffers: [UnsafeRawBufferPointer]) throws
    /// Receives some bytes; 0 means the peer closed its side.
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> Int
    /// Closes the channel; a thread blocked in send or receive on it returns with an error.
    func close()
}
