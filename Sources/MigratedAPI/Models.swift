// The control API's JSON documents, shared by the daemon and migratectl. protocol/control-api.md describes them;
// keys are snake_case on the wire (see APIJSON).

/// `POST /vms`: boot a guest image.
public struct VMCreateRequest: Codable, Sendable, Equatable, StrictlyDecodable {
    /// Chosen by the caller, or made up by the daemon when nil: `[a-z0-9][a-z0-9_-]{0,62}`.
    public var id: String?
    /// Path, on the daemon's host, of a PVH-bootable ELF.
    public var image: String
    public var memoryMib: UInt64
    public var vcpus: Int
    public var cmdline: String
    /// File the daemon appends the guest's serial console to; nil keeps the console in memory only.
    public var consoleLog: String?
    /// `bitmap` or `ring`: how KVM reports dirty pages to a later migration.
    public var dirtyTracking: DirtyTracking

    public enum DirtyTracking: String, Codable, Sendable, CaseIterable { case bitmap, ring }

    public static let fieldNames: Set<String> = ["id", "image", "memory_mib", "vcpus", "cmdline", "console_log", "dirty_tracking"]

    public init(id: String? = nil, image: String, memoryMib: UInt64, vcpus: Int = 1, cmdline: String = "",
                consoleLog: String? = nil, dirtyTracking: DirtyTracking = .bitmap) {
        self.id = id
        self.image = image
        self.memoryMib = memoryMib
        self.vcpus = vcpus
        self.cmdline = cmdline
        self.consoleLog = consoleLog
        self.dirtyTracking = dirtyTracking
    }

    // Optional fields take their defaults here, so that `{"image": ..., "memory_mib": ...}` is a whole request.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        id = try c.decodeIfPresent(String.self, forKey: .id)
        image = try c.decode(String.self, forKey: .image)
        memoryMib = try c.decode(UInt64.self, forKey: .memoryMib)
        vcpus = try c.decodeIfPresent(Int.self, forKey: .vcpus) ?? 1
        cmdline = try c.decodeIfPresent(String.self, forKey: .cmdline) ?? ""
        consoleLog = try c.decodeIfPresent(String.self, forKey: .consoleLog)
        dirtyTracking = try c.decodeIfPresent(DirtyTracking.self, forKey: .dirtyTracking) ?? .bitmap
    }
}

/// What a VM is doing.
public enum VMState: String, Codable, Sendable, CaseIterable {
    /// Its vCPUs run (or are briefly paused by a migration or a snapshot).
    case running
    /// Paused through the API: its vCPUs do not run until it is resumed.
    case paused
    /// Stopped through the API.
    case stopped
    /// The guest wrote its exit code to the debug-exit port.
    case exited
    /// KVM reported something the VMM cannot carry on from.
    case failed
    /// Moved to a peer by a migration; it runs there now.
    case migrated
}

/// `GET /vms/{id}`, and each element of `GET /vms`.
public struct VMInfo: Codable, Sendable, Equatable {
    public var id: String
    public var state: VMState
    public var image: String
    public var memoryMib: UInt64
    public var vcpus: Int
    public var cmdline: String
    public var consoleLog: String?
    public var dirtyTracking: VMCreateRequest.DirtyTracking
    /// What holds its RAM: `shared-memory` or `huge-pages` (the daemon's `guest_memory`).
    public var memoryBacking: String
    /// ISO 8601, UTC.
    public var startedAt: String
    /// Seconds since start while running; the time it ran once it has stopped.
    public var uptimeSeconds: Double
    /// Why it stopped, in words; nil while running.
    public var stopReason: String?
    /// The guest's exit code when state is `exited`.
    public var exitCode: Int?
    public var consoleLines: Int
    public var lastConsoleLine: String?
    /// Set while the VM is paused because a migration committed its switchover and the destination did not
    /// confirm that it started: the guest may run there. A plain resume is refused (control-api.md §3.7).
    public var inDoubt: MigrationInDoubt?
    /// Set while the VM runs here and the migration that brought it has not ended: the source's migration listener
    /// (host) it came from. In post-copy this lasts until the last missing page has come and the digests agree;
    /// meanwhile the VM is neither migrated nor saved (409 `vm_arriving`).
    public var arrivingFrom: String?
    /// Set while the VM arrives in a post-copy whose link broke: its threads that touch missing pages wait for a
    /// resume from the source, for at most `waitSecondsLeft` more seconds, after which it is stopped as failed.
    public var postcopyPause: PostCopyPause?

    public init(id: String, state: VMState, image: String, memoryMib: UInt64, vcpus: Int, cmdline: String,
                consoleLog: String?, dirtyTracking: VMCreateRequest.DirtyTracking, memoryBacking: String, startedAt: String,
                uptimeSeconds: Double, stopReason: String?, exitCode: Int?, consoleLines: Int, lastConsoleLine: String?,
                inDoubt: MigrationInDoubt? = nil, arrivingFrom: String? = nil, postcopyPause: PostCopyPause? = nil) {
        self.id = id
        self.state = state
        self.image = image
        self.memoryMib = memoryMib
        self.vcpus = vcpus
        self.cmdline = cmdline
        self.consoleLog = consoleLog
        self.dirtyTracking = dirtyTracking
        self.memoryBacking = memoryBacking
        self.startedAt = startedAt
        self.uptimeSeconds = uptimeSeconds
        self.stopReason = stopReason
        self.exitCode = exitCode
        self.consoleLines = consoleLines
        self.lastConsoleLine = lastConsoleLine
        self.inDoubt = inDoubt
        self.arrivingFrom = arrivingFrom
        self.postcopyPause = postcopyPause
    }
}

/// A source VM left paused by a migration whose outcome this daemon cannot know: it sent COMMIT to `peer`, which
/// may have started the guest, and heard no STARTED. Whoever can ask `peer` decides (control-api.md §3.7).
public struct MigrationInDoubt: Codable, Sendable, Equatable {
    /// The destination's migration listener, as the migration named it.
    public var peer: String
    /// The sentence for people, with what the migration failed on.
    public var reason: String

    public init(peer: String, failure: String) {
        self.peer = peer
        reason = "switchover committed to \(peer); the destination did not confirm that it started (\(failure)). "
            + "The guest may run there: check the destination; if it runs there, delete this VM, otherwise resume it with force"
    }
}

/// `POST /vms/{id}/resume`; the body may be omitted.
public struct ResumeRequest: Codable, Sendable, Equatable, StrictlyDecodable {
    /// Resume a VM left in doubt by a migration (`VMInfo.inDoubt`). Only after making sure the guest does not run
    /// at the destination: two running copies of a guest corrupt whatever they share.
    public var force: Bool

    public static let fieldNames: Set<String> = ["force"]

    public init(force: Bool = false) { self.force = force }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        force = try c.decodeIfPresent(Bool.self, forKey: .force) ?? false
    }
}

/// `GET /vms`.
public struct VMList: Codable, Sendable, Equatable {
    public var vms: [VMInfo]
    public init(vms: [VMInfo]) { self.vms = vms }
}

/// Every 4xx and 5xx answer: a stable machine-readable `error` and a sentence for people.
public struct APIError: Codable, Sendable, Equatable, Error, CustomStringConvertible {
    public var error: String
    public var message: String

    public init(error: String, message: String) {
        self.error = error
        self.message = message
    }

    public var description: String { "\(message) (\(error))" }
}
