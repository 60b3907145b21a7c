import Dispatch
import Foundation
import Glibc
import Logging
import MigratedAPI

/// The `migrated` daemon: the control API on a Unix socket, the VMs, and the migration seams.
public final class Daemon: Sendable {
    public let configuration: ValidatedConfiguration
    public let api: ControlAPI
    private let server: ControlServer
    private let incoming: any IncomingMigrationListener
    private let logger: Logger

    public init(configuration: ValidatedConfiguration, logger: Logger,
                migrations: (any MigrationService)? = nil,
                incoming: (any IncomingMigrationListener)? = nil) {
        self.configuration = configuration
        self.logger = logger
        self.incoming = incoming ?? EngineIncomingListener(logger: logger)
        let migrations = migrations ?? EngineMigrationService(logger: logger, postCopyRecoveryTimeout: configuration.postCopyRecoveryTimeout)
        let vms = VMManager(memoryBudget: configuration.memoryBudget, memoryBacking: configuration.memoryBacking, logger: logger)
        api = ControlAPI(vms: vms, migrations: migrations, snapshots: SnapshotService(logger: logger), tls: configuration.tls, logger: logger)
        server = ControlServer(socketPath: configuration.socketPath, limits: configuration.controlLimits, api: api, logger: logger)
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
        Self.raiseDescriptorLimit()
        try await server.run()
    }

    /// Each control connection takes a descriptor, and so does each VM and migration channel: the usual soft
    /// limit of 1024 would make `ControlLimits.connections` unreachable. The hard limit is the administrator's.
    private static func raiseDescriptorLimit() {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur < 8192 else { return }
        limit.rlim_cur = min(limit.rlim_max, 8192)
        setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
    }

    /// Returns once the control socket accepts connections, and is its owner's only.
    public func waitUntilListening(timeout: TimeInterval = 10) async throws {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while !server.isListening {
            guard Date() < deadline else { throw ConfigurationError("the control socket did not start listening in \(timeout) s") }
            try await Task.sleep(nanoseconds: 10_000_000)
        }
        // The control API can start and stop VMs: it is for the daemon's user (root) only. The socket is bound with
        // the umask's mode, so this narrows it as soon as the socket exists; every waiter does it, and it is
        // idempotent, so no caller sees the socket before it is narrowed.
        chmod(configuration.socketPath, 0o600)
    }

    /// Stops accepting requests and migrations, saves the VMs left in doubt, stops every VM, and removes the socket.
    public func shutdown() async {
        logger.info("shutting down")
        server.stop()
        incoming.stop()
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            DispatchQueue.global().async { [api, configuration] in
                api.preserveVMsInDoubt(in: configuration.inDoubtDirectory)
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
