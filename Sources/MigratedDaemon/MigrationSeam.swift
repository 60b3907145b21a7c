import MicroVM
import MigratedAPI

// The seam where the migration engine plugs into the daemon. The daemon owns the control API, the VMs and the
// configuration; the engine owns everything that crosses the network. Two protocols divide the work:
//
// - MigrationService: the outgoing side, behind POST /vms/{id}/migrate, GET /vms/{id}/migration and
//   POST /vms/{id}/migration/cancel. The daemon has already checked that the VM exists and runs, that the request
//   is well formed, and that TLS is configured when the request asks for it.
// - IncomingMigrationListener: the incoming side, started at daemon start when the configuration has an
//   `incoming` section, already validated.
//
// EngineMigration.swift implements both with the migration engine; tests may put scripted ones in their place.

/// A running VM handed to a migration, and the way back into the daemon once it has moved.
public struct OutgoingVM: Sendable {
    public let id: String
    public let machine: MicroVM
    /// What the VM was started with: the static configuration to send to the peer (the peer adopts it under
    /// the same id when it is free there).
    public let configuration: VMCreateRequest
    /// The daemon's TLS identity, for `request.security == .tls` (the daemon guarantees it is set then).
    public let tls: TLSFiles?
    /// Call once the destination has started the VM after the digest check: the daemon stops the source (this
    /// joins its vCPU threads, so it blocks for a moment) and shows the VM as `migrated` (to `peer`). Before
    /// that, on any failure, leave the VM running (resumed, unthrottled) and do not call it.
    public let handOff: @Sendable (_ peer: String) -> Void
    /// Call instead of `handOff` when the switchover was committed and the destination did not confirm that it
    /// started: the guest may run there. Leave the VM paused; the daemon shows it in doubt (control-api.md §3.7)
    /// and resumes it only when an operator forces it.
    public let leaveInDoubt: @Sendable (_ why: MigrationInDoubt) -> Void
}

/// The outgoing side of live migration. One migration per VM at a time; the service keeps each migration's last
/// status (with its report) until the next one of the same VM starts, so a client can read how it ended.
/// Errors are ControlErrors, which become the HTTP answer: e.g. 409 `migration_in_progress`, 404 `no_migration`.
/// The daemon does not hold back `stop` or `DELETE` while a VM migrates: a source stopped under a migration is a
/// failed migration, to be reported as such (the destination must not start).
public protocol MigrationService: Sendable {
    /// Starts migrating `vm` as `request` asks and returns at once with its first status (phase `setup`);
    /// the migration goes on in the background.
    func startMigration(of vm: OutgoingVM, request: MigrationRequest) async throws(ControlError) -> MigrationStatus

    /// The current or last migration of VM `id`.
    func status(ofVM id: String) async throws(ControlError) -> MigrationStatus

    /// Carries on the post-copy of VM `id` whose link broke (phase `postcopy-paused`) over new connections to the same
    /// destination; returns the status after asking. 409 `nothing_to_resume` when no post-copy of that VM waits for
    /// a resume.
    func resume(vm id: String) async throws(ControlError) -> MigrationStatus

    /// The request of VM `id`'s last migration, when it failed before the switchover and its destination may keep
    /// what it received (stream.md §6.15): a migration started again with it and `resume` set sends only the rest.
    /// Nil otherwise, and by default.
    func resumablePreCopy(of id: String) async -> MigrationRequest?

    /// Tells the destination of VM `id`'s last migration, which failed before the switchover, to drop what it keeps for
    /// a resume (stream.md §6.15); the migration is no longer resumable. 409 `nothing_to_resume` when it is not.
    func discardKeptMemory(vm id: String) async throws(ControlError) -> MigrationStatus

    /// Cancels the migration of VM `id` if it has not reached switchover; the source keeps running.
    /// Returns the status after cancelling (phase `cancelled`, or the final phase it had already reached).
    func cancel(vm id: String) async throws(ControlError) -> MigrationStatus

    /// Lines in the Prometheus text format appended to GET /metrics (migrations started, bytes sent, ...),
    /// each family with its # HELP and # TYPE; empty for none.
    func metrics() async -> String

    /// A dry run (`request.dryRun`): measures `vm` and the link to `request.peer` and predicts the migration, without
    /// migrating. Returns once done; `vm` must be left running, untracked and unthrottled. The daemon has made sure
    /// that nothing else uses the VM's dirty log meanwhile. The default refuses (501 `dry_run_unsupported`).
    func predictMigration(of vm: OutgoingVM, request: MigrationRequest) async throws(ControlError) -> MigrationPrediction
}

extension MigrationService {
    public func predictMigration(of vm: OutgoingVM, request: MigrationRequest) async throws(ControlError) -> MigrationPrediction {
        throw ControlError(501, "dry_run_unsupported", "this daemon's migration service cannot predict a migration")
    }
}

extension MigrationService {
    /// For services that cannot resume a post-copy: none ever waits for one.
    public func resume(vm id: String) async throws(ControlError) -> MigrationStatus { throw nothingToResume(id) }

    /// For services that cannot resume a pre-copy.
    public func resumablePreCopy(of id: String) async -> MigrationRequest? { nil }
    public func discardKeptMemory(vm id: String) async throws(ControlError) -> MigrationStatus { throw nothingToResume(id) }

    /// The answer to a resume when VM `id` has no broken migration to carry on.
    public func nothingToResume(_ id: String) -> ControlError {
        .conflict("nothing_to_resume", "VM '\(id)' has no broken migration to carry on here: no post-copy waits for a resume (phase "
            + "postcopy-paused), and its last migration did not fail before the switchover to a destination that keeps what it received; "
            + "see GET /vms/\(id)/migration")
    }
}

/// What the incoming side hands to the daemon: a VM that arrived and runs; it passed the digest check, or in
/// post-copy will pass it once its last page has come.
public struct IncomingVM: Sendable {
    public let machine: MicroVM
    /// The source's configuration of the VM, as sent in the stream; its id is kept when free here.
    public let configuration: VMCreateRequest
    public let peer: String

    public init(machine: MicroVM, configuration: VMCreateRequest, peer: String) {
        self.machine = machine
        self.configuration = configuration
        self.peer = peer
    }
}

/// What the incoming side needs from the daemon's VMs: room in the memory budget for a guest before its memory
/// is built, and the guest once it runs. VMManager is it.
public protocol ArrivalDesk: Sendable {
    /// Sets `memory` bytes aside for an arriving guest, or refuses (409 `memory_does_not_fit`): a migration into
    /// a daemon whose budget cannot hold it is refused before any memory is received, and its source runs on.
    func reserveArrival(memory: UInt64) throws(ControlError)
    /// Gives back a reservation whose guest did not arrive.
    func cancelArrival(memory: UInt64)
    /// Registers a guest that has just started here under its reservation; returns its id here. The guest counts
    /// as running from then on, but as arriving (`VMInfo.arrivingFrom`) until `endArrival`: its migration may not
    /// have ended, and in post-copy its memory still lacks pages.
    func adoptArrival(_ vm: IncomingVM) throws(ControlError) -> String
    /// The migration that brought the VM registered as `id` with `machine` has ended. With a `failure` it ended
    /// badly after the guest had started (in post-copy: pages will not come), and the VM is stopped as `failed` with
    /// that reason, before the receiver frees its memory. Nothing happens when the VM was deleted meanwhile.
    func endArrival(id: String, machine: MicroVM, failure: String?)
    /// The post-copy of the VM registered as `id` with `machine` lost its link and waits for its source to resume
    /// (`pause`), or was resumed (nil): shown in the VM's status until its migration ends.
    func notePostCopyPause(id: String, machine: MicroVM, _ pause: PostCopyPause?)
    /// Records how an incoming migration ended, received or failed (with why), for the API and the metrics.
    func recordArrival(_ record: IncomingMigrationRecord)
}

/// The incoming side of live migration: listens for peers, reserves room for each VM before building it, rebuilds
/// it, starts it after the digest check (in post-copy: before it, with pages missing), hands it to the desk as it
/// starts, which registers it with the daemon, and tells the desk when the migration has ended.
public protocol IncomingMigrationListener: Sendable {
    /// Starts listening; returns once the listener is bound (so that an error such as an address in use reaches
    /// the daemon's start-up), and accepts migrations in the background until `stop`.
    func start(_ settings: IncomingMigrationSettings, desk: any ArrivalDesk) throws

    /// Stops listening and cancels migrations still arriving (their sources resume).
    func stop()
}
