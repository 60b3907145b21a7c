import Foundation
import KVMMigration
import Logging
import MicroVM
import MigratedAPI
import MigrationEngine
import MigrationNetwork
import MigrationWire
import Threads
import Transport

// The migration engine behind the daemon's seam (MigrationSeam.swift): outgoing migrations through
// `MigrationSender`, incoming ones through `MigrationReceiver`, both over `MigrationNetwork` channels.

/// The device-state component in which a daemon sends a VM's configuration along with its state, so that
/// the receiving daemon adopts it under the same id, image and command line.
enum DaemonComponent {
    static let vmConfiguration = DeviceComponent.vmmPrivateBase + 1
    static let version: UInt32 = 1
}

/// Outgoing live migrations, one per VM at a time, each on a thread of its own.
///
/// Sendable: `migrations` and the counters are guarded by `lock`.
public final class EngineMigrationService: MigrationService, @unchecked Sendable {
    private let logger: Logger
    private let lock = NSLock()
    private var migrations: [String: Migration] = [:]
    private var started = 0, succeeded = 0, failed = 0, inDoubt = 0
    private var bytesSent: UInt64 = 0
    /// Seconds a post-copy whose link broke waits for `resume(vm:)`.
    private let postCopyRecoveryTimeout: Double

    public init(logger: Logger, postCopyRecoveryTimeout: Double = DaemonConfiguration.defaultPostCopyRecoveryTimeout) {
        self.logger = logger
        self.postCopyRecoveryTimeout = postCopyRecoveryTimeout
    }

    /// One migration's sender, while it runs, and where it stands.
    final class Migration: Sendable {
        private struct State {
            /// Set until the run ends. The record outlives the run (its status is readable until the VM's next
            /// migration), and the sender holds the source VM (its KVM descriptors, vCPU state and guest memory) and
            /// its channels; the sender's progress callback also holds this record, so keeping the sender here would
            /// keep all of that for good.
            var sender: MigrationSender?
            var status: MigrationStatus
            /// While the post-copy waits for a resume: until when (`monotonicSeconds`).
            var pausedUntil: Double?
            /// Once the run failed before the switchover: the ticket under which the destination may keep what it received,
            /// and the guest's layout, which a message that drops it names.
            var resumable: (ticket: ResumeTicket, layout: GuestMemoryLayout)?
        }
        private let state: Locked<State>
        private let recoveryTimeout: Double
        /// What was asked, and the daemon's TLS identity then, for a resume that carries the migration on with the same
        /// settings (or tells the destination it will not).
        let request: MigrationRequest
        let tls: TLSFiles?

        init(sender: MigrationSender, request: MigrationRequest, tls: TLSFiles?, status: MigrationStatus, recoveryTimeout: Double) {
            state = Locked(State(sender: sender, status: status))
            self.request = request
            self.tls = tls
            self.recoveryTimeout = recoveryTimeout
        }

        /// The ticket of a run that failed before the switchover, once it has ended, and the guest's layout.
        var resumable: (ticket: ResumeTicket, layout: GuestMemoryLayout)? { state.withLock { $0.status.phase.isFinal ? $0.resumable : nil } }

        /// Forgets that the migration may be resumed: its destination dropped what it kept.
        func forgetResumable() {
            state.withLock {
                $0.resumable = nil
                $0.status.report?.resumable = nil
            }
        }

        var status: MigrationStatus {
            state.withLock { state in
                var status = state.status
                // The engine reports the pause once, as it begins; the seconds left are counted here.
                status.postcopyPause = state.pausedUntil.map { PostCopyPause(reason: nil, waitSecondsLeft: max(0, $0 - monotonicSeconds())) }
                return status
            }
        }

        /// Takes in the engine's progress report, and notes when a post-copy pause began.
        func update(_ progress: MigrationProgress) {
            state.withLock { state in
                state.status.apply(progress)
                if state.status.phase != .postcopyPaused {
                    state.pausedUntil = nil
                } else if state.pausedUntil == nil {
                    state.pausedUntil = monotonicSeconds() + recoveryTimeout
                }
            }
        }

        /// Hands a paused post-copy back to its sender, which reconnects to the same destination; false when the
        /// migration does not wait for a resume.
        func resume() -> Bool {
            state.withLock { state in
                guard state.status.phase == .postcopyPaused, let sender = state.sender, sender.resume(with: nil) else { return false }
                // The sender reconnects and carries on; its next report says how post-copy goes.
                state.status.phase = .postcopy
                state.pausedUntil = nil
                return true
            }
        }

        /// Asks the running sender to stop; nothing once the run has ended.
        func cancel() { state.withLock { $0.sender }?.cancel() }

        /// Records the final status and the ticket of a resumable failure, and lets go of the sender.
        func finish(resumable: (ticket: ResumeTicket, layout: GuestMemoryLayout)?, _ change: (inout MigrationStatus) -> Void) {
            state.withLock {
                $0.resumable = resumable
                change(&$0.status)
                $0.sender = nil
                $0.pausedUntil = nil
            }
        }
    }

    /// How `request` connects to its peer, and the engine's options for it.
    /// With `resumeTicket`, the migration resumes the pre-copy that left memory at the destination under it.
    private func plan(_ vm: OutgoingVM, _ request: MigrationRequest, resumeTicket: ResumeTicket? = nil) throws(ControlError)
        -> (connect: @Sendable (Int) throws -> MigrationChannel, options: MigrationOptions) {
        let connect = try Self.connection(for: request, tls: vm.tls)
        var options = MigrationOptions()
        options.channels = request.channels
        options.compression = MigrationOptions.Compression(rawValue: request.compression.rawValue) ?? .lz4
        options.downtimeLimit = Double(request.downtimeLimitMs) / 1000
        options.bandwidthLimit = request.bandwidthLimitBytesPerSecond.map { Double($0) }
        options.autoConverge = request.autoConverge
        options.postCopy = request.postcopy
        options.postCopyAfterPasses = request.postcopyAfterPasses
        options.postCopyRecoveryTimeout = postCopyRecoveryTimeout
        options.resumeTicket = resumeTicket
        return (connect, options)
    }

    /// How `request` connects to its peer: each call opens one connection, with the daemon's `tls` identity if it asks.
    private static func connection(for request: MigrationRequest, tls: TLSFiles?) throws(ControlError) -> @Sendable (Int) throws -> MigrationChannel {
        guard let peer = PeerAddress(request.peer) else { throw .badRequest("peer '\(request.peer)' is not an address") }
        let endpoint = Endpoint(peer)
        let security: Security
        switch request.security {
        case .plaintext: security = .plaintext
        case .tls:
            guard let tls else { throw .unprocessable("tls_not_configured", "this daemon has no TLS identity; configure one or ask for plaintext") }
            security = .tls(TLSConfiguration(caFile: tls.ca, certificateFile: tls.certificate, keyFile: tls.key, allowedPeerNames: tls.allowedPeers))
        }
        return { _ in try MigrationNetwork.connect(to: endpoint, security: security) }
    }

    /// With `request.resume`, carries on the VM's last migration, which failed before the switchover
    /// (`resumablePreCopy(of:)` gave `request`): its destination may still hold what it received.
    public func startMigration(of vm: OutgoingVM, request: MigrationRequest) async throws(ControlError) -> MigrationStatus {
        let ticket = request.resume ? lock.withLock { migrations[vm.id]?.resumable?.ticket } : nil
        let (connect, options) = try plan(vm, request, resumeTicket: ticket)
        let source = ConfiguredGuestSource(MicroVMGuestSource(machine: vm.machine), configuration: vm.configuration)
        let sender = MigrationSender(source: source, options: options, openChannel: connect)
        let migration = Migration(sender: sender, request: request, tls: vm.tls, status: MigrationStatus(vm: vm.id, peer: request.peer, phase: .setup),
                                  recoveryTimeout: postCopyRecoveryTimeout)
        let busyWith: String? = lock.withLock {
            if let running = migrations[vm.id], !running.status.phase.isFinal { return running.status.peer }
            migrations[vm.id] = migration
            started += 1
            return nil
        }
        if let busyWith { throw .conflict("migration_in_progress", "VM '\(vm.id)' is already migrating to \(busyWith)") }
        let (logger, wait) = (self.logger, postCopyRecoveryTimeout)
        sender.onProgress = { progress in
            if progress.phase == .postcopyPaused, migration.status.phase != .postcopyPaused {
                logger.error("post-copy link broke; the VM stays paused here, waiting for a resume (migratectl migrate VM --resume)",
                             metadata: ["vm": "\(vm.id)", "peer": "\(request.peer)", "wait_seconds": "\(wait)"])
            }
            migration.update(progress)
        }
        logger.info("migration started", metadata: ["vm": "\(vm.id)", "peer": "\(request.peer)", "channels": "\(request.channels)",
                                                    "postcopy": "\(request.postcopy)", "resumes_precopy": "\(ticket != nil)"])
        startThread(named: "migrate-\(vm.id)") { [self] in
            let report = sender.run()
            let doubt = report.committed && !report.succeeded ? MigrationInDoubt(peer: request.peer, failure: report.error ?? "") : nil
            // The VM's state first, then the migration's final phase: a client that sees the phase final finds the
            // VM as the migration left it.
            if report.succeeded {
                vm.handOff(request.peer)
            } else if let doubt {
                vm.leaveInDoubt(doubt)
            }
            migration.finish(resumable: report.resumeTicket.map { ($0, source.layout) }) { $0.finish(report, compression: request.compression, inDoubt: doubt) }
            lock.withLock {
                if report.succeeded { succeeded += 1 } else if doubt != nil { inDoubt += 1 } else { failed += 1 }
                bytesSent += UInt64(report.wireBytes)
            }
            if report.succeeded {
                logger.info("migration completed", metadata: ["vm": "\(vm.id)", "downtime_ms": "\((report.downtimeSeconds ?? 0) * 1000)",
                                                              "postcopy_missing_pages": "\(report.postCopy?.missingPages ?? 0)"])
            } else if let doubt {
                logger.error("migration in doubt; the VM stays paused here", metadata: ["vm": "\(vm.id)", "reason": "\(doubt.reason)"])
            } else {
                logger.warning("migration failed; the VM runs here as before", metadata: ["vm": "\(vm.id)", "error": "\(report.error ?? "")",
                                                                                        "resumable": "\(report.resumeTicket != nil)"])
            }
            if let resumed = report.resumedPreCopy, !resumed.resumed {
                logger.notice("the migration could not resume the broken one; it sent all of memory", metadata: ["vm": "\(vm.id)", "reason": "\(resumed.reason ?? "")"])
            }
        }
        return migration.status
    }

    /// Samples the guest's dirty log and probes the link to the peer on a thread of its own (it takes about a second),
    /// then predicts (ConvergenceDryRun).
    public func predictMigration(of vm: OutgoingVM, request: MigrationRequest) async throws(ControlError) -> MigrationPrediction {
        let (connect, options) = try plan(vm, request)
        let source = MicroVMGuestSource(machine: vm.machine)
        let result: Result<DryRunResult, any Error> = await withCheckedContinuation { continuation in
            startThread(named: "dry-run-\(vm.id)") {
                continuation.resume(returning: Result { try ConvergenceDryRun.run(source: source, options: options, openChannel: connect) })
            }
        }
        switch result {
        case .success(let dryRun):
            let prediction = MigrationPrediction(dryRun, vm: vm.id, request: request)
            logger.info("dry run", metadata: ["vm": "\(vm.id)", "peer": "\(request.peer)", "converges": "\(prediction.converges)",
                                              "total_s": "\(prediction.totalSeconds)", "downtime_ms": "\(prediction.downtimeMs ?? -1)"])
            return prediction
        case .failure(let error):
            throw ControlError(502, "dry_run_failed", "the dry run could not measure the guest or the link to \(request.peer): \(error)")
        }
    }

    public func status(ofVM id: String) async throws(ControlError) -> MigrationStatus {
        guard let migration = lock.withLock({ migrations[id] }) else { throw Self.noMigration(id) }
        return migration.status
    }

    public func resumablePreCopy(of id: String) async -> MigrationRequest? {
        lock.withLock { migrations[id].flatMap { $0.resumable != nil ? $0.request : nil } }
    }

    public func discardKeptMemory(vm id: String) async throws(ControlError) -> MigrationStatus {
        guard let migration = lock.withLock({ migrations[id] }), let (ticket, layout) = migration.resumable else { throw nothingToResume(id) }
        let request = migration.request
        let connect = try Self.connection(for: request, tls: migration.tls)
        let result: Result<Bool, any Error> = await withCheckedContinuation { continuation in
            startThread(named: "discard-\(id)") {
                continuation.resume(returning: Result { try MigrationSender.discardKeptMemory(under: ticket, layout: layout, openChannel: connect) })
            }
        }
        switch result {
        case .success(let told):
            migration.forgetResumable()
            logger.notice("told the destination to drop what it kept of the broken migration", metadata: ["vm": "\(id)", "peer": "\(request.peer)",
                                                                                                         "destination_kept_memory": "\(told)"])
            return migration.status
        case .failure(let error):
            throw ControlError(502, "destination_unreachable", "could not tell \(request.peer) to drop what it kept: \(error)")
        }
    }

    public func resume(vm id: String) async throws(ControlError) -> MigrationStatus {
        guard let migration = lock.withLock({ migrations[id] }), migration.resume() else { throw nothingToResume(id) }
        logger.notice("post-copy resumed: reconnecting to the destination", metadata: ["vm": "\(id)", "peer": "\(migration.status.peer)"])
        return migration.status
    }

    public func cancel(vm id: String) async throws(ControlError) -> MigrationStatus {
        guard let migration = lock.withLock({ migrations[id] }) else { throw Self.noMigration(id) }
        migration.cancel()
        return migration.status
    }

    public func metrics() async -> String {
        let (started, succeeded, failed, inDoubt, bytes, active) = counters()
        return """
        # HELP migrated_migrations_started_total Outgoing live migrations started.
        # TYPE migrated_migrations_started_total counter
        migrated_migrations_started_total \(started)
        # HELP migrated_migrations_completed_total Outgoing live migrations by outcome.
        # TYPE migrated_migrations_completed_total counter
        migrated_migrations_completed_total{outcome="succeeded"} \(succeeded)
        migrated_migrations_completed_total{outcome="failed"} \(failed)
        migrated_migrations_completed_total{outcome="in_doubt"} \(inDoubt)
        # HELP migrated_migrations_active Outgoing live migrations in progress.
        # TYPE migrated_migrations_active gauge
        migrated_migrations_active \(active)
        # HELP migrated_migration_wire_bytes_total Bytes sent on the wire by finished outgoing migrations.
        # TYPE migrated_migration_wire_bytes_total counter
        migrated_migration_wire_bytes_total \(bytes)

        """
    }

    private func counters() -> (started: Int, succeeded: Int, failed: Int, inDoubt: Int, bytes: UInt64, active: Int) {
        lock.withLock {
            (started, succeeded, failed, inDoubt, bytesSent, migrations.values.filter { !$0.status.phase.isFinal }.count)
        }
    }

    static func noMigration(_ id: String) -> ControlError {
        ControlError(404, "no_migration", "VM '\(id)' has not been migrated from this daemon")
    }
}

extension MigrationStatus {
    /// Takes in the engine's progress report.
    mutating func apply(_ progress: MigrationProgress) {
        // A final phase comes with the report (`finish`): a client that sees the migration completed, failed or
        // cancelled must find its report too.
        if let next = MigrationPhase(rawValue: progress.phase.rawValue), !next.isFinal { phase = next }
        pass = progress.pass
        // A paused post-copy keeps showing how far it had come.
        if progress.phase != .postcopyPaused {
            percent = progress.pagesTotal > 0 ? 100 * Double(progress.pagesDone) / Double(progress.pagesTotal) : percent
        }
        bytesOnWire = UInt64(progress.bytesOnWire)
        rateBytesPerSecond = progress.bandwidth
        dirtyRateBytesPerSecond = progress.dirtyRate
        expectedDowntimeMs = progress.expectedDowntime.isFinite ? progress.expectedDowntime * 1000 : 0
        throttle = progress.throttle
        elapsedSeconds = progress.elapsed
        // The engine's prediction, made again after every pass; until pass 0 ends there is none, and the rest of
        // pass 0 at its pace so far is the best there is (later passes are small when the guest converges).
        etaSeconds = progress.predictedSecondsLeft ?? progress.passSecondsLeft
        predictedDowntimeMs = progress.predictedDowntime.map { $0 * 1000 }
    }

    /// Takes in the engine's final report; a migration `inDoubt` gives that as its error.
    mutating func finish(_ report: MigrationReport, compression: MigrationCompression, inDoubt: MigrationInDoubt? = nil) {
        phase = report.succeeded ? .completed : (report.error == "\(MigrationError.cancelled)" ? .cancelled : .failed)
        if report.succeeded { percent = 100 }
        etaSeconds = nil
        elapsedSeconds = report.totalSeconds
        bytesOnWire = UInt64(report.wireBytes)
        self.report = MigrationReportDocument(
            succeeded: report.succeeded, error: inDoubt?.reason ?? report.error, committed: report.committed, totalSeconds: report.totalSeconds,
            setupSeconds: report.setupSeconds, downtimeMs: report.downtimeSeconds.map { $0 * 1000 },
            wireBytes: UInt64(report.wireBytes), pagesSent: UInt64(report.pagesSent), compression: compression,
            channels: report.channels,
            passes: report.passes.map { pass in
                MigrationReportDocument.Pass(
                    pass: pass.pass, pagesSent: UInt64(pass.pagesSent), zeroPages: UInt64(pass.zeroPages),
                    compressedPages: UInt64(pass.compressedPages), unchangedPages: UInt64(pass.unchangedPages),
                    wireBytes: UInt64(pass.wireBytes), seconds: pass.seconds,
                    dirtyRateBytesPerSecond: pass.dirtyRate, rateBytesPerSecond: pass.bandwidth,
                    expectedDowntimeMs: pass.expectedDowntime.isFinite ? pass.expectedDowntime * 1000 : 0, throttle: pass.throttle)
            },
            postCopy: report.postCopy.map {
                MigrationReportDocument.PostCopy(missingPages: UInt64($0.missingPages), requestedPages: UInt64($0.requestedPages),
                                                 requests: UInt64($0.requests), wireBytes: UInt64($0.wireBytes), seconds: $0.seconds)
            },
            resumable: report.resumeTicket != nil ? true : nil,
            resumedPrecopy: report.resumedPreCopy.map { .init(resumed: $0.resumed, heldPages: UInt64($0.heldPages), reason: $0.reason) },
            lostChannels: report.lostChannels.isEmpty ? nil
                : report.lostChannels.map { MigrationReportDocument.LostChannel(channel: $0.channel, pass: $0.pass, reason: $0.reason) })
    }
}

extension MigrationPrediction {
    /// The API's account of a dry run of `request`.
    init(_ dryRun: DryRunResult, vm: String, request: MigrationRequest) {
        let m = dryRun.measurements
        let p = dryRun.prediction
        let channels = "\(request.channels) \(request.security == .tls ? "TLS" : "plaintext") channel\(request.channels == 1 ? "" : "s")"
        var link = "a probe: \(Formatting.bytes(Double(dryRun.probePages * 4096))) of copies of the guest's pages sent to \(request.peer) "
            + "over \(channels), \(request.compression.rawValue), in \(Formatting.seconds(dryRun.probeSeconds)) after a setup of "
            + "\(Formatting.seconds(dryRun.probeSetupSeconds))"
        if let cap = request.bandwidthLimitBytesPerSecond { link += ", capped at \(Formatting.bytes(Double(cap)))/s" }
        let last = p.passes.last
        self.init(vm: vm, peer: request.peer, sampleSeconds: dryRun.sample.windows.last?.seconds ?? 0,
                  dirtyRateBytesPerSecond: m.dirty.bytesPerSecond,
                  dirtyWindows: dryRun.sample.windows.map { DirtyWindow(seconds: $0.seconds, bytes: UInt64($0.pages) * 4096) },
                  link: link, rateBytesPerSecond: m.pagesPerSecond * 4096, wireBytesPerPage: m.wireBytesPerPage,
                  dataBytes: UInt64(m.dataPages) * 4096, setupSeconds: m.setupSeconds, assumedSwitchoverMs: m.switchoverSeconds * 1000,
                  converges: p.converges, reason: p.failure, totalSeconds: p.totalSeconds, downtimeMs: p.downtimeSeconds.map { $0 * 1000 },
                  passes: p.passes.map { PredictedPass(pass: $0.pass, pages: UInt64($0.pages), seconds: $0.seconds,
                                                       dirtyPages: UInt64($0.dirtyPages), throttle: $0.throttle) },
                  finalPages: UInt64(p.converges ? p.finalPages : last?.dirtyPages ?? 0), throttle: p.throttle)
    }
}

/// A MicroVM source whose device state also carries the daemon's configuration of the VM.
final class ConfiguredGuestSource: GuestSource {
    private let base: MicroVMGuestSource
    private let configuration: VMCreateRequest

    init(_ base: MicroVMGuestSource, configuration: VMCreateRequest) {
        self.base = base
        self.configuration = configuration
    }

    var layout: GuestMemoryLayout { base.layout }
    func page(frame: UInt64) -> UnsafeRawPointer { base.page(frame: frame) }
    func forEachPopulatedFrame(_ visit: (UInt64) -> Void) throws { try base.forEachPopulatedFrame(visit) }
    func startDirtyTracking() throws { try base.startDirtyTracking() }
    func harvestDirtyFrames(_ visit: (UInt64) -> Void) throws { try base.harvestDirtyFrames(visit) }
    func stopDirtyTracking() throws { try base.stopDirtyTracking() }
    func pause() throws { try base.pause() }
    func resume() { base.resume() }
    func setThrottle(_ fraction: Double) { base.setThrottle(fraction) }

    func captureDeviceState() throws -> [DeviceState] {
        let json = try APIJSON.encode(configuration)
        return try base.captureDeviceState() + [DeviceState(componentID: DaemonComponent.vmConfiguration, instance: 0,
                                                            componentVersion: DaemonComponent.version, blob: ByteSlice(json))]
    }
}

/// A MicroVM sink that also reads the daemon's configuration of the VM from its device state. With a desk (an
/// incoming migration), room for the guest is reserved in the daemon's memory budget before its memory is made,
/// and given back if it does not arrive; the guest is registered with the desk as it starts, since in post-copy it
/// runs long before the receiver returns.
///
/// Sendable under the `GuestSink` thread contract: `reservedBytes`, `configuration` and `registration` change in the
/// control calls alone, and are read on the receiver's thread once it has returned, or by the listener once it has
/// resumed a paused post-copy: the receiver began to wait (the lock of its resume point orders the two) after the guest
/// had started, and so after they were set.
final class ConfiguredGuestSink: GuestSink, @unchecked Sendable {
    let base: MicroVMGuestSink
    private let desk: (any ArrivalDesk)?
    private var reservedBytes: UInt64 = 0
    /// The most memory this arrival ever reserved, for its record.
    private(set) var reservedAtMost: UInt64 = 0
    private(set) var configuration: VMCreateRequest?
    /// Set when the guest started: the id the desk registered it under, or why it could not.
    private(set) var registration: Result<String, ControlError>?
    /// The sending host, for the desk.
    private let peer: String
    /// A test hook that ends the daemon at its point of the switchover, with the logger that says so.
    /// A test hook, with the logger it reports to and the migration's connections (which one hook closes).
    private let fault: (FaultInjection, Logger, [MigrationChannel])?

    init(_ base: MicroVMGuestSink, desk: (any ArrivalDesk)? = nil, peer: String = "", fault: (FaultInjection, Logger, [MigrationChannel])? = nil) {
        self.base = base
        self.desk = desk
        self.peer = peer
        self.fault = fault
    }

    func prepare(layout: GuestMemoryLayout) throws {
        if let desk {
            try desk.reserveArrival(memory: layout.totalBytes)
            reservedBytes = layout.totalBytes
            reservedAtMost = layout.totalBytes
        }
        do { try base.prepare(layout: layout) } catch {
            cancelReservation()
            throw error
        }
    }

    /// Gives the reservation back; the guest did not arrive.
    func cancelReservation() {
        if reservedBytes > 0 { desk?.cancelArrival(memory: reservedBytes) }
        reservedBytes = 0
    }

    /// Registers the guest with the desk under its reservation, once; returns the registration.
    @discardableResult
    func register() -> Result<String, ControlError> {
        if let registration { return registration }
        let result = Result { () throws(ControlError) -> String in
            guard let desk, let machine = base.machine, let configuration else {
                throw ControlError(500, "internal", "the received guest has no machine or configuration")
            }
            reservedBytes = 0
            return try desk.adoptArrival(IncomingVM(machine: machine, configuration: configuration, peer: peer))
        }
        registration = result
        return result
    }

    /// Tells the desk that the post-copy waits for a resume, or (nil) carries on.
    func notePause(_ pause: PostCopyPause?) {
        guard case .success(let id) = registration, let desk, let machine = base.machine else { return }
        desk.notePostCopyPause(id: id, machine: machine, pause)
    }

    /// Tells the desk that the migration has ended; with `failure`, after the guest had started, which the desk stops.
    func endArrival(failure: String?) {
        guard case .success(let id) = registration, let desk, let machine = base.machine else { return }
        desk.endArrival(id: id, machine: machine, failure: failure)
    }
    func page(frame: UInt64) -> UnsafeMutableRawPointer { base.page(frame: frame) }
    func write(frames first: UInt64, pages: UnsafeBufferPointer<UnsafeRawPointer>) throws { try base.write(frames: first, pages: pages) }
    func zero(frames first: UInt64, count: Int) throws { try base.zero(frames: first, count: count) }
    var takesPagesInPlace: Bool { base.takesPagesInPlace }
    var takesPostCopy: Bool { base.takesPostCopy }

    /// Called on COMMIT, before STARTED is answered.
    func start() throws {
        if let (fault, logger, _) = fault, fault == .exitAfterCommit { fault.strike(logger) }
        try base.start()
        // The guest runs from here: the daemon lists it and counts its memory at once. In post-copy the receiver goes
        // on for as long as pages are missing; a failure to register is reported when it returns.
        if desk != nil { register() }
        if let (fault, logger, channels) = fault, fault == .closeBeforeStarted {
            logger.critical("fault injection: the guest runs; closing the migration's connections before STARTED", metadata: ["fault": "\(fault.rawValue)"])
            for channel in channels { channel.close() }
        }
    }

    /// The receiver discards a guest it started only in post-copy, when the pages it lacked will not come: the daemon
    /// stops it as failed (its vCPUs may have read zeros where pages were missing) before its memory goes.
    func discard() {
        endArrival(failure: "its migration from \(peer) failed after the guest had started here (in post-copy, with pages still "
            + "missing); see GET /migrations/incoming")
        base.discard()
        cancelReservation()
    }

    func restore(deviceState: [DeviceState]) throws {
        let configurations = deviceState.filter { $0.componentID == DaemonComponent.vmConfiguration }
        guard configurations.count == 1, configurations[0].componentVersion <= DaemonComponent.version else {
            throw MicroVMError.invalidConfiguration("expected one VM configuration of version \(DaemonComponent.version) in the device state")
        }
        configuration = try APIJSON.decode(VMCreateRequest.self, from: Data(configurations[0].blob.bytes))
        try base.restore(deviceState: deviceState)
        // The receiver restores the device state after the digest check, just before it answers VERIFIED.
        if let (fault, logger, _) = fault, fault == .exitBeforeVerified { fault.strike(logger) }
    }
}

/// Incoming live migrations: a listener on the configured address; each migration is received on a thread of
/// its own and the VM adopted by the daemon once it runs.
///
/// Sendable: `listener` and `leftovers` are guarded by `lock`; `refusals` and `receiving` are Sendable.
public final class EngineIncomingListener: IncomingMigrationListener, @unchecked Sendable {
    private let logger: Logger
    private let refusals = RefusalLog()
    private let lock = NSLock()
    private var listener: Listener?
    /// The memory of pre-copies whose links broke, kept for their resumes (none when the grace period is 0).
    private var leftovers: PreCopyLeftoverShelf?
    private let fault: FaultInjection?
    /// The migrations being received, by their receiver, with the peer they come from: a complete group of
    /// connections from the same peer with the migration ID of one of them resumes its post-copy.
    private let receiving = Locked<[ObjectIdentifier: Receiving]>([:])
    private struct Receiving {
        var peer: String, receiver: MigrationReceiver, given: ConfiguredGuestSink
        /// The guest's sink: the one given, or that of the pre-copy the migration resumed.
        var sink: ConfiguredGuestSink { receiver.sink as? ConfiguredGuestSink ?? given }
        /// The post-copy's pauses as the receiver announced them, and the resumes it took. Each resume ends one pause,
        /// but the receiver announces a pause after it can take the resume: the VM is marked paused while the pauses
        /// outnumber the resumes, whatever the order of the two.
        var pauses = 0, resumes = 0
        var lastPause: (reason: String, until: Double)?

        /// Tells the desk whether the post-copy waits now. Called under `receiving`'s lock, so that marks come in order.
        func mark() {
            let waiting = pauses > resumes ? lastPause : nil
            sink.notePause(waiting.map { PostCopyPause(reason: $0.reason, waitSecondsLeft: max(0, $0.until - monotonicSeconds())) })
        }
    }

    /// `fault` arms a test hook (FaultInjection) in every migration this listener receives.
    public init(logger: Logger, fault: FaultInjection? = nil) {
        self.logger = logger
        self.fault = fault
    }

    /// Where the listener listens, with the port the kernel chose when port 0 was asked for.
    public var address: PeerAddress? {
        lock.withLock { listener?.endpoint.address }
    }

    public func start(_ settings: IncomingMigrationSettings, desk: any ArrivalDesk) throws {
        let endpoint = Endpoint(settings.address)
        let security: Security = switch settings.security {
        case .plaintext: .plaintext
        case .tls(let tls): .tls(TLSConfiguration(caFile: tls.ca, certificateFile: tls.certificate, keyFile: tls.key, allowedPeerNames: tls.allowedPeers))
        }
        let listener = try Listener(endpoint: endpoint, security: security)
        let shelf = settings.preCopyResumeGrace > 0 ? PreCopyLeftoverShelf(gracePeriod: settings.preCopyResumeGrace) : nil
        lock.withLock {
            self.listener = listener
            leftovers = shelf
        }
        logger.info("listening for migrations", metadata: ["address": "\(listener.endpoint)"])
        startThread(named: "migrate-listen") { [self] in acceptLoop(listener, settings: settings, desk: desk) }
    }

    public func stop() {
        let shelf = lock.withLock {
            listener?.close()
            listener = nil
            defer { leftovers = nil }
            return leftovers
        }
        shelf?.discardAll()
    }

    /// Accepts connections and hands them to a gatherer, which runs their TLS handshakes and reads their headers
    /// on threads of their own and groups them into migrations (stream.md §10.5): a peer that stalls holds up
    /// nobody else, and concurrent migrations are received side by side, each on a thread of its own.
    private func acceptLoop(_ listener: Listener, settings: IncomingMigrationSettings, desk: any ArrivalDesk) {
        let gatherer = ChannelGatherer(ready: { [self] channels, peer in
            if resumePaused(channels, from: peer) { return }
            startThread(named: "migrate-receive") { [self] in receive(channels, from: peer, settings: settings, desk: desk) }
        }, refused: { [logger, refusals] peer, reason in
            guard case .log(let suppressed) = refusals.verdict(for: peer) else { return }
            logger.warning("incoming migration refused; more refusals of this peer in the next \(Int(refusals.window)) s are not logged",
                           metadata: ["peer": "\(peer)", "error": "\(reason)", "refused_unlogged_before": "\(suppressed)"])
        })
        while lock.withLock({ self.listener === listener }) {
            do {
                let connection = try listener.acceptConnection()
                gatherer.add(from: connection.peerHost) { try MigrationNetwork.establish(connection) }
            } catch {
                guard lock.withLock({ self.listener === listener }) else { continue }
                if case .log(let suppressed) = refusals.verdict(for: "accept") {
                    logger.warning("accepting an incoming connection failed", metadata: ["error": "\(error)", "failed_unlogged_before": "\(suppressed)"])
                }
                // Out of descriptors, say: the failure repeats until connections close, so do not spin on it.
                Thread.sleep(forTimeInterval: 0.01)
            }
        }
    }

    /// Hands `channels` to the post-copy they resume, if a migration from `peer` with their migration ID is being
    /// received; true when they were taken, or closed because that post-copy does not wait for them.
    private func resumePaused(_ channels: [MigrationChannel], from peer: String) -> Bool {
        guard let migrationID = IncomingChannels.migrationID(of: channels) else { return false }
        func find() -> Receiving? {
            receiving.withLock { $0.values.first { $0.peer == peer && $0.receiver.migrationID == migrationID } }
        }
        guard let (receiver, sink) = find().map({ ($0.receiver, $0.sink) }) else { return false }
        let key = ObjectIdentifier(receiver)
        // The source may have seen the link break a moment before this side: its receiver is then about to wait.
        // This runs on the group's own gathering thread, which may wait that moment.
        let deadline = monotonicSeconds() + 10
        while !receiver.resume(with: channels) {
            guard monotonicSeconds() < deadline, find()?.receiver === receiver else {
                for channel in channels { channel.close() }
                logger.warning("connections resuming a post-copy that does not wait for a resume are closed",
                               metadata: ["peer": "\(peer)", "migration_id": "\(migrationID)"])
                return true
            }
            usleep(10_000)
        }
        receiving.withLock {
            $0[key]?.resumes += 1
            $0[key]?.mark()
        }
        logger.notice("post-copy resumed by its source", metadata: ["peer": "\(peer)", "migration_id": "\(migrationID)",
                                                                   "vm": "\(sink.configuration?.id ?? "-")"])
        return true
    }

    private func receive(_ channels: [MigrationChannel], from peer: String, settings: IncomingMigrationSettings, desk: any ArrivalDesk) {
        logger.info("incoming migration", metadata: ["peer": "\(peer)", "channels": "\(channels.count)"])
        let given = ConfiguredGuestSink(MicroVMGuestSink(console: SerialConsole(output: nil), memoryBacking: settings.memoryBacking), desk: desk,
                                        peer: peer, fault: fault.map { ($0, logger, channels) })
        let receiver = MigrationReceiver(sink: given, channels: channels, leftoverShelf: lock.withLock { leftovers }, peer: peer)
        /// The guest's sink: the one made here, or that of the broken pre-copy this migration resumes (known once the
        /// receiver has read the sender's ticket, before any page).
        var sink: ConfiguredGuestSink { receiver.sink as? ConfiguredGuestSink ?? given }
        func record(_ outcome: IncomingOutcome, vm: String?, error: String?, postCopy: IncomingPostCopy? = nil) {
            desk.recordArrival(IncomingMigrationRecord(peer: peer, vm: vm, outcome: outcome, error: error, memoryBytes: sink.reservedAtMost,
                                                       finishedAt: ISO8601DateFormatter().string(from: Date()), postCopy: postCopy))
        }
        do {
            receiver.postCopyRecoveryTimeout = settings.postCopyRecoveryTimeout
            let key = ObjectIdentifier(receiver)
            // The receiver keeps this closure: it reaches the guest's sink through `receiving`, never through the receiver
            // itself (`sink` would hold it, and the two would keep each other, their connections and the guest's memory).
            receiver.onPostCopyPaused = { [logger, receiving] reason, seconds in
                let vm = receiving.withLock { entries in
                    entries[key]?.pauses += 1
                    entries[key]?.lastPause = (reason, monotonicSeconds() + seconds)
                    entries[key]?.mark()
                    return entries[key]?.sink.configuration?.id
                }
                logger.error("post-copy link broke; the arriving guest runs, its threads that touch missing pages wait for the source to resume",
                             metadata: ["peer": "\(peer)", "vm": "\(vm ?? "-")", "reason": "\(reason)", "wait_seconds": "\(seconds)"])
            }
            receiving.withLock { $0[key] = Receiving(peer: peer, receiver: receiver, given: given) }
            defer { receiving.withLock { $0[key] = nil } }
            let report = try receiver.run()
            if let dropped = report.droppedKeptMemory {
                logger.notice("the source will not resume its broken migration; what arrived of it is dropped",
                              metadata: ["peer": "\(peer)", "kept_memory": "\(dropped)"])
                return
            }
            let postCopy = report.postCopySeconds.map {
                IncomingPostCopy(missingPages: UInt64(report.postCopyPages), requestedPages: UInt64(report.postCopyRequests), seconds: $0)
            }
            do {
                // Registered when it started (a receiver that returns without starting it leaves that to here).
                let id = try sink.register().get()
                sink.endArrival(failure: nil)
                logger.info("migration received; VM runs here", metadata: ["vm": "\(id)", "peer": "\(peer)", "pages": "\(report.pagesWritten)",
                                                                         "postcopy_missing_pages": "\(report.postCopyPages)",
                                                                         "resumed_precopy_pages": "\(report.resumedFromPages ?? 0)"])
                if let afterStart = report.afterStart {
                    // The source may not have heard that the guest started here: it then shows the VM in doubt,
                    // and its operator must find it here before deciding anything there.
                    logger.warning("the source may not know that the VM runs here: the stream broke after the start",
                                   metadata: ["vm": "\(id)", "peer": "\(peer)", "error": "\(afterStart)"])
                }
                record(.received, vm: id, error: report.afterStart, postCopy: postCopy)
            } catch {
                // The guest runs and its source is gone: stopping it would lose it, so keep it and say so loudly.
                logger.error("received VM runs but could not be registered", metadata: ["peer": "\(peer)", "error": "\(error)"])
                record(.received, vm: nil, error: "runs but could not be registered: \(error)", postCopy: postCopy)
            }
        } catch {
            if receiver.keptForResume {
                // Never started; its memory (and the budget's reservation for it) waits for the source's resume.
                let grace = settings.preCopyResumeGrace
                logger.warning("incoming migration failed before the switchover; what arrived is kept for a resume",
                               metadata: ["peer": "\(peer)", "vm": "\(sink.configuration?.id ?? "-")", "error": "\(error)", "keep_seconds": "\(grace)"])
                record(.failed, vm: sink.configuration?.id, error: "\(error); what arrived is kept \(Int(grace)) s for its source to resume from")
                return
            }
            // The receiver discarded the guest (its memory is unmapped); the budget gets its reservation back.
            sink.cancelReservation()
            if case .success(let id) = sink.registration {
                // Only in post-copy: the guest ran here, and the desk stopped it when the receiver discarded it.
                logger.error("incoming migration failed in post-copy; the guest had started here and was stopped, its memory is freed",
                             metadata: ["peer": "\(peer)", "vm": "\(id)", "error": "\(error)"])
                record(.failed, vm: id, error: "the guest had started here and was stopped: \(error)")
            } else {
                logger.warning("incoming migration failed; nothing was started here, its memory is freed",
                               metadata: ["peer": "\(peer)", "vm": "\(sink.configuration?.id ?? "-")", "error": "\(error)"])
                record(.failed, vm: sink.configuration?.id, error: "\(error)")
            }
        }
    }
}
