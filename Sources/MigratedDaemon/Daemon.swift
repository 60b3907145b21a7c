import Dispatch
import FlyingFox
import FlyingSocks
import Foundation
import Glibc
import Logging
import MigratedAPI

/// The `migrated` daemon: the control API on a Unix socket, the VMs, and the migration seams.
public final class Daemon: Sendable {
    public let configuration: ValidatedConfiguration
    public let api: ControlAPI
    private let server: HTTPServer
    private let incoming: any IncomingMigrationListener
    private let logger: Logger

    public init(configuration: ValidatedConfiguration, logger: Logger,
                migrations: (any MigrationService)? = nil,
                incoming: (any IncomingMigrationListener)? = nil) {
        self.configuration = configuration
        self.logger = logger
        self.incoming = incoming ?? EngineIncomingListener(logger: logger)
        let migrations = migrations ?? EngineMigrationService(logger: logger)
        let vms = VMManager(memoryBudget: configuration.memoryBudget, memoryBacking: configuration.memoryBacking, logger: logger)
        api = ControlAPI(vms: vms, migrations: migrations, snapshots: SnapshotService(logger: logger), tls: configuration.tls, logger: logger)
        server = HTTPServer(config: HTTPServer.Configuration(address: sockaddr_un.unix(path: configuration.socketPath),
                                                             logger: FlyingFoxLogger(logger: logger)),
                            handler: ControlHTTPHandler(api: api))
    }

    /// Serves the control API until the task is cancelled or `shutdown` is called.
    public func run() async throws {
        try prepareSocketPath()
        if let settings = configuration.incoming {
            let vms = api.vms
            do {
                try incoming.start(settings, desk: vms)
                logger.info("listening for incoming migrations", metadata: ["address": "\(settings.address)"])
            } catch {
                // The control API is useful without it: say loudly that the address is not served, and go on.
                logger.error("not listening for incoming migrations on \(settings.address): \(error)")
            }
        }
        // Releases the memory of guests that exit by themselves even when nobody asks about them.
        let sweeper = DispatchSource.makeTimerSource(queue: .global())
        sweeper.schedule(deadline: .now() + 1, repeating: 1)
        sweeper.setEventHandler { [vms = api.vms] in vms.reapStopped() }
        sweeper.resume()
        defer { sweeper.cancel() }
        Task {
            try await waitUntilListening()
            logger.info("control API listening", metadata: ["socket": "\(configuration.socketPath)"])
        }
        try await server.run()
    }

    /// Returns once the control socket accepts connections, and is its owner's only.
    public func waitUntilListening(timeout: TimeInterval = 10) async throws {
        try await server.waitUntilListening(timeout: timeout)
        // The control API can start and stop VMs: it is for the daemon's user (root) only. FlyingFox binds with
        // the umask's mode, so this narrows it as soon as the socket exists; every waiter does it, and it is
        // idempotent, so no caller sees the socket before it is narrowed.
        chmod(configuration.socketPath, 0o600)
    }

    /// Stops accepting requests and migrations, stops every VM, and removes the socket.
    public func shutdown() async {
        logger.info("shutting down")
        await server.stop(timeout: 2)
        incoming.stop()
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            DispatchQueue.global().async { [api] in
                api.vms.stopAll()
                done.resume()
            }
        }
        unlink(configuration.socketPath)
    }

    /// Creates the socket's directory, and removes a socket left by a daemon that died; refuses to start next
    /// to a daemon that still answers there.
    private func prepareSocketPath() throws {
        let path = configuration.socketPath
        let directory = (path as NSString).deletingLastPathComponent
        if !directory.isEmpty {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        }
        var info = stat()
        guard lstat(path, &info) == 0 else { return }
        guard info.st_mode & S_IFMT == S_IFSOCK else {
            throw ConfigurationError("\(path) exists and is not a socket; refusing to replace it")
        }
        if Self.answers(path) { throw ConfigurationError("another daemon is listening on \(path)") }
        logger.notice("removing stale control socket", metadata: ["socket": "\(path)"])
        unlink(path)
    }

    private static func answers(_ path: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_un.unix(path: path)
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0 }
        }
    }
}

/// Hands every request to the ControlAPI; FlyingFox does the HTTP/1.1 framing and the connections.
struct ControlHTTPHandler: HTTPHandler {
    let api: ControlAPI

    func handleRequest(_ request: HTTPRequest) async throws -> HTTPResponse {
        let body: Data
        do { body = try await request.bodyData } catch {
            let failure = ControlAPI.error(ControlError.badRequest("cannot read the request body: \(error)"))
            return HTTPResponse(statusCode: HTTPStatusCode(failure.status, phrase: "Bad Request"), body: failure.body)
        }
        let response = await api.handle(method: request.method.rawValue, path: request.path, body: body)
        var headers: HTTPHeaders = [.contentType: response.contentType]
        for (name, value) in response.headers { headers[HTTPHeader(name)] = value }
        return HTTPResponse(statusCode: HTTPStatusCode(response.status, phrase: Self.phrase(response.status)),
                            headers: headers, body: response.body)
    }

    static func phrase(_ status: Int) -> String {
        switch status {
        case 200: "OK"
        case 201: "Created"
        case 202: "Accepted"
        case 400: "Bad Request"
        case 404: "Not Found"
        case 405: "Method Not Allowed"
        case 409: "Conflict"
        case 422: "Unprocessable Content"
        case 501: "Not Implemented"
        default: status < 500 ? "Client Error" : "Server Error"
        }
    }
}

/// FlyingFox's own log lines (listening, connection errors) go through swift-log with the daemon's.
struct FlyingFoxLogger: FlyingSocks.Logging {
    let logger: Logger

    func logDebug(_ debug: @autoclosure () -> String) { logger.trace("\(debug())") }
    func logInfo(_ info: @autoclosure () -> String) { logger.debug("\(info())") }
    func logWarning(_ warning: @autoclosure () -> String) { logger.warning("\(warning())") }
    func logError(_ error: @autoclosure () -> String) { logger.warning("\(error())") }
    // FlyingFox's critical lines repeat the error that HTTPServer.run() throws (a cancellation at shutdown,
    // too), which the daemon's caller reports with its own words.
    func logCritical(_ critical: @autoclosure () -> String) { logger.debug("\(critical())") }
}
