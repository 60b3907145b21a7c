import ArgumentParser
import Foundation
import Glibc
import MigratedAPI

/// `migratectl`: drives a `migrated` daemon through its control API (protocol/control-api.md).
@main
struct MigrateCtl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migratectl",
        abstract: "Drive the migrated daemon: start, list, show and stop VMs; migrate them and follow the migration.",
        subcommands: [VM.self, Migrate.self, Migration.self, Metrics.self])
}

struct ClientOptions: ParsableArguments {
    @Option(help: "The daemon's control socket (default: $MIGRATED_SOCKET, else /run/migrated/control.sock).")
    var socket: String = ProcessInfo.processInfo.environment["MIGRATED_SOCKET"] ?? "/run/migrated/control.sock"

    @Flag(help: "Print the API's JSON documents instead of text.")
    var json = false

    var client: ControlClient { ControlClient(socketPath: socket) }

    func print<T: Encodable>(_ value: T, text: (T) -> String) throws {
        if json { Swift.print(String(decoding: try APIJSON.encode(value), as: UTF8.self)) } else { Swift.print(text(value)) }
    }
}

/// Runs a command body and turns the daemon's refusals into one line on standard error and exit status 1.
func reportingErrors(_ body: () async throws -> Void) async throws {
    do {
        try await body()
    } catch let error as APIError {
        FileHandle.standardError.write(Data("migratectl: \(error.message) (\(error.error))\n".utf8))
        throw ExitCode.failure
    } catch let error as ControlClient.ConnectionError {
        FileHandle.standardError.write(Data("migratectl: \(error)\n".utf8))
        throw ExitCode.failure
    }
}

func describe(_ vm: VMInfo) -> String {
    var lines = [
        "id:           \(vm.id)",
        "state:        \(vm.state.rawValue)\(vm.stopReason.map { " (\($0))" } ?? "")",
        "image:        \(vm.image)",
        "memory:       \(vm.memoryMib) MiB, \(vm.memoryBacking)",
        "vcpus:        \(vm.vcpus)",
        "cmdline:      \(vm.cmdline)",
        "started:      \(vm.startedAt)",
        "uptime:       \(Formatting.seconds(vm.uptimeSeconds))",
        "console:      \(vm.consoleLines) lines\(vm.consoleLog.map { " (log: \($0))" } ?? "")",
    ]
    if let line = vm.lastConsoleLine { lines.append("last line:    \(line)") }
    if let doubt = vm.inDoubt { lines.append("IN DOUBT:     \(doubt.reason)") }
    if let peer = vm.arrivingFrom { lines.append("arriving:     from \(peer); its migration has not ended (in post-copy, pages are still coming)") }
    if let pause = vm.postcopyPause {
        lines.append("postcopy-paused: the link to the source broke\(pause.reason.map { " (\($0))" } ?? ""); waits \(Formatting.seconds(pause.waitSecondsLeft)) "
            + "more for the source to resume, then the VM is stopped as failed")
    }
    return lines.joined(separator: "\n")
}

/// The state as lists show it: a VM paused by a migration in doubt stands out from one paused on request, and one
/// whose migration here has not ended (its guest runs, in post-copy with pages missing) from one that has arrived.
func stateLabel(_ vm: VMInfo) -> String {
    vm.inDoubt != nil ? "in-doubt" : vm.postcopyPause != nil ? "postcopy-paused" : vm.arrivingFrom != nil ? "arriving" : vm.state.rawValue
}

// MARK: vm

struct VM: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Manage VMs.", subcommands: [Start.self, List.self, Show.self, Pause.self, Resume.self, Stop.self, Delete.self])

    struct Start: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Boot a guest image; prints the new VM's id.")
        @OptionGroup var options: ClientOptions
        @Option(help: "PVH-bootable ELF, on the daemon's host.") var image: String
        @Option(help: "Guest memory in MiB, or with a unit: 512M, 2G.") var memory: String
        @Option(help: "Number of vCPUs.") var vcpus = 1
        @Option(help: "The guest's command line.") var cmdline = ""
        @Option(help: "File the daemon appends the guest's console to.") var consoleLog: String?
        @Option(help: "Choose the VM's id instead of letting the daemon pick one.") var id: String?
        @Option(help: "Dirty tracking: bitmap or ring.") var dirtyTracking = VMCreateRequest.DirtyTracking.bitmap

        func run() async throws {
            let memoryMib = try parseMiB(memory)
            try await reportingErrors {
                let vm = try await options.client.createVM(VMCreateRequest(
                    id: id, image: absolutePath(image), memoryMib: memoryMib, vcpus: vcpus, cmdline: cmdline,
                    consoleLog: consoleLog.map(absolutePath), dirtyTracking: dirtyTracking))
                try options.print(vm) { $0.id }
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List VMs.")
        @OptionGroup var options: ClientOptions

        func run() async throws {
            try await reportingErrors {
                let vms = try await options.client.listVMs()
                try options.print(VMList(vms: vms)) { list in
                    let header = "ID".padding(toLength: 20, withPad: " ", startingAt: 0) + "STATE           MEMORY  VCPUS  UPTIME    LAST CONSOLE LINE"
                    return ([header] + list.vms.map { vm in
                        vm.id.padding(toLength: 20, withPad: " ", startingAt: 0)
                            + stateLabel(vm).padding(toLength: 16, withPad: " ", startingAt: 0)
                            + "\(vm.memoryMib)M".padding(toLength: 8, withPad: " ", startingAt: 0)
                            + "\(vm.vcpus)".padding(toLength: 7, withPad: " ", startingAt: 0)
                            + Formatting.seconds(vm.uptimeSeconds).padding(toLength: 10, withPad: " ", startingAt: 0)
                            + (vm.lastConsoleLine ?? "")
                    }).joined(separator: "\n")
                }
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show one VM's status.")
        @OptionGroup var options: ClientOptions
        @Argument(help: "The VM's id.") var vm: String

        func run() async throws {
            try await reportingErrors { try options.print(try await options.client.vm(vm), text: describe) }
        }
    }

    struct Pause: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Pause a VM's vCPUs until it is resumed.")
        @OptionGroup var options: ClientOptions
        @Argument(help: "The VM's id.") var vm: String

        func run() async throws {
            try await reportingErrors { try options.print(try await options.client.pauseVM(vm)) { "\($0.id) \($0.state.rawValue)" } }
        }
    }

    struct Resume: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Let a paused VM run again.",
            discussion: """
            A VM whose migration committed the switchover without hearing that the destination started it is paused \
            "in doubt": the guest may run at the destination. Ask the destination daemon first (migratectl vm show ID \
            --socket THEIRS); if it runs there, delete the VM here; only if it does not, resume it here with --force.
            """)
        @OptionGroup var options: ClientOptions
        @Argument(help: "The VM's id.") var vm: String
        @Flag(help: "Resume a VM left in doubt by a migration, once it is certain that it does not run at the destination.")
        var force = false

        func run() async throws {
            try await reportingErrors {
                try options.print(try await options.client.resumeVM(vm, force: force)) { "\($0.id) \($0.state.rawValue)" }
            }
        }
    }

    struct Stop: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stop a VM; it stays listed, as stopped, until deleted.")
        @OptionGroup var options: ClientOptions
        @Argument(help: "The VM's id.") var vm: String

        func run() async throws {
            try await reportingErrors { try options.print(try await options.client.stopVM(vm)) { "\($0.id) \($0.state.rawValue)" } }
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stop a VM if it runs, and forget it.")
        @OptionGroup var options: ClientOptions
        @Argument(help: "The VM's id.") var vm: String

        func run() async throws {
            try await reportingErrors { try options.print(try await options.client.deleteVM(vm)) { "\($0.id) deleted" } }
        }
    }
}

// MARK: migrate

struct Migrate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Live-migrate a VM to a peer daemon and follow it to the end.",
        discussion: """
        Progress is one line per update when standard output is not a terminal, and a line updated in place when it is. \
        Its ETA is the engine's prediction, made again after every pass.

        With --dry-run nothing migrates: the daemon samples the guest's dirty log for half a second (the guest runs \
        throughout, tracked as a migration would track it, then untracked), probes the link with 64 MiB of copies of \
        the guest's pages sent to the peer with these options (the peer records it as a failed incoming migration), \
        and prints the predicted passes, total time and downtime, and whether the migration will converge.
        """)
    @OptionGroup var options: ClientOptions
    @Argument(help: "The VM's id.") var vm: String
    @Option(help: "The peer's migration address: host:port, [v6]:port or unix:/path (required, except with --resume).") var to: String?
    @Option(help: "Parallel channels (1-16).") var channels = 1
    @Option(help: "none, lz4, zstd or adaptive.") var compression = MigrationCompression.lz4
    @Flag(help: "Send without TLS (the peer must accept plaintext).") var plaintext = false
    @Option(help: "Cap on the wire, in bytes per second, with an optional unit: 500M, 1G.") var bandwidth: String?
    @Option(help: "Longest pause of the guest at switchover, in milliseconds.") var downtimeLimitMs: UInt64 = 300
    @Flag(help: "Give up instead of throttling a guest that dirties memory faster than the link.") var noAutoConverge = false
    @Flag(help: ArgumentHelp("Finish in post-copy where pre-copy alone would not meet the downtime limit.",
                             discussion: "The destination runs the guest before it has every page and asks for each one the guest touches; the source stays paused until the last has come. The destination must keep guest memory in shared memory, not huge pages."))
    var postcopy = false
    @Option(name: .customLong("postcopy-after"), help: ArgumentHelp("Switch to post-copy after this many pre-copy passes at the latest (implies --postcopy).", valueName: "passes"))
    var postcopyAfter: Int?
    @Flag(help: ArgumentHelp("Carry on the VM's broken migration, and follow it.",
                             discussion: "A post-copy whose link broke (phase postcopy-paused): both daemons wait --postcopy-recovery-timeout seconds (default 60) for this; the source reconnects to the same destination, the two agree on the pages still missing, and post-copy goes on. A pre-copy that failed before the switchover: the destination keeps what it received for --precopy-resume-grace seconds (default 60), and a new migration to it sends only the pages it lacks or holds in an older version; when it kept nothing, all of memory goes, and the report says why. Takes no --to; the other migration options are ignored: it carries on as the migration was asked."))
    var resume = false
    @Flag(help: "Return once the migration has started, without following it.") var detach = false
    @Flag(help: "Predict the migration without migrating: measure the guest and the link, print the prediction.") var dryRun = false
    @Option(help: "Seconds between progress updates.") var interval = 0.5

    func validate() throws {
        if resume && to != nil { throw ValidationError("--resume carries on the broken migration to where it went; it takes no --to") }
        if !resume && to == nil { throw ValidationError("missing --to: the peer's migration address") }
    }

    func run() async throws {
        let request = resume ? MigrationRequest.resuming : MigrationRequest(
            peer: to ?? "", channels: channels, compression: compression, security: plaintext ? .plaintext : .tls,
            bandwidthLimitBytesPerSecond: try bandwidth.map(parseBytes), downtimeLimitMs: downtimeLimitMs,
            autoConverge: !noAutoConverge, postcopy: postcopy || postcopyAfter != nil, postcopyAfterPasses: postcopyAfter)
        if let problem = request.problem() { throw ValidationError(problem) }
        if dryRun {
            return try await reportingErrors { try options.print(try await options.client.predictMigration(vm, request), text: Formatting.prediction) }
        }
        try await reportingErrors {
            var status = try await options.client.migrate(vm, request)
            if detach { return try options.print(status, text: Formatting.progressLine) }
            let terminal = isatty(STDOUT_FILENO) == 1 && !options.json
            while !status.phase.isFinal {
                if !options.json {
                    // On a terminal, the line is rewritten in place (\r, then clear to its end).
                    if terminal { print("\r\(Formatting.progressLine(status))\u{1B}[K", terminator: "") } else { print(Formatting.progressLine(status)) }
                    fflush(nil) // every output stream: Swift 6 does not let this code name the C global `stdout`
                }
                try await Task.sleep(nanoseconds: UInt64(interval * 1e9))
                status = try await options.client.migration(vm)
            }
            if terminal { print("\r\(Formatting.progressLine(status))\u{1B}[K") } else if !options.json { print(Formatting.progressLine(status)) }
            try options.print(status) { status in
                status.report.map { Formatting.report($0, vm: status.vm, peer: status.peer) } ?? "migration \(status.phase.rawValue)"
            }
            if status.phase != .completed { throw ExitCode.failure }
        }
    }
}

struct Migration: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "A VM's current or last migration; migrations into this daemon.",
                                                    subcommands: [Show.self, Cancel.self, Discard.self, Incoming.self])

    struct Incoming: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the latest migrations into this daemon that ended, and how.")
        @OptionGroup var options: ClientOptions

        func run() async throws {
            try await reportingErrors {
                let records = try await options.client.incomingMigrations()
                try options.print(IncomingMigrationList(migrations: records)) { list in
                    list.migrations.map { record in
                        "\(record.finishedAt)  \(record.outcome.rawValue.padding(toLength: 9, withPad: " ", startingAt: 0))"
                            + "\(record.vm ?? "-")  from \(record.peer)\(record.error.map { ": \($0)" } ?? "")"
                            + (record.postCopy.map { "  (\(Formatting.postCopy($0)))" } ?? "")
                    }.joined(separator: "\n")
                }
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show a migration's progress, or its report once it has ended.")
        @OptionGroup var options: ClientOptions
        @Argument(help: "The VM's id.") var vm: String

        func run() async throws {
            try await reportingErrors {
                try options.print(try await options.client.migration(vm)) { status in
                    status.report.map { Formatting.report($0, vm: status.vm, peer: status.peer) } ?? Formatting.progressLine(status)
                }
            }
        }
    }

    struct Discard: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Tell the destination of a broken migration to drop what it keeps for a resume.",
            discussion: "For a VM whose last migration failed before the switchover (its report says the destination may keep what it received): the destination frees that memory now instead of at the end of its grace period, and migrate --resume no longer applies.")
        @OptionGroup var options: ClientOptions
        @Argument(help: "The VM's id.") var vm: String

        func run() async throws {
            try await reportingErrors {
                try options.print(try await options.client.discardKeptMemory(vm)) { "migration of \($0.vm) to \($0.peer): the destination keeps nothing for a resume" }
            }
        }
    }

    struct Cancel: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Cancel a migration before switchover; the VM keeps running here.")
        @OptionGroup var options: ClientOptions
        @Argument(help: "The VM's id.") var vm: String

        func run() async throws {
            try await reportingErrors {
                try options.print(try await options.client.cancelMigration(vm)) { "migration of \($0.vm): \($0.phase.rawValue)" }
            }
        }
    }
}

struct Metrics: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print the daemon's metrics (Prometheus text format).")
    @Option(help: "The daemon's control socket (default: $MIGRATED_SOCKET, else /run/migrated/control.sock).")
    var socket: String = ProcessInfo.processInfo.environment["MIGRATED_SOCKET"] ?? "/run/migrated/control.sock"

    func run() async throws {
        try await reportingErrors { print(try await ControlClient(socketPath: socket).metrics(), terminator: "") }
    }
}

extension VMCreateRequest.DirtyTracking: ExpressibleByArgument {}
extension MigrationCompression: ExpressibleByArgument {}

/// `512` (MiB), `512M`, `2G`.
func parseMiB(_ text: String) throws -> UInt64 {
    let units: [Character: UInt64] = ["M": 1, "G": 1 << 10, "T": 1 << 20]
    let upper = text.uppercased()
    if let value = UInt64(upper) { return value }
    if let unit = upper.last.flatMap({ units[$0] }), let value = UInt64(upper.dropLast()) { return value * unit }
    throw ValidationError("not a memory size: \(text) (use e.g. 512M or 2G)")
}

/// `1000000`, `500K`, `500M`, `1G` (binary units).
func parseBytes(_ text: String) throws -> UInt64 {
    let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30]
    let upper = text.uppercased()
    if let value = UInt64(upper) { return value }
    if let unit = upper.last.flatMap({ units[$0] }), let value = UInt64(upper.dropLast()) { return value * unit }
    throw ValidationError("not a byte count: \(text) (use e.g. 500M or 1G)")
}

