// Snapshot documents of the control API (protocol/control-api.md, "Snapshots").

/// `POST /vms/{id}/snapshot`: save the VM to a snapshot file on the daemon's host.
public struct SnapshotRequest: Codable, Sendable, Equatable, StrictlyDecodable {
    public enum Kind: String, Codable, Sendable, CaseIterable { case full, diff }
    public enum Format: String, Codable, Sendable, CaseIterable { case plain, compressed }
    public enum Compression: String, Codable, Sendable, CaseIterable { case lz4, zstd }

    /// Absolute path of the file to write, on the daemon's host.
    public var path: String
    /// `diff` saves only what changed since this VM's last snapshot taken through this daemon.
    public var kind: Kind
    /// Copy memory while the guest runs, pausing it only briefly at the end; false pauses it throughout.
    public var live: Bool
    public var format: Format
    public var compression: Compression
    public var overwrite: Bool

    public static let fieldNames: Set<String> = ["path", "kind", "live", "format", "compression", "overwrite"]

    public init(path: String, kind: Kind = .full, live: Bool = true, format: Format = .plain, compression: Compression = .zstd,
                overwrite: Bool = false) {
        self.path = path
        self.kind = kind
        self.live = live
        self.format = format
        self.compression = compression
        self.overwrite = overwrite
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        path = try c.decode(String.self, forKey: .path)
        kind = try c.decodeIfPresent(Kind.self, forKey: .kind) ?? .full
        live = try c.decodeIfPresent(Bool.self, forKey: .live) ?? true
        format = try c.decodeIfPresent(Format.self, forKey: .format) ?? .plain
        compression = try c.decodeIfPresent(Compression.self, forKey: .compression) ?? .zstd
        overwrite = try c.decodeIfPresent(Bool.self, forKey: .overwrite) ?? false
    }

    /// The checks that need no VM: nil when the request is well formed, else why not.
    public func problem() -> String? {
        path.hasPrefix("/") ? nil : "path must be absolute (it is a path on the daemon's host), not '\(path)'"
    }
}

/// `GET /vms/{id}/snapshot`: the VM's current or last snapshot.
public struct SnapshotStatus: Codable, Sendable, Equatable {
    public enum State: String, Codable, Sendable { case running, completed, failed }

    public var vm: String
    public var state: State
    public var path: String
    public var kind: SnapshotRequest.Kind
    public var format: SnapshotRequest.Format
    public var pagesDone: Int
    public var pagesTotal: Int
    public var bytesWritten: Int
    public var rateBytesPerSecond: Double
    public var elapsedSeconds: Double
    /// How long the guest was paused; set once completed.
    public var pauseMs: Double?
    public var snapshotId: String?
    public var parentId: String?
    public var dataPages: UInt64?
    public var fileBytes: UInt64?
    public var error: String?

    public init(vm: String, state: State, path: String, kind: SnapshotRequest.Kind, format: SnapshotRequest.Format) {
        self.vm = vm
        self.state = state
        self.path = path
        self.kind = kind
        self.format = format
        pagesDone = 0
        pagesTotal = 0
        bytesWritten = 0
        rateBytesPerSecond = 0
        elapsedSeconds = 0
    }
}

/// `POST /snapshots/restore`: start a VM from a snapshot (and its parents, for a diff).
public struct RestoreRequest: Codable, Sendable, Equatable, StrictlyDecodable {
    public var path: String
    /// The parents of a diff, nearest first; omitted, they are found through each diff's parent hint.
    public var parents: [String]?
    /// Start the guest at once and bring its memory in on demand (userfaultfd) while prefetching the rest.
    public var lazy: Bool
    /// The new VM's id; omitted, the id saved in the snapshot if it is free, else a new one.
    public var id: String?

    public static let fieldNames: Set<String> = ["path", "parents", "lazy", "id"]

    public init(path: String, parents: [String]? = nil, lazy: Bool = false, id: String? = nil) {
        self.path = path
        self.parents = parents
        self.lazy = lazy
        self.id = id
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        path = try c.decode(String.self, forKey: .path)
        parents = try c.decodeIfPresent([String].self, forKey: .parents)
        lazy = try c.decodeIfPresent(Bool.self, forKey: .lazy) ?? false
        id = try c.decodeIfPresent(String.self, forKey: .id)
    }
}

/// The answer to `POST /snapshots/restore`: the VM, and what the restore measured.
public struct RestoreResult: Codable, Sendable, Equatable {
    public var vm: VMInfo
    public var lazy: Bool
    public var dataPages: Int
    /// From the request until the guest's vCPUs were started.
    public var secondsToFirstInstruction: Double
    /// Until all of memory was in place; for a lazy restore this is still in progress when the answer is sent (nil).
    public var secondsToResident: Double?

    public init(vm: VMInfo, lazy: Bool, dataPages: Int, secondsToFirstInstruction: Double, secondsToResident: Double?) {
        self.vm = vm
        self.lazy = lazy
        self.dataPages = dataPages
        self.secondsToFirstInstruction = secondsToFirstInstruction
        self.secondsToResident = secondsToResident
    }
}
