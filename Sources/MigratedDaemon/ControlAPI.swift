import Dispatch
import Foundation
import Logging
import MigratedAPI
import Threads

/// The control API's routes, independent of the HTTP server: a request's method, path and body in, a status,
/// content type and body out. protocol/control-api.md is its specification.
public final class ControlAPI: Sendable {
    public let vms: VMManager
    let migrations: any MigrationService
    let snapshots: SnapshotService
    let tls: TLSFiles?
    let logger: Logger
    private let startedAt = DispatchTime.now()
    private let requestCounts = RequestCounter()
    /// VMs a dry run is measuring, and VMs whose migration is being started. A dry run uses the VM's dirty log, which
    /// a migration, a snapshot, or another dry run of the same VM must not use meanwhile, and it needs the guest
    /// running. A migration counts as started once the service has registered it (`isMigrating`); until then it is
    /// here, so that a dry run and a migration started at the same moment cannot both pass their checks.
    private let dirtyLogUsers = Locked(DirtyLogUsers())
    private struct DirtyLogUsers {
        var dryRuns: Set<String> = []
        var startingMigrations: Set<String> = []
    }

    public init(vms: VMManager, migrations: any MigrationService, snapshots: SnapshotService, tls: TLSFiles?, logger: Logger) {
        self.vms = vms
        self.migrations = migrations
        self.snapshots = snapshots
        self.tls = tls
        self.logger = logger
    }

    public struct Response: Sendable {
        public var status: Int
        public var contentType: String
        public var body: Data
        public var headers: [String: String] = [:]
    }

    public func handle(method: String, path: String, body: Data) async -> Response {
        let response: Response
        do {
            response = try await route(method: method, path: path, body: body)
        } catch {
            response = Self.error(error)
        }
        requestCounts.count(response.status)
        let level: Logger.Level = response.status >= 500 ? .error : .debug
        logger.log(level: level, "\(method) \(path) -> \(response.status)")
        return response
    }

    /// Counts an answer the HTTP server gave without reaching the routes (a malformed request, §1.1), so that
    /// `migrated_http_requests_total` shows hostile or broken clients too.
    func countRefusal(_ error: ControlError) {
        requestCounts.count(error.status)
    }

    private func route(method: String, path: String, body: Data) async throws(ControlError) -> Response {
        let parts = path.split(separator: "/", omittingEmptySubsequences: true).map { String($0).removingPercentEncoding ?? String($0) }
        switch (method, parts.count) {
        case (_, 1) where parts[0] == "metrics":
            try allow(method, ["GET"])
            return Response(status: 200, contentType: "text/plain; version=0.0.4; charset=utf-8", body: Data(await metrics().utf8))
        case (_, 2) where parts[0] == "migrations" && parts[1] == "incoming":
            try allow(method, ["GET"])
            return try json(200, IncomingMigrationList(migrations: vms.arrivals.recent))
        case (_, 1) where parts[0] == "vms":
            try allow(method, ["GET", "POST"])
            if method == "GET" { return try json(200, VMList(vms: vms.list().map(vms.info))) }
            let request = try decode(VMCreateRequest.self, body)
            let vm = try await blocking { () throws(ControlError) in try self.vms.create(request) }
            var response = try json(201, vms.info(vm))
            response.headers["Location"] = "/vms/\(vm.id)"
            return response
        case (_, 2) where parts[0] == "vms":
            try allow(method, ["GET", "DELETE"])
            if method == "GET" { return try json(200, vms.info(vms.vm(parts[1]))) }
            let id = parts[1]
            snapshots.forgetBase(vm: id)
            return try json(200, vms.info(try await blocking { () throws(ControlError) in try self.vms.delete(id) }))
        case (_, 3) where parts[0] == "vms" && parts[2] == "stop":
            try allow(method, ["POST"])
            let id = parts[1]
            snapshots.forgetBase(vm: id)
            return try json(200, vms.info(try await blocking { () throws(ControlError) in try self.vms.stop(id) }))
        case (_, 3) where parts[0] == "vms" && (parts[2] == "pause" || parts[2] == "resume"):
            try allow(method, ["POST"])
            let id = parts[1]
            if snapshots.isSaving(vm: id) { throw .conflict("snapshot_running", "VM '\(id)' is being saved") }
            if try await isMigrating(id) { throw .conflict("migration_running", "VM '\(id)' is migrating") }
            try refuseDuringDryRun(id)
            let pause = parts[2] == "pause"
            // A resume may say {"force": true}, for a VM a migration left in doubt (§3.7); a pause takes no body.
            let force = !pause && !body.isEmpty ? try decode(ResumeRequest.self, body).force : false
            return try json(200, vms.info(try await blocking { () throws(ControlError) in try self.vms.setPaused(id, pause, force: force) }))
        case (_, 3) where parts[0] == "vms" && parts[2] == "snapshot":
            try allow(method, ["GET", "POST"])
            if method == "GET" {
                _ = try vms.vm(parts[1])
                return try json(200, try snapshots.status(vm: parts[1]))
            }
            let request = try decode(SnapshotRequest.self, body)
            return try json(202, try await startSnapshot(vm: parts[1], request))
        case (_, 2) where parts[0] == "snapshots" && parts[1] == "restore":
            try allow(method, ["POST"])
            let request = try decode(RestoreRequest.self, body)
            let (snapshots, vms) = (self.snapshots, self.vms)
            let result = try await blocking { () throws(ControlError) in try snapshots.restore(request, vms: vms) }
            var response = try json(201, result)
            response.headers["Location"] = "/vms/\(result.vm.id)"
            return response
        case (_, 3) where parts[0] == "vms" && parts[2] == "migrate":
            try allow(method, ["POST"])
            let request = try decode(MigrationRequest.self, body)
            if request.resume {
                _ = try vms.vm(parts[1])
                // A pre-copy that failed before the switchover: a new migration, as the broken one was asked.
                if var again = await migrations.resumablePreCopy(of: parts[1]) {
                    again.resume = true
                    return try json(202, try await startMigration(vm: parts[1], again))
                }
                // The VM is paused under its post-copy: none of a new migration's checks apply.
                return try json(202, try await migrations.resume(vm: parts[1]))
            }
            if request.dryRun { return try json(200, try await predictMigration(vm: parts[1], request)) }
            return try json(202, try await startMigration(vm: parts[1], request))
        case (_, 3) where parts[0] == "vms" && parts[2] == "migration":
            try allow(method, ["GET"])
            _ = try vms.vm(parts[1])
            return try json(200, try await migrations.status(ofVM: parts[1]))
        case (_, 4) where parts[0] == "vms" && parts[2] == "migration" && parts[3] == "discard":
            try allow(method, ["POST"])
            _ = try vms.vm(parts[1])
            return try json(200, try await migrations.discardKeptMemory(vm: parts[1]))
        case (_, 4) where parts[0] == "vms" && parts[2] == "migration" && parts[3] == "cancel":
            try allow(method, ["POST"])
            _ = try vms.vm(parts[1])
            return try json(200, try await migrations.cancel(vm: parts[1]))
        default:
            throw ControlError(404, "not_found", "no such endpoint: \(path) (see protocol/control-api.md)")
        }
    }

    /// Everything the daemon can check itself comes before the service, so that a bad request gets its 4xx
    /// whatever the engine does.
    private func startMigration(vm id: String, _ request: MigrationRequest) async throws(ControlError) -> MigrationStatus {
        let outgoing = try outgoingVM(id, request)
        // A second migration started at the same moment goes on to the service, which answers 409 migration_in_progress.
        let (refused, claimed) = dirtyLogUsers.withLock { users in
            users.dryRuns.contains(id) ? (true, false) : (false, users.startingMigrations.insert(id).inserted)
        }
        if refused { throw Self.dryRunRunning(id) }
        defer { if claimed { dirtyLogUsers.withLock { _ = $0.startingMigrations.remove(id) } } }
        return try await migrations.startMigration(of: outgoing, request: request)
    }

    /// A dry run: the checks of a migration, then the service measures and predicts, with this VM's dirty log its
    /// own until it answers.
    private func predictMigration(vm id: String, _ request: MigrationRequest) async throws(ControlError) -> MigrationPrediction {
        let outgoing = try outgoingVM(id, request)
        let refusal: ControlError? = dirtyLogUsers.withLock { users in
            if users.startingMigrations.contains(id) { return .conflict("migration_running", "VM '\(id)' is migrating") }
            return users.dryRuns.insert(id).inserted ? nil : Self.dryRunRunning(id)
        }
        if let refusal { throw refusal }
        defer { dirtyLogUsers.withLock { _ = $0.dryRuns.remove(id) } }
        if try await isMigrating(id) { throw .conflict("migration_running", "VM '\(id)' is migrating") }
        return try await migrations.predictMigration(of: outgoing, request: request)
    }

    private func refuseDuringDryRun(_ id: String) throws(ControlError) {
        if dirtyLogUsers.withLock({ $0.dryRuns.contains(id) }) { throw Self.dryRunRunning(id) }
    }

    private static func dryRunRunning(_ id: String) -> ControlError {
        .conflict("dry_run_running", "a dry run of VM '\(id)' is measuring it; try again in a second")
    }

    /// The VM as a migration (or its dry run) gets it, after the checks both share.
    private func outgoingVM(_ id: String, _ request: MigrationRequest) throws(ControlError) -> OutgoingVM {
        if let problem = request.problem() { throw .badRequest(problem) }
        let machine = try vms.runningMachine(id)
        if snapshots.isSaving(vm: id) { throw .conflict("snapshot_running", "VM '\(id)' is being saved; migrate it when the snapshot is done") }
        if try vms.isPaused(id) { throw .conflict("vm_paused", "VM '\(id)' is paused; resume it to migrate it") }
        try vms.checkArrived(id)
        // The migration (or a dry run) takes over the dirty log, so a later diff snapshot could miss pages: the next must be full.
        snapshots.forgetBase(vm: id)
        if request.security == .tls && tls == nil {
            throw .conflict("tls_not_configured", "this daemon has no TLS identity (tls section or --tls-* flags); configure one, or ask for \"security\": \"plaintext\"")
        }
        let vm = try vms.vm(id)
        let manager = vms
        let outgoing = OutgoingVM(id: id, machine: machine, configuration: vm.request, tls: tls, handOff: { peer in
            _ = try? manager.stop(id, reason: .migrated, because: "migrated to \(peer)")
        }, leaveInDoubt: { inDoubt in
            manager.markInDoubt(id, inDoubt)
        })
        return outgoing
    }

    private func startSnapshot(vm id: String, _ request: SnapshotRequest) async throws(ControlError) -> SnapshotStatus {
        let machine = try vms.runningMachine(id)
        if try await isMigrating(id) { throw .conflict("migration_running", "VM '\(id)' is migrating") }
        try vms.checkArrived(id)
        try refuseDuringDryRun(id)
        return try snapshots.startSave(vm: try vms.vm(id), machine: machine, request: request, paused: try vms.isPaused(id))
    }

    private func isMigrating(_ id: String) async throws(ControlError) -> Bool {
        guard let migration = try? await migrations.status(ofVM: id) else { return false }
        // Post-copy included: the source is paused then, and resuming it would run a second copy of the guest.
        return !migration.phase.isFinal
    }

    // MARK: helpers

    private func allow(_ method: String, _ allowed: [String]) throws(ControlError) {
        guard allowed.contains(method) else {
            throw ControlError(405, "method_not_allowed", "\(method) is not allowed here; allowed: \(allowed.joined(separator: ", "))")
        }
    }

    private func decode<T: StrictlyDecodable>(_ type: T.Type, _ body: Data) throws(ControlError) -> T {
        do {
            return try APIJSON.decodeRequest(type, from: body)
        } catch {
            throw ControlError(400, error.error, error.message)
        }
    }

    private func json(_ status: Int, _ value: some Encodable) throws(ControlError) -> Response {
        do {
            return Response(status: status, contentType: "application/json", body: try APIJSON.encode(value) + Data("\n".utf8))
        } catch {
            throw ControlError(500, "internal", "cannot encode the answer: \(error)")
        }
    }

    static func error(_ error: any Error) -> Response {
        let control = error as? ControlError ?? ControlError(500, "internal", "\(error)")
        let body = (try? APIJSON.encode(control.body)) ?? Data(#"{"error":"internal","message":"unencodable error"}"#.utf8)
        return Response(status: control.status, contentType: "application/json", body: body + Data("\n".utf8))
    }

    /// Runs KVM work that blocks (creating memory and vCPUs, joining vCPU threads) on a Dispatch thread, away
    /// from Swift concurrency's few cooperative threads, which serve the other connections meanwhile.
    private func blocking<T: Sendable>(_ work: @escaping @Sendable () throws(ControlError) -> T) async throws(ControlError) -> T {
        let result: Result<T, ControlError> = await withCheckedContinuation { continuation in
            DispatchQueue.global().async {
                do throws(ControlError) { continuation.resume(returning: .success(try work())) } catch { continuation.resume(returning: .failure(error)) }
            }
        }
        return try result.get()
    }

    // MARK: metrics

    /// GET /metrics in the Prometheus text exposition format (version 0.0.4).
    func metrics() async -> String {
        let snapshot = vms.snapshot()
        var out = PrometheusText()
        out.family("migrated_vms", "gauge", "VMs known to the daemon, by state.")
        for state in VMState.allCases { out.sample("migrated_vms", ["state": state.rawValue], Double(snapshot.byState[state] ?? 0)) }
        out.family("migrated_vm_memory_bytes", "gauge", "Guest memory of each running VM.")
        for vm in snapshot.running { out.sample("migrated_vm_memory_bytes", ["vm": vm.id], Double(vm.memory)) }
        out.family("migrated_vm_vcpus", "gauge", "vCPUs of each running VM.")
        for vm in snapshot.running { out.sample("migrated_vm_vcpus", ["vm": vm.id], Double(vm.vcpus)) }
        out.family("migrated_vm_uptime_seconds", "gauge", "Seconds each running VM has run.")
        for vm in snapshot.running { out.sample("migrated_vm_uptime_seconds", ["vm": vm.id], vm.uptime) }
        out.metric("migrated_guest_memory_bytes", "gauge", "Guest memory held by running VMs and boots under way.", Double(snapshot.committedMemory))
        out.metric("migrated_memory_budget_bytes", "gauge", "Guest memory all VMs together may hold.", Double(vms.memoryBudget))
        out.metric("migrated_vms_started_total", "counter", "VMs started since the daemon started.", Double(snapshot.startedTotal))
        out.metric("migrated_vm_start_failures_total", "counter", "VM starts refused or failed after validation.", Double(snapshot.startFailuresTotal))
        out.family("migrated_http_requests_total", "counter", "Control API requests answered, by status code.")
        for (status, count) in requestCounts.counts() { out.sample("migrated_http_requests_total", ["code": String(status)], Double(count)) }
        out.family("migrated_incoming_migrations_total", "counter", "Migrations into this daemon that ended, by outcome.")
        for (outcome, count) in vms.arrivals.counts { out.sample("migrated_incoming_migrations_total", ["outcome": outcome.rawValue], Double(count)) }
        let snapshotCounts = snapshots.counters()
        out.metric("migrated_snapshots_saved_total", "counter", "Snapshots saved.", Double(snapshotCounts.saved))
        out.metric("migrated_snapshot_failures_total", "counter", "Snapshot saves that failed (the VM ran on).", Double(snapshotCounts.failed))
        out.metric("migrated_snapshots_restored_total", "counter", "VMs started from snapshots.", Double(snapshotCounts.restored))
        out.metric("migrated_uptime_seconds", "gauge", "Seconds since the daemon started.", Double(DispatchTime.now().uptimeNanoseconds - startedAt.uptimeNanoseconds) / 1e9)
        return out.text + (await migrations.metrics())
    }
}

/// Answers counted by status code, for the metrics.
private final class RequestCounter: Sendable {
    private let byStatus = Locked<[Int: Int]>([:])

    func count(_ status: Int) { byStatus.withLock { $0[status, default: 0] += 1 } }

    func counts() -> [(Int, Int)] { byStatus.withLock { $0.sorted { $0.key < $1.key } } }
}

/// Writes the Prometheus text format: a # HELP and # TYPE line per family, then its samples.
struct PrometheusText {
    private(set) var text = ""

    mutating func family(_ name: String, _ type: String, _ help: String) {
        text += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
    }

    /// A family with a single, unlabelled sample.
    mutating func metric(_ name: String, _ type: String, _ help: String, _ value: Double) {
        family(name, type, help)
        sample(name, [:], value)
    }

    mutating func sample(_ name: String, _ labels: [String: String], _ value: Double) {
        let labelText = labels.isEmpty ? "" : "{" + labels.sorted { $0.key < $1.key }
            .map { "\($0.key)=\"\(Self.escape($0.value))\"" }.joined(separator: ",") + "}"
        let valueText = value == value.rounded() && abs(value) < 1e15 ? String(Int64(value)) : String(value)
        text += "\(name)\(labelText) \(valueText)\n"
    }

    /// Label values escape backslash, double quote and newline, as the format requires.
    static func escape(_ value: String) -> String {
        value.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
            .replacingOccurrences(of: "\n", with: "\\n")
    }
}
