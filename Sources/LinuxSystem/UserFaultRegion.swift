import CKVM
import Glibc
import Synchronization
import Threads

/// A range of memory whose missing pages are supplied on demand through userfaultfd: lazy restore of guest memory,
/// where the guest runs before its memory is back, and each page it touches first is fetched while it waits.
///
/// With `minorFaults`, a page the memfd holds but the mapping has not mapped yet faults too (a minor fault), until
/// `continueMapping` maps it: post-copy keeps stale pages in the memfd that way, replaces them through the file, and
/// only then lets the guest see them, rather than punching them out first (a punch costs 5-20 µs a page here).
///
/// The range is meant to be a memfd mapped MAP_SHARED (`makeMemoryFile`), possibly also a KVM memory slot: a vCPU's
/// access to a missing page waits for its handler just like a thread's. A page is missing while the memfd has no page
/// at its offset, whichever mapping put one there; once filled it stays present.
///
/// Pages are supplied by `fill` and `fillZero`, from any thread, ahead of faults (prefetch) or in answer to them
/// (`serve`'s resolver). `close()` ends it all. The resolver usually captures the region, keeping it alive until then.
///
/// Sendable: `base` and `length` describe the mapping and never change; handler state is in `state` (Locked) and
/// `shared`.
public final class UserFaultRegion: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let length: Int

    /// The granularity of everything here: 4096 bytes on x86-64.
    public static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))

    private let uffd: OwnedFileDescriptor
    /// An eventfd that `close()` writes to wake the handler thread out of poll().
    private let stop: OwnedFileDescriptor
    private let shared = HandlerShared()
    private let state = Locked(HandlerState())

    private struct HandlerState {
        var thread: pthread_t?
        var serving = false
        var closed = false
    }

    /// How a fault found its page: absent from the memfd, or there but not mapped (`minorFaults` only).
    public enum Fault: Sendable { case missing, minor }

    /// Registers [base, base+length), both page aligned, for missing-page faults, and with `minorFaults` for minor
    /// ones too. Throws SystemError: EINVAL for a range that is not page aligned, ENOENT/EPERM/ENOSYS (operation
    /// "open userfaultfd") when neither /dev/userfaultfd nor the system call may be used, EOPNOTSUPP when the
    /// kernel or the memory does not allow what is asked.
    public init(base: UnsafeMutableRawPointer, length: Int, minorFaults: Bool = false) throws {
        let page = Self.pageSize
        guard length > 0, length % page == 0, Int(bitPattern: base) % page == 0 else {
            throw SystemError("userfaultfd registration of \(length) bytes at \(base): base and length must be multiples of \(page)",
                              errno: EINVAL)
        }
        self.base = base
        self.length = length
        uffd = OwnedFileDescriptor(taking: try systemCall("open userfaultfd") { ckvm_userfaultfd_open() })
        stop = OwnedFileDescriptor(taking: try systemCall("eventfd") { ckvm_eventfd(0) })

        // No features. Missing faults on shmem/memfd need none: UFFD_FEATURE_MISSING_SHMEM only reports that the
        // kernel (4.11+) supports them, and UFFDIO_REGISTER below fails with EINVAL on one that does not.
        var api = uffdio_api(api: CKVM_UFFD_API, features: minorFaults ? CKVM_UFFD_FEATURE_MINOR_SHMEM : 0, ioctls: 0)
        try systemCall("UFFDIO_API") { ckvm_ioctl_ptr(uffd.rawValue, CKVM_UFFDIO_API, &api) }

        let mode = CKVM_UFFDIO_REGISTER_MODE_MISSING | (minorFaults ? CKVM_UFFDIO_REGISTER_MODE_MINOR : 0)
        var register = uffdio_register(range: range(offset: 0, length: length), mode: mode, ioctls: 0)
        try systemCall("UFFDIO_REGISTER of \(length) bytes at \(base)") {
            ckvm_ioctl_ptr(uffd.rawValue, CKVM_UFFDIO_REGISTER, &register)
        }
        // The kernel answers which operations this kind of memory allows; without both, faults could not be served.
        let needed = CKVM_UFFDIO_COPY_ALLOWED | CKVM_UFFDIO_ZEROPAGE_ALLOWED | (minorFaults ? CKVM_UFFDIO_CONTINUE_ALLOWED : 0)
        guard register.ioctls & needed == needed else {
            throw SystemError("UFFDIO_REGISTER of \(length) bytes at \(base): no UFFDIO_COPY/UFFDIO_ZEROPAGE\(minorFaults ? "/UFFDIO_CONTINUE" : "") on this memory",
                              errno: EOPNOTSUPP)
        }
    }

    deinit { close() }

    /// Atomically fills `length` bytes (a multiple of the page size) at `offset` from `source`, and wakes the threads
    /// waiting for those pages. Returns false if some page there was already present: those are skipped and the
    /// others filled, since a race with another filler (prefetch against the handler) is no error.
    /// Throws EINVAL for a range that is unaligned or outside the region, ENOENT after `close()`.
    public func fill(offset: Int, from source: UnsafeRawPointer, length: Int) throws -> Bool {
        try checkPages(offset: offset, length: length, "UFFDIO_COPY")
        var done = 0, allMissing = true
        while done < length {
            var copy = uffdio_copy(dst: address(offset + done), src: UInt64(UInt(bitPattern: source + done)),
                                   len: UInt64(length - done), mode: 0, copy: 0)
            do {
                try systemCall("UFFDIO_COPY of \(length - done) bytes at offset \(offset + done)") {
                    ckvm_ioctl_ptr(uffd.rawValue, CKVM_UFFDIO_COPY, &copy)
                }
                return allMissing
            } catch let error as SystemError {
                done += try skip(after: error, progress: copy.copy, allMissing: &allMissing)
            }
        }
        return allMissing
    }

    /// The same as `fill`, with zeros (UFFDIO_ZEROPAGE).
    public func fillZero(offset: Int, length: Int) throws -> Bool {
        try checkPages(offset: offset, length: length, "UFFDIO_ZEROPAGE")
        var done = 0, allMissing = true
        while done < length {
            var zero = uffdio_zeropage(range: range(offset: offset + done, length: length - done), mode: 0, zeropage: 0)
            do {
                try systemCall("UFFDIO_ZEROPAGE of \(length - done) bytes at offset \(offset + done)") {
                    ckvm_ioctl_ptr(uffd.rawValue, CKVM_UFFDIO_ZEROPAGE, &zero)
                }
                return allMissing
            } catch let error as SystemError {
                done += try skip(after: error, progress: zero.zeropage, allMissing: &allMissing)
            }
        }
        return allMissing
    }

    /// Maps the pages the memfd holds in [offset, offset+length) and wakes the threads waiting for them
    /// (UFFDIO_CONTINUE, `minorFaults` only). Pages absent from the memfd, or mapped already, are skipped. Returns the
    /// number of pages it mapped. Throws EINVAL for a range that is unaligned or outside the region, ENOENT after
    /// `close()`.
    @discardableResult
    public func continueMapping(offset: Int, length: Int) throws -> Int {
        try checkPages(offset: offset, length: length, "UFFDIO_CONTINUE")
        var done = 0, mapped = 0
        while done < length {
            var request = uffdio_continue(range: range(offset: offset + done, length: length - done), mode: 0, mapped: 0)
            do {
                try systemCall("UFFDIO_CONTINUE of \(length - done) bytes at offset \(offset + done)") {
                    ckvm_ioctl_ptr(uffd.rawValue, CKVM_UFFDIO_CONTINUE, &request)
                }
                return mapped + (length - done) / Self.pageSize
            } catch let error as SystemError {
                if request.mapped > 0 {
                    mapped += Int(request.mapped) / Self.pageSize
                    done += Int(request.mapped)
                    continue
                }
                switch error.errno {
                case EAGAIN: continue
                case EEXIST, EFAULT: done += Self.pageSize // mapped already; absent from the memfd
                default: throw error
                }
            }
        }
        return mapped
    }

    /// Starts the handler thread, "uffd-handler", which calls `resolve(pageOffset, fault)` for each page fault, with
    /// the page-aligned offset of the faulting page in the region; other events are ignored. Call it at most once.
    ///
    /// `resolve` must make the page present with `fill` or `fillZero`. The handler does not check: if the page is
    /// still missing when `resolve` returns, the faulting thread keeps waiting (without retries, so nothing spins)
    /// until a later fill of that page from any thread, or until `close()`, after which it reads whatever the memfd
    /// holds there (zeros for a hole). This also lets a resolver start a slow fetch and fill when it arrives.
    /// Several threads faulting on one page may give several calls; all but the first fill return false.
    /// The faulting thread goes on as soon as its page is filled, possibly before `resolve` returns.
    /// After `close()`, it does nothing.
    public func serve(_ resolve: @escaping @Sendable (Int, Fault) -> Void) {
        let handler = FaultHandler(region: self, resolve: resolve)
        state.withLock { state in
            precondition(!state.serving, "UserFaultRegion.serve called twice")
            guard !state.closed else { return }
            state.serving = true
            var thread = pthread_t()
            // A plain pthread rather than Foundation's Thread, because close() must join it.
            let result = pthread_create(&thread, nil, { context in
                Unmanaged<FaultHandler>.fromOpaque(context!).takeRetainedValue().run()
                return nil
            }, Unmanaged.passRetained(handler).toOpaque())
            precondition(result == 0, "userfaultfd handler: \(SystemError("pthread_create", errno: result))")
            state.thread = thread
        }
    }

    /// Stops the handler thread and waits for it (unless called from the resolver itself, which cannot wait for its
    /// own thread: the handler then stops when the resolver returns), then unregisters the range, which wakes every
    /// thread still waiting for a page; they and later faults become ordinary faults, served from the memfd.
    /// Later fills throw ENOENT. Idempotent: a second call returns at once, even while the first is still waiting.
    public func close() {
        let (first, thread) = state.withLock { state -> (Bool, pthread_t?) in
            defer { state.closed = true; state.thread = nil }
            return (!state.closed, state.thread)
        }
        guard first else { return }
        if let thread {
            shared.stopping.store(true, ordering: .relaxed) // so that it stops between two faults of one batch, too
            var one: UInt64 = 1
            _ = try? systemCall("write to eventfd") { write(stop.rawValue, &one, MemoryLayout<UInt64>.size) }
            if pthread_equal(thread, pthread_self()) != 0 { pthread_detach(thread) } else { pthread_join(thread, nil) }
        }
        // Unregistered only after the handler stopped, so that no resolver sees its fills fail because of close().
        // A failure means nothing is registered there any more (the memory was unmapped), which is what we want.
        var range = range(offset: 0, length: length)
        _ = try? systemCall("UFFDIO_UNREGISTER") { ckvm_ioctl_ptr(uffd.rawValue, CKVM_UFFDIO_UNREGISTER, &range) }
    }

    /// Page faults handed to the resolver so far, for statistics. Prefetched pages that nobody waited for are not counted.
    public var faultsServed: Int { shared.served.load(ordering: .relaxed) }

    // MARK: private

    private func address(_ offset: Int) -> UInt64 { UInt64(UInt(bitPattern: base + offset)) }
    private func range(offset: Int, length: Int) -> uffdio_range { uffdio_range(start: address(offset), len: UInt64(length)) }

    private func checkPages(offset: Int, length: Int, _ operation: String) throws {
        let page = Self.pageSize
        guard offset >= 0, length >= 0, offset % page == 0, length % page == 0, offset <= self.length - length else {
            throw SystemError("\(operation) of \(length) bytes at offset \(offset) in a region of \(self.length) bytes: "
                              + "offset and length must be multiples of \(page), inside the region", errno: EINVAL)
        }
    }

    /// How far to move on after UFFDIO_COPY or UFFDIO_ZEROPAGE filled less than asked. The kernel fills page by page,
    /// stops at the first page it cannot fill and writes back the bytes it did fill (then errno is EAGAIN), or -errno.
    private func skip(after error: SystemError, progress: Int64, allMissing: inout Bool) throws -> Int {
        if progress > 0 { return Int(progress) } // partial: go on after the filled part, and learn why it stopped
        switch error.errno {
        case EAGAIN: return 0 // the address space was changing: try again
        case EEXIST: // that page is present already
            allMissing = false
            return Self.pageSize
        default: throw error
        }
    }

    /// What the handler thread uses, retained by it, so that nothing it touches goes away before it returns
    /// even when close() could not wait for it.
    private final class FaultHandler: Sendable {
        let uffd: OwnedFileDescriptor, stop: OwnedFileDescriptor
        let base: UInt64
        let shared: HandlerShared
        let resolve: @Sendable (Int, Fault) -> Void

        init(region: UserFaultRegion, resolve: @escaping @Sendable (Int, Fault) -> Void) {
            uffd = region.uffd
            stop = region.stop
            base = region.address(0)
            shared = region.shared
            self.resolve = resolve
        }

        func run() {
            _ = ckvm_set_thread_name("uffd-handler")
            // Set up once, so that serving a fault allocates nothing.
            let batch = 64
            let messages = UnsafeMutablePointer<uffd_msg>.allocate(capacity: batch)
            let fds = UnsafeMutablePointer<pollfd>.allocate(capacity: 2)
            defer { messages.deallocate(); fds.deallocate() }
            fds[0] = pollfd(fd: uffd.rawValue, events: Int16(POLLIN), revents: 0)
            fds[1] = pollfd(fd: stop.rawValue, events: Int16(POLLIN), revents: 0)
            let pageMask = ~UInt64(UserFaultRegion.pageSize - 1)

            while true {
                // No timeout: close() wakes us through the eventfd.
                if poll(fds, 2, -1) < 0 {
                    if errno == EINTR { continue }
                    fatalError("userfaultfd handler: \(SystemError("poll", errno: errno))")
                }
                if fds[1].revents != 0 { return } // close(): waiting threads are woken by the unregistration
                guard fds[0].revents != 0 else { continue }
                let bytes = read(uffd.rawValue, messages, batch * MemoryLayout<uffd_msg>.stride)
                if bytes < 0 {
                    // EAGAIN: the fault was resolved (by a prefetch fill) between poll() and read().
                    if errno == EAGAIN || errno == EINTR { continue }
                    // Nobody to report to, and going on would leave the faulting threads waiting forever.
                    fatalError("userfaultfd handler: \(SystemError("read", errno: errno))")
                }
                for message in messages ..< messages + bytes / MemoryLayout<uffd_msg>.stride {
                    if shared.stopping.load(ordering: .relaxed) { return }
                    guard ckvm_uffd_msg_event(message) == CKVM_UFFD_EVENT_PAGEFAULT else { continue }
                    // Counted before resolving, so that a faulting thread, once woken, sees itself counted.
                    shared.served.add(1, ordering: .relaxed)
                    resolve(Int((ckvm_uffd_msg_fault_address(message) - base) & pageMask),
                            ckvm_uffd_msg_fault_is_minor(message) != 0 ? .minor : .missing)
                }
            }
        }
    }

    /// Between the region and its handler thread.
    private final class HandlerShared: Sendable {
        let served = Atomic<Int>(0)
        let stopping = Atomic<Bool>(false)
    }
}
