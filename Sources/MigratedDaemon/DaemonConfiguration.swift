import Foundation
import Glibc
import Logging
import LinuxSystem
import MigratedAPI
import MicroVM

/// The daemon's TLS identity and trust, used for outgoing migrations and by the incoming listener alike.
/// Maps one to one onto Transport.TLSConfiguration.
public struct TLSFiles: Codable, Sendable, Equatable {
    /// PEM: our certificate (and intermediates), its private key, and the CA peers' certificates must chain to.
    public var certificate: String
    public var key: String
    public var ca: String
    /// Names a peer's certificate must carry (subjectAltName DNS, or CN) to be accepted, in both directions.
    public var allowedPeers: [String]

    public init(certificate: String, key: String, ca: String, allowedPeers: [String]) {
        self.certificate = certificate
        self.key = key
        self.ca = ca
        self.allowedPeers = allowedPeers
    }
}

/// The incoming-migration listener's settings, validated.
public struct IncomingMigrationSettings: Sendable, Equatable {
    public enum Security: Sendable, Equatable {
        /// Only when the configuration says `"plaintext": true`.
        case plaintext
        case tls(TLSFiles)
    }

    public var address: PeerAddress
    public var security: Security
    /// What holds the RAM of the VMs that arrive.
    public var memoryBacking: GuestMemory.Backing
    /// How long an arriving guest whose post-copy link broke waits for its source to resume; set by validation to
    /// `ValidatedConfiguration.postCopyRecoveryTimeout`.
    public var postCopyRecoveryTimeout: Double
    /// How long the memory of an arriving pre-copy whose link broke is kept for a resume (stream.md §6.15); 0 keeps none.
    public var preCopyResumeGrace: Double

    public init(address: PeerAddress, security: Security, memoryBacking: GuestMemory.Backing = .sharedMemory,
                postCopyRecoveryTimeout: Double = DaemonConfiguration.defaultPostCopyRecoveryTimeout,
                preCopyResumeGrace: Double = DaemonConfiguration.defaultPreCopyResumeGrace) {
        self.address = address
        self.security = security
        self.memoryBacking = memoryBacking
        self.postCopyRecoveryTimeout = postCopyRecoveryTimeout
        self.preCopyResumeGrace = preCopyResumeGrace
    }
}

/// The daemon's configuration file (JSON, snake_case keys, every field optional) and the defaults.
/// Flags override the file field by field (see `merging`).
///
///     {
///       "socket": "/run/migrated/control.sock",
///       "log_level": "info",
///       "memory_budget_mib": 16384,
///       "guest_memory": "huge-pages",
///       "tls": { "certificate": "/etc/migrated/host.pem", "key": "/etc/migrated/host.key",
///                "ca": "/etc/migrated/ca.pem", "allowed_peers": ["host-b"] },
///       "incoming": { "listen": "0.0.0.0:7070" },
///       "in_doubt_directory": "/var/lib/migrated/in-doubt"
///     }
public struct DaemonConfiguration: Codable, Sendable, Equatable {
    public var socket: String?
    public var logLevel: String?
    /// Guest memory all VMs together may hold; the host's RAM when absent.
    public var memoryBudgetMib: UInt64?
    /// What holds guest RAM, for VMs started here and VMs that migrate here: "shared-memory" (the default) or
    /// "huge-pages" (2 MiB pages from the host's pool, `/proc/sys/vm/nr_hugepages`).
    public var guestMemory: String?
    public var tls: TLSFiles?
    public var incoming: Incoming?
    /// Where a daemon that shuts down saves each VM a migration left in doubt (control-api.md §3.7), since its guest
    /// may run nowhere else.
    public var inDoubtDirectory: String?
    /// Seconds a post-copy whose link broke waits for a resume, on either side, before it gives up: the destination
    /// then stops the guest as failed and the source's VM stays paused, in doubt (default 60; 0 gives up at once).
    public var postcopyRecoveryTimeoutSeconds: Double?
    /// Seconds the memory of an incoming pre-copy whose link broke is kept, never started, for its source to resume
    /// the migration from (default 60; 0 keeps none). It counts against the memory budget meanwhile.
    public var precopyResumeGraceSeconds: Double?

    public struct Incoming: Codable, Sendable, Equatable {
        /// `host:port`, `[v6-address]:port` or `unix:/path`.
        public var listen: String
        /// Accept migrations without TLS. Must be said explicitly; without it the `tls` section is required.
        public var plaintext: Bool?

        public init(listen: String, plaintext: Bool? = nil) {
            self.listen = listen
            self.plaintext = plaintext
        }
    }

    public static let defaultSocket = "/run/migrated/control.sock"
    public static let defaultInDoubtDirectory = "/var/lib/migrated/in-doubt"
    public static let defaultPostCopyRecoveryTimeout: Double = 60
    public static let defaultPreCopyResumeGrace: Double = 60

    public init(socket: String? = nil, logLevel: String? = nil, memoryBudgetMib: UInt64? = nil, guestMemory: String? = nil,
                tls: TLSFiles? = nil, incoming: Incoming? = nil, inDoubtDirectory: String? = nil,
                postcopyRecoveryTimeoutSeconds: Double? = nil, precopyResumeGraceSeconds: Double? = nil) {
        self.socket = socket
        self.logLevel = logLevel
        self.memoryBudgetMib = memoryBudgetMib
        self.guestMemory = guestMemory
        self.tls = tls
        self.incoming = incoming
        self.inDoubtDirectory = inDoubtDirectory
        self.postcopyRecoveryTimeoutSeconds = postcopyRecoveryTimeoutSeconds
        self.precopyResumeGraceSeconds = precopyResumeGraceSeconds
    }

    /// Reads a configuration file; unknown keys are refused, so that a misspelt setting is not silently ignored.
    public static func load(from path: String) throws(ConfigurationError) -> DaemonConfiguration {
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path)) } catch {
            throw ConfigurationError("cannot read configuration file \(path): \(error.localizedDescription)")
        }
        do {
            return try APIJSON.decodeRequest(DaemonConfiguration.self, from: data)
        } catch {
            throw ConfigurationError("configuration file \(path): \(error.message)")
        }
    }

    /// This configuration with every field that `overrides` sets replacing ours (flags over the file).
    /// TLS and incoming settings are replaced field by field too, so one flag can change one file.
    public func merging(_ overrides: Overrides) -> DaemonConfiguration {
        var merged = self
        if let socket = overrides.socket { merged.socket = socket }
        if let logLevel = overrides.logLevel { merged.logLevel = logLevel }
        if let budget = overrides.memoryBudgetMib { merged.memoryBudgetMib = budget }
        if let backing = overrides.guestMemory { merged.guestMemory = backing }
        if overrides.tlsCertificate != nil || overrides.tlsKey != nil || overrides.tlsCA != nil || !overrides.allowedPeers.isEmpty {
            var tls = merged.tls ?? TLSFiles(certificate: "", key: "", ca: "", allowedPeers: [])
            if let value = overrides.tlsCertificate { tls.certificate = value }
            if let value = overrides.tlsKey { tls.key = value }
            if let value = overrides.tlsCA { tls.ca = value }
            if !overrides.allowedPeers.isEmpty { tls.allowedPeers = overrides.allowedPeers }
            merged.tls = tls
        }
        if let listen = overrides.incomingListen {
            merged.incoming = Incoming(listen: listen, plaintext: merged.incoming?.plaintext)
        }
        if overrides.incomingPlaintext, merged.incoming != nil { merged.incoming?.plaintext = true }
        if let directory = overrides.inDoubtDirectory { merged.inDoubtDirectory = directory }
        if let seconds = overrides.postcopyRecoveryTimeoutSeconds { merged.postcopyRecoveryTimeoutSeconds = seconds }
        if let seconds = overrides.precopyResumeGraceSeconds { merged.precopyResumeGraceSeconds = seconds }
        return merged
    }

    /// Settings given on the command line.
    public struct Overrides: Sendable {
        public var socket: String?
        public var logLevel: String?
        public var memoryBudgetMib: UInt64?
        public var guestMemory: String?
        public var tlsCertificate: String?
        public var tlsKey: String?
        public var tlsCA: String?
        public var allowedPeers: [String] = []
        public var incomingListen: String?
        public var incomingPlaintext = false
        public var inDoubtDirectory: String?
        public var postcopyRecoveryTimeoutSeconds: Double?
        public var precopyResumeGraceSeconds: Double?

        public init() {}
    }

    /// Checks everything that can be checked before the daemon starts, and fills in the defaults.
    public func validated(hostMemory: UInt64 = DaemonConfiguration.hostMemory()) throws(ConfigurationError) -> ValidatedConfiguration {
        let socket = self.socket ?? Self.defaultSocket
        guard !socket.isEmpty, socket.utf8.count < 108 else {
            throw ConfigurationError("socket path must be 1 to 107 bytes long, not '\(socket)'")
        }
        let levelName = logLevel ?? "info"
        guard let level = Logger.Level(rawValue: levelName) else {
            throw ConfigurationError("log_level '\(levelName)' is not one of \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        if memoryBudgetMib == 0 { throw ConfigurationError("memory_budget_mib must be positive") }
        let budget = memoryBudgetMib.map { $0 << 20 } ?? hostMemory
        let backingName = guestMemory ?? GuestMemory.Backing.sharedMemory.rawValue
        guard let backing = GuestMemory.Backing(rawValue: backingName) else {
            throw ConfigurationError("guest_memory '\(backingName)' is not one of \(GuestMemory.Backing.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        if let tls { try Self.check(tls) }
        let recovery = postcopyRecoveryTimeoutSeconds ?? Self.defaultPostCopyRecoveryTimeout
        guard recovery.isFinite, recovery >= 0 else {
            throw ConfigurationError("postcopy_recovery_timeout_seconds must be 0 or more, not \(recovery)")
        }
        let grace = precopyResumeGraceSeconds ?? Self.defaultPreCopyResumeGrace
        guard grace.isFinite, grace >= 0 else {
            throw ConfigurationError("precopy_resume_grace_seconds must be 0 or more, not \(grace)")
        }
        var incomingSettings: IncomingMigrationSettings?
        if let incoming {
            guard let address = PeerAddress(incoming.listen) else {
                throw ConfigurationError("incoming.listen '\(incoming.listen)' is not host:port, [v6-address]:port or unix:/path")
            }
            if incoming.plaintext == true {
                incomingSettings = IncomingMigrationSettings(address: address, security: .plaintext, memoryBacking: backing,
                                                             postCopyRecoveryTimeout: recovery, preCopyResumeGrace: grace)
            } else if let tls {
                incomingSettings = IncomingMigrationSettings(address: address, security: .tls(tls), memoryBacking: backing,
                                                             postCopyRecoveryTimeout: recovery, preCopyResumeGrace: grace)
            } else {
                throw ConfigurationError("incoming migrations need the tls section (certificate, key, ca, allowed_peers), or \"plaintext\": true to accept them unencrypted")
            }
        }
        let inDoubt = inDoubtDirectory ?? Self.defaultInDoubtDirectory
        guard inDoubt.hasPrefix("/") else { throw ConfigurationError("in_doubt_directory must be an absolute path, not '\(inDoubt)'") }
        return ValidatedConfiguration(socketPath: socket, logLevel: level, memoryBudget: budget, memoryBacking: backing,
                                      tls: tls, incoming: incomingSettings, inDoubtDirectory: inDoubt, postCopyRecoveryTimeout: recovery)
    }

    private static func check(_ tls: TLSFiles) throws(ConfigurationError) {
        for (name, path) in [("certificate", tls.certificate), ("key", tls.key), ("ca", tls.ca)] {
            guard !path.isEmpty else { throw ConfigurationError("tls.\(name) is missing") }
            guard access(path, R_OK) == 0 else {
                throw ConfigurationError("tls.\(name) \(path) cannot be read: \(String(cString: strerror(errno)))")
            }
        }
        // No allow-list would mean any holder of a certificate from the CA could send or receive our VMs.
        guard !tls.allowedPeers.isEmpty else { throw ConfigurationError("tls.allowed_peers must name at least one peer") }
        if let empty = tls.allowedPeers.first(where: { $0.isEmpty || $0.contains(" ") }) {
            throw ConfigurationError("tls.allowed_peers has an invalid name '\(empty)'")
        }
    }

    /// MemTotal from /proc/meminfo, the default memory budget.
    public static func hostMemory() -> UInt64 { memoryInfo("MemTotal").map { $0 << 10 } ?? 1 << 30 }
}

extension DaemonConfiguration: StrictlyDecodable {
    public static let fieldNames: Set<String> = ["socket", "log_level", "memory_budget_mib", "guest_memory", "tls", "incoming",
                                                 "in_doubt_directory", "postcopy_recovery_timeout_seconds", "precopy_resume_grace_seconds"]
}

/// The configuration the daemon runs with: defaults filled in, files checked.
public struct ValidatedConfiguration: Sendable, Equatable {
    public var socketPath: String
    public var logLevel: Logger.Level
    public var memoryBudget: UInt64
    /// For VMs started here; incoming ones take `incoming.memoryBacking`, which validation sets to the same.
    public var memoryBacking: GuestMemory.Backing
    public var tls: TLSFiles?
    public var incoming: IncomingMigrationSettings?
    /// Where VMs in doubt are saved when the daemon shuts down.
    public var inDoubtDirectory: String
    /// Seconds a post-copy whose link broke waits for a resume, as the sender (incoming migrations have theirs in
    /// `incoming`).
    public var postCopyRecoveryTimeout: Double
    /// Not in the file: the stated limits of control-api.md §1.1; tests shorten the timeout.
    public var controlLimits: ControlLimits

    public init(socketPath: String, logLevel: Logger.Level = .info, memoryBudget: UInt64,
                memoryBacking: GuestMemory.Backing = .sharedMemory, tls: TLSFiles? = nil,
                incoming: IncomingMigrationSettings? = nil, inDoubtDirectory: String = DaemonConfiguration.defaultInDoubtDirectory,
                postCopyRecoveryTimeout: Double = DaemonConfiguration.defaultPostCopyRecoveryTimeout,
                controlLimits: ControlLimits = ControlLimits()) {
        self.socketPath = socketPath
        self.logLevel = logLevel
        self.memoryBudget = memoryBudget
        self.memoryBacking = memoryBacking
        self.tls = tls
        self.incoming = incoming
        self.inDoubtDirectory = inDoubtDirectory
        self.postCopyRecoveryTimeout = postCopyRecoveryTimeout
        self.controlLimits = controlLimits
    }
}

public struct ConfigurationError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
