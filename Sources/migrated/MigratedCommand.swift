import ArgumentParser
import CKVM
import Foundation
import Glibc
import Logging
import MigratedDaemon
import ServiceLifecycle

/// `migrated`: the per-host daemon. Settings come from --config (JSON) and flags; a flag wins over the file.
@main
struct MigratedCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrated",
        abstract: "Run VMs and serve the control API (HTTP/1.1 + JSON) on a Unix socket.",
        discussion: "The API is described in protocol/control-api.md; migratectl drives it.")

    @Option(help: "JSON configuration file (see DaemonConfiguration).")
    var config: String?

    @Option(help: "Control socket path (default \(DaemonConfiguration.defaultSocket)).")
    var socket: String?

    @Option(help: "Where VMs left in doubt by a migration are saved when the daemon shuts down (default \(DaemonConfiguration.defaultInDoubtDirectory)).")
    var inDoubtDir: String?

    @Option(help: "trace, debug, info, notice, warning, error or critical (default info).")
    var logLevel: String?

    @Option(help: "Guest memory all VMs together may hold, e.g. 16G (default: the host's RAM).")
    var memoryBudget: String?

    @Option(help: "What holds guest RAM: shared-memory (default) or huge-pages (2 MiB pages from /proc/sys/vm/nr_hugepages).")
    var guestMemory: String?

    @Option(name: .customLong("tls-certificate"), help: "PEM certificate of this host, for migrations.")
    var tlsCertificate: String?

    @Option(name: .customLong("tls-key"), help: "PEM private key of that certificate.")
    var tlsKey: String?

    @Option(name: .customLong("tls-ca"), help: "PEM CA certificates peers must chain to.")
    var tlsCA: String?

    @Option(name: .customLong("allow-peer"), help: "A peer certificate name to accept (repeatable).")
    var allowPeer: [String] = []

    @Option(help: "Listen for incoming migrations here: host:port, [v6]:port or unix:/path.")
    var incomingListen: String?

    @Option(help: "Seconds a post-copy whose link broke waits for `migratectl migrate VM --resume`, here as source or destination, before it gives up (default 60; 0: at once).")
    var postcopyRecoveryTimeout: Double?

    @Option(help: "Seconds an incoming pre-copy whose link broke keeps what it received, for `migratectl migrate VM --resume` at its source to carry on from (default 60; 0: keep nothing).")
    var precopyResumeGrace: Double?

    @Flag(help: "Accept incoming migrations without TLS (only with --incoming-listen or incoming.listen).")
    var incomingPlaintext = false

    func run() async throws {
        limitMallocArenas()
        var overrides = DaemonConfiguration.Overrides()
        overrides.socket = socket
        overrides.inDoubtDirectory = inDoubtDir
        overrides.logLevel = logLevel
        overrides.memoryBudgetMib = try memoryBudget.map { try parseMiB($0) }
        overrides.guestMemory = guestMemory
        overrides.tlsCertificate = tlsCertificate
        overrides.tlsKey = tlsKey
        overrides.tlsCA = tlsCA
        overrides.allowedPeers = allowPeer
        overrides.incomingListen = incomingListen
        overrides.incomingPlaintext = incomingPlaintext
        overrides.postcopyRecoveryTimeoutSeconds = postcopyRecoveryTimeout
        overrides.precopyResumeGraceSeconds = precopyResumeGrace
        let file = try config.map { path throws in try DaemonConfiguration.load(from: path) } ?? DaemonConfiguration()
        let settings: ValidatedConfiguration
        do { settings = try file.merging(overrides).validated() } catch { throw ValidationError(error.description) }
        let fault: FaultInjection?
        do { fault = try FaultInjection.fromEnvironment(ProcessInfo.processInfo.environment) } catch { throw ValidationError(error.description) }

        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = settings.logLevel
            return handler
        }
        let logger = Logger(label: "migrated")
        if let fault {
            logger.warning("test hook armed: this daemon will exit on purpose during incoming migrations",
                           metadata: ["fault": "\(fault.rawValue)", "variable": "\(FaultInjection.environmentVariable)"])
        }
        let daemon = Daemon(configuration: settings, logger: logger, incoming: EngineIncomingListener(logger: logger, fault: fault))

        // SIGINT and SIGTERM shut the service group down gracefully: the control server ends, then the shutdown
        // below stops the VMs and removes the socket.
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(
            services: [.init(service: DaemonService(daemon: daemon), serviceName: "migrated")],
            gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        var failure: (any Error)?
        do { try await group.run() } catch { failure = error }
        await daemon.shutdown()
        if let failure {
            logger.critical("\(failure)")
            throw ExitCode.failure
        }
    }
}

func parseMiB(_ text: String) throws -> UInt64 {
    let units: [Character: UInt64] = ["M": 1, "G": 1 << 10, "T": 1 << 20]
    let upper = text.uppercased()
    if let unit = upper.last.flatMap({ units[$0] }), let value = UInt64(upper.dropLast()), value > 0 { return value * unit }
    throw ValidationError("not a memory size: \(text) (use e.g. 512M or 16G)")
}

/// glibc gives a thread that finds the existing malloc arenas busy an arena of its own, up to 8 per core, and
/// keeps what is freed in an arena for that arena's later use. Every migration runs on short-lived threads
/// (per channel, watchdog, gatherer, receiver) whose buffers (records, TLS, compression contexts) land in
/// whichever arena they got; the daemon's resident memory therefore climbed for about 50 migrations to a plateau
/// some 70-90 MiB above where it started on this 2-core host (bench/reliability/soak.py), and more arenas
/// are allowed, and kept, on a host with more cores. With 2 arenas the plateau comes within 10 migrations and
/// is 50-60 MiB lower, and migrations took as long as before (median 0.15 s against 0.17 s, 64 MiB working set):
/// the page data path allocates nothing per page. MALLOC_ARENA_MAX in the environment overrides this.
private func limitMallocArenas() {
    guard getenv("MALLOC_ARENA_MAX") == nil else { return }
    _ = mallopt(CKVM_M_ARENA_MAX, 2)
}

/// The daemon as a service of swift-service-lifecycle, which turns the signals into a graceful shutdown.
struct DaemonService: Service {
    let daemon: Daemon

    func run() async throws {
        do {
            try await cancelWhenGracefulShutdown { try await daemon.run() }
        } catch where Task.isShuttingDownGracefully {
            // A server stopped by a signal ends with whatever its sockets said (cancelled, disconnected): not a failure.
        }
    }
}
