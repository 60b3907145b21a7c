import CMigratedABI
import Foundation
import LinuxSystem
import MigrationEngine
import MigrationNetwork
import NetworkAddress
import Transport
import Threads

/// Where a migration's channels go, as `migrated_migration_options` says: an address to connect to or listen on,
/// or sockets the VMM has connected itself; in plaintext or mutual TLS.
struct ChannelPlan {
    enum Route {
        case address(Endpoint)
        /// Duplicates of the VMM's sockets, taken when the migration starts, in channel order.
        case sockets([OwnedFileDescriptor])
    }

    let route: Route
    let security: Security

    init(_ options: migrated_migration_options) throws {
        if let address = options.address {
            guard options.fds == nil, options.fd_count == 0 else { throw CABIError.invalid("give either address or fds, not both") }
            let text = try string(address, "address")
            guard let parsed = PeerAddress(text) else { throw CABIError.invalid("address '\(text)' is not host:port, [v6-address]:port or unix:/path") }
            route = .address(Endpoint(parsed))
        } else {
            guard options.fd_count > 0, options.fd_count <= 64, let fds = options.fds else {
                throw CABIError.invalid("give an address, or between 1 and 64 fds (fd_count is \(options.fd_count))")
            }
            route = .sockets(try (0 ..< Int(options.fd_count)).map { index in
                let fd = fds[index]
                guard fd >= 0 else { throw CABIError.invalid("fds[\(index)] is \(fd)") }
                return OwnedFileDescriptor(taking: try systemCall("fcntl F_DUPFD_CLOEXEC on fds[\(index)]") { fcntl(fd, F_DUPFD_CLOEXEC, 0) })
            })
        }
        security = try options.tls.map { .tls(try Self.tlsConfiguration($0.pointee)) } ?? .plaintext
    }

    private static func tlsConfiguration(_ tls: migrated_tls) throws -> TLSConfiguration {
        func file(_ pointer: UnsafePointer<CChar>?, _ name: String) throws -> String {
            let path = try string(pointer, "tls.\(name)")
            guard access(path, R_OK) == 0 else { throw CABIError.invalid("tls.\(name) '\(path)' cannot be read: \(String(cString: strerror(errno)))") }
            return path
        }
        guard tls.allowed_peer_count > 0, let peers = tls.allowed_peers else {
            throw CABIError.invalid("tls.allowed_peers is empty: mutual TLS accepts only the peers it names")
        }
        let names = try (0 ..< Int(tls.allowed_peer_count)).map { try string(peers[$0], "tls.allowed_peers[\($0)]") }
        return TLSConfiguration(caFile: try file(tls.ca_file, "ca_file"), certificateFile: try file(tls.certificate_file, "certificate_file"),
                                keyFile: try file(tls.key_file, "key_file"), allowedPeerNames: names)
    }

    var socketCount: Int? {
        if case .sockets(let sockets) = route { return sockets.count }
        return nil
    }

    /// Opens outgoing channel `index`.
    func connect(channel index: Int) throws -> MigrationChannel {
        switch route {
        case .address(let endpoint): try MigrationNetwork.connect(to: endpoint, security: security)
        case .sockets(let sockets): try MigrationNetwork.adopt(socket: sockets[index].rawValue, security: security, server: false).channel
        }
    }
}

/// The engine's options for an outgoing migration, from the C structure's fields (zero meaning the default).
func migrationOptions(_ options: migrated_migration_options, plan: ChannelPlan) throws -> MigrationOptions {
    var result = MigrationOptions()
    guard options.flags & ~(MIGRATED_MIGRATE_NO_AUTO_CONVERGE | MIGRATED_MIGRATE_POSTCOPY) == 0 else { throw CABIError.invalid("unknown flags 0x\(String(options.flags, radix: 16))") }
    if let sockets = plan.socketCount {
        guard options.channels == 0 || Int(options.channels) == sockets else {
            throw CABIError.invalid("channels is \(options.channels) but \(sockets) fds were given: one channel per fd")
        }
        result.channels = sockets
    } else {
        guard options.channels <= 64 else { throw CABIError.invalid("\(options.channels) channels; at most 64") }
        result.channels = max(1, Int(options.channels))
    }
    switch options.compression {
    case MIGRATED_COMPRESSION_DEFAULT.rawValue: break
    case MIGRATED_COMPRESSION_NONE.rawValue: result.compression = .none
    case MIGRATED_COMPRESSION_LZ4.rawValue: result.compression = .lz4
    case MIGRATED_COMPRESSION_ZSTD.rawValue: result.compression = .zstd
    case MIGRATED_COMPRESSION_ADAPTIVE.rawValue: result.compression = .adaptive
    default: throw CABIError.invalid("compression \(options.compression) is none of enum migrated_compression")
    }
    if options.zstd_level != 0 {
        guard (-7 ... 22).contains(options.zstd_level) else { throw CABIError.invalid("zstd_level \(options.zstd_level) is outside -7...22") }
        result.zstdLevel = options.zstd_level
    }
    if options.downtime_limit_ms != 0 { result.downtimeLimit = Double(options.downtime_limit_ms) / 1000 }
    if options.max_passes != 0 { result.maxPasses = Int(options.max_passes) }
    guard options.time_limit_seconds >= 0, options.time_limit_seconds.isFinite else {
        throw CABIError.invalid("time_limit_seconds \(options.time_limit_seconds) is not a non-negative number")
    }
    if options.time_limit_seconds > 0 { result.timeLimit = options.time_limit_seconds }
    guard options.bandwidth_limit >= 0, options.bandwidth_limit.isFinite else {
        throw CABIError.invalid("bandwidth_limit \(options.bandwidth_limit) is not a non-negative number")
    }
    if options.bandwidth_limit > 0 { result.bandwidthLimit = options.bandwidth_limit }
    result.autoConverge = options.flags & MIGRATED_MIGRATE_NO_AUTO_CONVERGE == 0
    result.postCopy = options.flags & MIGRATED_MIGRATE_POSTCOPY != 0
    return result
}

/// A `migrated_migration`: one migration on a thread of its own, with its result once it has ended.
///
/// Sendable: `result`, `waited`, `cancelled` and `cancelAction` are guarded by `lock`; `done` orders the result's write
/// before `wait` reads it.
final class EmbeddedMigration: @unchecked Sendable {
    /// Incoming with an address: where it listens.
    let address: String?
    private let done = DispatchSemaphore(value: 0)
    private let lock = NSLock()
    // Guarded by `lock`.
    private var result: migrated_report?
    private var waited = false
    private var cancelled = false
    private var cancelAction: (() -> Void)?

    private init(address: String?) { self.address = address }

    /// Starts `body` on a new thread; what it returns is the migration's result. `cancel` stops it.
    private static func start(address: String? = nil, name: String, cancel: @escaping () -> Void,
                              _ body: sending @escaping (EmbeddedMigration) -> migrated_report) -> EmbeddedMigration {
        let migration = EmbeddedMigration(address: address)
        migration.cancelAction = cancel
        startThread(named: name) {
            let report = body(migration)
            migration.lock.withLock {
                migration.result = report
                migration.cancelAction = nil
            }
            migration.done.signal()
        }
        return migration
    }

    var isCancelled: Bool { lock.withLock { cancelled } }

    func cancel() {
        let action = lock.withLock {
            cancelled = true
            return cancelAction
        }
        action?()
    }

    func wait() throws -> migrated_report {
        try lock.withLock {
            if waited { throw CABIError.state("this migration was waited for already") }
            waited = true
        }
        done.wait()
        return lock.withLock { result! }
    }

    /// Cancels and waits, unless it was waited for already: what freeing a handle does.
    func finish() {
        let needsWait = lock.withLock { !waited }
        guard needsWait else { return }
        cancel()
        _ = try? wait()
    }

    // MARK: outgoing

    static func outgoing(_ vm: EmbeddedVM, _ options: migrated_migration_options) throws -> EmbeddedMigration {
        try requireABIVersion(options.abi_version, in: "migrated_migration_options")
        let plan = try ChannelPlan(options)
        let engineOptions = try migrationOptions(options, plan: plan)
        let progress = ProgressReporter(options.progress, options.progress_opaque)
        try vm.claim("an outgoing migration")
        let source: VMMGuestSource
        do { source = try VMMGuestSource(vm) } catch {
            vm.release()
            throw error
        }
        let sender = MigrationSender(source: source, options: engineOptions) { try plan.connect(channel: $0) }
        sender.onProgress = { progress.report($0) }
        let failuresBefore = vm.callbacks.failureCount
        return start(name: "migrated-out", cancel: { sender.cancel() }) { _ in
            defer { vm.release() }
            let report = sender.run()
            let error = sender.failure.map { failure in
                // After the commit the guest may run at the destination: not an error the VMM may answer by resuming.
                report.committed ? CABIError(MIGRATED_ERR_IN_DOUBT, "\(failure)")
                    : CABIError(classifying: failure, callbackFailed: vm.callbacks.failureCount > failuresBefore)
            }
            return migrated_report(
                error: error, total: report.totalSeconds, setup: report.setupSeconds, downtime: report.downtimeSeconds,
                wireBytes: report.wireBytes, pages: report.pagesSent, passes: report.passes.count, channels: report.channels,
                harvests: report.harvests, harvestSeconds: report.harvestSeconds, digest: "")
        }
    }

    // MARK: incoming

    static func incoming(_ vm: EmbeddedVM, _ options: migrated_migration_options) throws -> EmbeddedMigration {
        try requireABIVersion(options.abi_version, in: "migrated_migration_options")
        let plan = try ChannelPlan(options)
        let sink = try VMMGuestSink(vm)
        if (try? vm.memory()) != nil { throw CABIError.state("the handle holds a guest already; receive into a handle made without regions") }
        // Bound here, so that an address in use is the caller's error, and the chosen port is known at once.
        let listener: Listener? = if case .address(let endpoint) = plan.route {
            try Listener(endpoint: endpoint, security: plan.security)
        } else {
            nil
        }
        try vm.claim("an incoming migration")
        let channels = ChannelSet()
        let started = monotonicSeconds()
        let failuresBefore = vm.callbacks.failureCount
        return start(address: listener?.endpoint.address.description, name: "migrated-in", cancel: {
            listener?.close()
            channels.closeAll()
        }) { migration in
            defer {
                listener?.close()
                vm.release()
            }
            do {
                let accepted = try Self.accept(plan, listener: listener)
                channels.set(accepted)
                if migration.isCancelled { throw MigrationError.cancelled }
                let report = try MigrationReceiver(sink: sink, channels: accepted).run()
                return migrated_report(error: nil, total: monotonicSeconds() - started, setup: 0, downtime: nil, wireBytes: 0,
                                       pages: report.pagesWritten, passes: report.passes, channels: accepted.count, digest: report.digest)
            } catch {
                channels.closeAll()
                let failure = migration.isCancelled ? CABIError(MIGRATED_ERR_CANCELLED, "migration cancelled: \(error)")
                    : CABIError(classifying: error, callbackFailed: vm.callbacks.failureCount > failuresBefore)
                return migrated_report(error: failure, total: monotonicSeconds() - started, setup: 0, downtime: nil, wireBytes: 0,
                                       pages: 0, passes: 0, channels: 0, digest: "")
            }
        }
    }

    /// The channels of one incoming migration: accepted on the listener, or made of the VMM's sockets.
    private static func accept(_ plan: ChannelPlan, listener: Listener?) throws -> [MigrationChannel] {
        switch plan.route {
        case .address:
            return try MigrationNetwork.accept(from: listener!).channels
        case .sockets(let sockets):
            var next = 0
            return try IncomingChannels.collect(accept: {
                guard next < sockets.count else {
                    throw MigrationError.protocolViolation("the sender has more channels than the \(sockets.count) fds given")
                }
                defer { next += 1 }
                return try MigrationNetwork.adopt(socket: sockets[next].rawValue, security: plan.security, server: true).channel
            })
        }
    }
}

/// The channels of an incoming migration once accepted, so that a cancel can close them from another thread.
///
/// Sendable: `channels` is guarded by `lock`.
private final class ChannelSet: @unchecked Sendable {
    private let lock = NSLock()
    private var channels: [MigrationChannel] = []

    func set(_ accepted: [MigrationChannel]) { lock.withLock { channels = accepted } }
    func closeAll() { for channel in lock.withLock({ channels }) { channel.close() } }
}

/// Calls the VMM's progress function with the engine's progress.
///
/// Sendable: the VMM's progress function and opaque pointer, which migrated.h says are called on library threads.
struct ProgressReporter: @unchecked Sendable {
    // The VMM promises the function and its opaque pointer stay valid for the operation.
    let function: migrated_progress_fn?
    let opaque: UnsafeMutableRawPointer?

    init(_ function: migrated_progress_fn?, _ opaque: UnsafeMutableRawPointer?) {
        self.function = function
        self.opaque = opaque
    }

    func report(_ progress: MigrationProgress) {
        guard let function else { return }
        let phase: migrated_phase = switch progress.phase {
        case .setup: MIGRATED_PHASE_SETUP
        case .precopy: MIGRATED_PHASE_PRECOPY
        case .switchover: MIGRATED_PHASE_SWITCHOVER
        case .postcopy: MIGRATED_PHASE_POSTCOPY
        case .postcopyPaused: MIGRATED_PHASE_POSTCOPY_PAUSED
        case .completed: MIGRATED_PHASE_COMPLETED
        case .failed: MIGRATED_PHASE_FAILED
        case .cancelled: MIGRATED_PHASE_CANCELLED
        }
        var value = migrated_progress(
            phase: phase.rawValue, pass: UInt32(progress.pass), pages_done: UInt64(progress.pagesDone), pages_total: UInt64(progress.pagesTotal),
            bytes_on_wire: UInt64(progress.bytesOnWire), bandwidth: progress.bandwidth, dirty_rate: progress.dirtyRate,
            expected_downtime: progress.expectedDowntime.isFinite ? progress.expectedDowntime : -1, throttle: progress.throttle,
            elapsed: progress.elapsed)
        function(opaque, &value)
    }
}

extension migrated_report {
    /// A report as the C structure holds it; `error` nil for a success.
    init(error: CABIError?, total: Double, setup: Double, downtime: Double?, wireBytes: Int, pages: Int, passes: Int, channels: Int,
         harvests: Int = 0, harvestSeconds: Double = 0, digest: String) {
        self.init()
        abi_version = MIGRATED_ABI_VERSION
        self.error = Int32(error?.code.rawValue ?? MIGRATED_OK.rawValue)
        total_seconds = total
        setup_seconds = setup
        downtime_seconds = downtime ?? -1
        wire_bytes = UInt64(wireBytes)
        self.pages = UInt64(pages)
        self.passes = UInt32(passes)
        self.channels = UInt32(channels)
        self.harvests = UInt32(clamping: harvests)
        harvest_seconds = harvestSeconds
        withUnsafeMutableBytes(of: &message) { copyCString(error?.description ?? "", into: $0) }
        withUnsafeMutableBytes(of: &memory_digest) { copyCString(digest, into: $0) }
    }
}

/// Copies `text` into a fixed C array, NUL terminated, cut at a character boundary if it does not fit.
func copyCString(_ text: String, into buffer: UnsafeMutableRawBufferPointer) {
    let utf8 = Array(text.utf8)
    var length = min(utf8.count, buffer.count - 1)
    // Cut inside a character: the first byte left out continues it, so step back to its first byte.
    while length < utf8.count, length > 0, utf8[length] & 0xC0 == 0x80 { length -= 1 }
    buffer.copyBytes(from: utf8[..<length])
    buffer[length] = 0
}

// MARK: the exported functions

@_cdecl("migrated_migration_start_outgoing")
public func migrated_migration_start_outgoing(_ vm: OpaquePointer?, _ options: UnsafePointer<migrated_migration_options>?,
                                              _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    startMigration(vm, options, out, EmbeddedMigration.outgoing)
}

@_cdecl("migrated_migration_start_incoming")
public func migrated_migration_start_incoming(_ vm: OpaquePointer?, _ options: UnsafePointer<migrated_migration_options>?,
                                              _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    startMigration(vm, options, out, EmbeddedMigration.incoming)
}

/// Starts a migration of either direction and hands its handle out through `out` (NULL on failure).
private func startMigration(_ vm: OpaquePointer?, _ options: UnsafePointer<migrated_migration_options>?, _ out: UnsafeMutablePointer<OpaquePointer?>?,
                            _ start: (EmbeddedVM, migrated_migration_options) throws -> EmbeddedMigration) -> Int32 {
    boundary {
        let out = try required(out, "out")
        out.pointee = nil
        out.pointee = handle(of: try start(try object(vm, as: EmbeddedVM.self, "vm"), try required(options, "options").pointee))
    }
}

@_cdecl("migrated_migration_address")
public func migrated_migration_address(_ migration: OpaquePointer?, _ buffer: UnsafeMutablePointer<CChar>?, _ size: Int) -> Int32 {
    boundary {
        let migration = try object(migration, as: EmbeddedMigration.self, "migration")
        let buffer = try required(buffer, "buffer")
        guard let address = migration.address else { throw CABIError.state("this migration does not listen on an address") }
        guard address.utf8.count < size else { throw CABIError.invalid("the address needs \(address.utf8.count + 1) bytes; the buffer has \(size)") }
        copyCString(address, into: UnsafeMutableRawBufferPointer(start: buffer, count: size))
    }
}

@_cdecl("migrated_migration_cancel")
public func migrated_migration_cancel(_ migration: OpaquePointer?) -> Int32 {
    boundary { try object(migration, as: EmbeddedMigration.self, "migration").cancel() }
}

@_cdecl("migrated_migration_wait")
public func migrated_migration_wait(_ migration: OpaquePointer?, _ report: UnsafeMutablePointer<migrated_report>?) -> Int32 {
    var result: migrated_report?
    let status = boundary {
        let ended = try object(migration, as: EmbeddedMigration.self, "migration").wait()
        result = ended
        try ended.rethrow()
    }
    if let report, let result { report.pointee = result }
    return status
}

extension migrated_report {
    /// Throws the failure the report holds, so that the call returns its code and message.
    func rethrow() throws {
        guard error != Int32(MIGRATED_OK.rawValue) else { return }
        let words = withUnsafeBytes(of: message) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        throw CABIError(migrated_error(rawValue: UInt32(error)), words)
    }
}

@_cdecl("migrated_migration_free")
public func migrated_migration_free(_ migration: OpaquePointer?) {
    guard let migration else { return }
    Unmanaged<EmbeddedMigration>.fromOpaque(UnsafeRawPointer(migration)).takeUnretainedValue().finish()
    release(migration, as: EmbeddedMigration.self)
}
