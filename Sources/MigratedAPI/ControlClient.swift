import FlyingFox
import FlyingSocks
import Foundation

/// Drives a daemon's control API over its Unix socket: one connection per request, which is plenty for a
/// command-line client and keeps no state between calls.
public struct ControlClient: Sendable {
    public let socketPath: String

    public init(socketPath: String) {
        self.socketPath = socketPath
    }

    /// Why a call failed before the daemon could answer it with an APIError.
    public struct ConnectionError: Error, CustomStringConvertible {
        public let socketPath: String
        public let underlying: String
        public var description: String {
            "cannot talk to migrated at \(socketPath): \(underlying) (is the daemon running? see --socket)"
        }
    }

    /// One exchange; the status and body as they came, for callers that want to see non-2xx answers themselves.
    public func send(_ method: HTTPMethod, _ path: String, body: Data? = nil) async throws -> (status: Int, body: Data) {
        var headers: HTTPHeaders = [.host: "localhost", .connection: "close"]
        if body != nil { headers[.contentType] = "application/json" }
        let request = HTTPRequest(method: method, version: .http11, path: path, query: [], headers: headers,
                                  body: HTTPBodySequence(data: body ?? Data()))
        var client = HTTPClient()
        do {
            let response = try await client.sendHTTPRequest(request, to: sockaddr_un.unix(path: socketPath))
            return (response.statusCode.code, try await response.bodyData)
        } catch {
            throw ConnectionError(socketPath: socketPath, underlying: "\(error)")
        }
    }

    /// One exchange whose 2xx body decodes as `T`; any other status throws the daemon's APIError.
    public func call<T: Decodable>(_ method: HTTPMethod, _ path: String, body: (some Encodable)? = Optional<Int>.none,
                                   as type: T.Type = T.self) async throws -> T {
        let (status, data) = try await send(method, path, body: try body.map { try APIJSON.encode($0) })
        guard (200 ..< 300).contains(status) else {
            if let error = try? APIJSON.decode(APIError.self, from: data) { throw error }
            throw APIError(error: "http_\(status)", message: "the daemon answered \(status): \(String(decoding: data.prefix(200), as: UTF8.self))")
        }
        return try APIJSON.decode(type, from: data)
    }

    // The API, one method per endpoint (protocol/control-api.md).

    public func createVM(_ request: VMCreateRequest) async throws -> VMInfo {
        try await call(.POST, "/vms", body: request)
    }

    public func listVMs() async throws -> [VMInfo] {
        try await call(.GET, "/vms", as: VMList.self).vms
    }

    public func vm(_ id: String) async throws -> VMInfo {
        try await call(.GET, "/vms/\(Self.escape(id))")
    }

    public func stopVM(_ id: String) async throws -> VMInfo {
        try await call(.POST, "/vms/\(Self.escape(id))/stop")
    }

    public func pauseVM(_ id: String) async throws -> VMInfo {
        try await call(.POST, "/vms/\(Self.escape(id))/pause")
    }

    /// `force` resumes a VM left in doubt by a migration (control-api.md §3.7).
    public func resumeVM(_ id: String, force: Bool = false) async throws -> VMInfo {
        if force { return try await call(.POST, "/vms/\(Self.escape(id))/resume", body: ResumeRequest(force: true)) }
        return try await call(.POST, "/vms/\(Self.escape(id))/resume")
    }

    public func deleteVM(_ id: String) async throws -> VMInfo {
        try await call(.DELETE, "/vms/\(Self.escape(id))")
    }

    public func migrate(_ id: String, _ request: MigrationRequest) async throws -> MigrationStatus {
        try await call(.POST, "/vms/\(Self.escape(id))/migrate", body: request)
    }

    /// A dry run: `request` with `dryRun` set; nothing migrates.
    public func predictMigration(_ id: String, _ request: MigrationRequest) async throws -> MigrationPrediction {
        var request = request
        request.dryRun = true
        return try await call(.POST, "/vms/\(Self.escape(id))/migrate", body: request)
    }

    public func migration(_ id: String) async throws -> MigrationStatus {
        try await call(.GET, "/vms/\(Self.escape(id))/migration")
    }

    public func incomingMigrations() async throws -> [IncomingMigrationRecord] {
        try await call(.GET, "/migrations/incoming", as: IncomingMigrationList.self).migrations
    }

    /// Tells the destination of the VM's last migration, which failed before the switchover, to drop what it keeps for
    /// a resume (control-api.md §4.6.2).
    public func discardKeptMemory(_ id: String) async throws -> MigrationStatus {
        try await call(.POST, "/vms/\(Self.escape(id))/migration/discard")
    }

    public func cancelMigration(_ id: String) async throws -> MigrationStatus {
        try await call(.POST, "/vms/\(Self.escape(id))/migration/cancel")
    }

    public func saveSnapshot(_ id: String, _ request: SnapshotRequest) async throws -> SnapshotStatus {
        try await call(.POST, "/vms/\(Self.escape(id))/snapshot", body: request)
    }

    public func snapshot(_ id: String) async throws -> SnapshotStatus {
        try await call(.GET, "/vms/\(Self.escape(id))/snapshot")
    }

    public func restoreSnapshot(_ request: RestoreRequest) async throws -> RestoreResult {
        try await call(.POST, "/snapshots/restore", body: request)
    }

    public func metrics() async throws -> String {
        let (status, data) = try await send(.GET, "/metrics")
        guard status == 200 else { throw APIError(error: "http_\(status)", message: "GET /metrics answered \(status)") }
        return String(decoding: data, as: UTF8.self)
    }

    /// VM ids are restricted to a path-safe alphabet by the daemon; escaping keeps a mistyped one from
    /// addressing another resource.
    static func escape(_ id: String) -> String {
        id.addingPercentEncoding(withAllowedCharacters: .alphanumerics.union(CharacterSet(charactersIn: "-_"))) ?? id
    }
}
