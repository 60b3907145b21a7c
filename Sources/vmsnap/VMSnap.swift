import ArgumentParser
import Foundation
import Glibc
import KVMMigration
import MicroVM
import MigratedAPI
import Snapshots

/// `vmsnap`: take, restore, inspect, verify, compare, merge and convert snapshots (protocol/snapshot.md).
@main
struct VMSnap: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vmsnap",
        abstract: "Snapshots of VMs: save and restore them, and inspect, verify, compare, merge and convert snapshot files.",
        discussion: """
            Exit status: 0 success (for diff: the snapshots' memory is identical); 1 a snapshot is bad (checksum, \
            truncation, corruption, broken chain, digest) or, for diff, the memory differs; 2 the operation failed \
            for another reason (file system, daemon, guest); 64 the command line is wrong.
            """,
        subcommands: [Save.self, Restore.self, Inspect.self, Verify.self, Diff.self, Merge.self, Convert.self])
}

/// Exit statuses, as documented in `vmsnap --help`.
enum Status {
    static let bad: Int32 = 1
    static let failed: Int32 = 2
}

/// Runs a command body, turning errors into one line on standard error and the documented exit status.
func reporting(_ body: () async throws -> Void) async throws {
    do {
        try await body()
    } catch let error as SnapshotError {
        fail(error, status: isDamage(error) ? Status.bad : Status.failed)
    } catch let error as APIError {
        fail("\(error.message) (\(error.error))", status: Status.failed)
    } catch let error as ExitCode {
        throw error
    } catch let error as ValidationError {
        throw error
    } catch {
        fail(error, status: Status.failed)
    }
}

private func fail(_ error: Any, status: Int32) -> Never {
    FileHandle.standardError.write(Data("vmsnap: \(error)\n".utf8))
    exit(status)
}

/// Whether the error says a file is bad, as opposed to the operation failing.
func isDamage(_ error: SnapshotError) -> Bool {
    switch error {
    case .notASnapshot, .truncated, .checksumMismatch, .corrupt, .chain, .digestMismatch, .unsupported: true
    case .io, .guest, .didNotConverge: false
    }
}

func printJSON(_ value: some Encodable) throws {
    print(String(decoding: try APIJSON.encode(value), as: UTF8.self))
}

func note(_ text: String) { FileHandle.standardError.write(Data("\(text)\n".utf8)) }

struct DaemonOptions: ParsableArguments {
    @Option(help: "The migrated daemon's control socket (default: $MIGRATED_SOCKET, else /run/migrated/control.sock).")
    var socket: String = ProcessInfo.processInfo.environment["MIGRATED_SOCKET"] ?? "/run/migrated/control.sock"

    var client: ControlClient { ControlClient(socketPath: socket) }
}

enum CompressionChoice: String, ExpressibleByArgument, CaseIterable {
    case lz4, zstd
    var writer: SnapshotWriter.Compression { self == .lz4 ? .lz4 : .zstd }
}

// MARK: save

struct Save: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Save a VM that runs in migrated to a snapshot file.")

    @Argument(help: "The VM's id in the daemon.") var vm: String
    @Argument(help: "The snapshot file to write (a path on the daemon's host).") var path: String
    @Flag(help: "Save only what changed since the VM's last snapshot (a diff on top of it).") var diff = false
    @Flag(help: "Pause the VM for the whole save instead of copying memory while it runs.") var paused = false
    @Flag(help: "Write the compressed layout (smaller; restores read it block by block).") var compressed = false
    @Option(help: "Compression for --compressed: lz4 or zstd.") var compression: CompressionChoice = .zstd
    @Flag(help: "Replace an existing file.") var overwrite = false
    @Flag(help: "Print the final status as JSON.") var json = false
    @OptionGroup var daemon: DaemonOptions

    func run() async throws {
        try await reporting {
            let request = SnapshotRequest(path: absolutePath(path), kind: diff ? .diff : .full, live: !paused,
                                          format: compressed ? .compressed : .plain, compression: compression == .lz4 ? .lz4 : .zstd,
                                          overwrite: overwrite)
            var status = try await daemon.client.saveSnapshot(vm, request)
            let bar = ProgressBar("saving \(vm)", quiet: json)
            while status.state == .running {
                try await Task.sleep(nanoseconds: 200_000_000)
                status = try await daemon.client.snapshot(vm)
                bar.update(done: status.pagesDone, total: status.pagesTotal, bytesPerSecond: status.rateBytesPerSecond)
            }
            bar.finish()
            if json { try printJSON(status) }
            guard status.state == .completed else { fail(status.error ?? "the snapshot failed", status: Status.failed) }
            if !json {
                let pages = status.dataPages ?? 0
                print("saved \(status.path): \(status.kind.rawValue) snapshot \(status.snapshotId ?? "?"), \(pages) data pages (\(Formatting.bytes(Double(pages) * 4096))), "
                    + "file \(Formatting.bytes(Double(status.fileBytes ?? 0))), guest paused \(Formatting.seconds((status.pauseMs ?? 0) / 1000)), "
                    + "took \(Formatting.seconds(status.elapsedSeconds))")
            }
        }
    }
}

// MARK: restore

struct Restore: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Restore a snapshot: into a VM run by this command (its console on standard output), or into migrated.")

    @Argument(help: "The snapshot file (for a diff, its parents are found beside it or given with --parent).") var path: String
    @Option(name: .customLong("parent"), help: "A parent of the snapshot, nearest first; repeat for each.") var parents: [String] = []
    @Flag(help: "Start the guest at once and bring memory in on demand (userfaultfd), prefetching the rest.") var lazy = false
    @Flag(help: "Restore into the migrated daemon instead of running the VM here.") var intoDaemon = false
    @Option(help: "With --into-daemon: the new VM's id.") var id: String?
    @Option(help: "Stop the VM after this many seconds (default: run until the guest exits).") var seconds: Double?
    @Flag(help: "Print what the restore measured as JSON.") var json = false
    @OptionGroup var daemon: DaemonOptions

    func run() async throws {
        try await reporting {
            if intoDaemon {
                let result = try await daemon.client.restoreSnapshot(RestoreRequest(
                    path: absolutePath(path), parents: parents.isEmpty ? nil : parents.map(absolutePath), lazy: lazy, id: id))
                if json { try printJSON(result) } else {
                    print("restored \(path) as VM \(result.vm.id): \(result.dataPages) data pages, first instruction after \(Formatting.seconds(result.secondsToFirstInstruction))\(lazy ? " (memory arrives lazily)" : "")")
                }
                return
            }
            try runHere()
        }
    }

    /// Restores into a MicroVM of this process and runs it until the guest exits or `seconds` pass.
    private func runHere() throws {
        let started = Date()
        let chain = try SnapshotChain.open(path, parents: parents)
        let sink = MicroVMGuestSink(console: SerialConsole(output: STDOUT_FILENO))
        var report: RestoreReport
        var lazyRestore: LazyRestore?
        if lazy {
            let restore = LazyRestore(chain, into: sink)
            restore.onFailure = { error in
                note("vmsnap: lazy restore failed, stopping the guest: \(error)")
                Glibc.exit(Status.bad)
            }
            try restore.prepare()
            lazyRestore = restore
            report = RestoreReport(lazy: true, dataPages: chain.dataPages, bytesRead: 0, secondsToReady: 0, secondsToResident: nil, faultsServed: 0)
        } else {
            let bar = ProgressBar("restoring", quiet: json)
            report = try SnapshotRestore.restore(chain, into: sink) { bar.update(done: $0, total: $1) }
            bar.finish()
        }
        try sink.start()
        let firstInstruction = Date().timeIntervalSince(started)
        if let lazyRestore {
            let resident = try lazyRestore.waitUntilResident()
            report = resident
        }
        report.secondsToReady = firstInstruction
        if json {
            try printJSON(report)
        } else {
            note("restored \(path) (\(chain.files.count) file\(chain.files.count == 1 ? "" : "s"), \(chain.dataPages) data pages): first instruction after \(Formatting.seconds(firstInstruction)), "
                + "all memory resident after \(Formatting.seconds(report.secondsToResident ?? firstInstruction))\(lazy ? ", \(report.faultsServed) pages served on demand" : "")")
        }
        guard let machine = sink.machine else { return }
        if let stop = machine.waitForStop(timeout: seconds.map { max($0 - Date().timeIntervalSince(started), 0) } ?? 365 * 86_400) {
            note("vmsnap: \(stop)")
            switch stop {
            case .guestExit(GuestExitCode.pass.rawValue), .requested: return
            default: throw ExitCode(Status.failed)
            }
        }
        machine.stop()
    }
}

// MARK: inspect

struct Inspect: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show a snapshot's header, parts, device state, page counts and chain; or an xl save image's contents.")

    @Argument(help: "The snapshot file, or a Xen xl save image.") var path: String
    @Flag(help: "Print a JSON document instead of a table.") var json = false

    func run() async throws {
        try await reporting {
            if isXenImage(path) {
                let document = try XenInspectDocument(path: path)
                if json { try printJSON(document) } else { print(document.table) }
                return
            }
            let document = try InspectDocument(path: path)
            if json { try printJSON(document) } else { print(document.table) }
        }
    }
}

struct InspectDocument: Codable {
    struct Region: Codable { var guestPhysicalAddress: UInt64; var bytes: UInt64 }
    struct PartEntry: Codable { var type: String; var offset: UInt64; var length: UInt64; var crc32c: String }
    struct Component: Codable { var componentId: String; var instance: UInt32; var version: UInt32; var bytes: Int }
    struct Link: Codable { var path: String; var id: String; var kind: String }

    var path: String
    var id: String
    var kind: String
    var format: String
    var created: String
    var parentId: String?
    var parentDigest: String?
    var parentName: String?
    var memoryDigest: String
    var guestBytes: UInt64
    var frames: UInt64
    var dataPages: UInt64
    var zeroPages: UInt64
    var fileBytes: UInt64
    var diskBytes: UInt64
    var regions: [Region]
    var parts: [PartEntry]
    var devices: [Component]
    var chain: [Link]?
    var chainError: String?

    init(path: String) throws {
        let file = try SnapshotFile(path: path)
        let header = file.header
        self.path = path
        id = "\(header.id)"
        kind = "\(header.kind)"
        format = "\(header.memoryFormat)"
        created = ISO8601DateFormatter().string(from: Date(timeIntervalSince1970: Double(header.createdNanoseconds) / 1e9))
        if header.kind == .diff {
            parentId = "\(header.parentID)"
            parentDigest = "\(SnapshotFile.digestText(header.parentDigest))"
            parentName = header.parentName
        }
        memoryDigest = "\(file.memoryDigest)"
        guestBytes = file.layout.totalBytes
        frames = header.frameCount
        dataPages = header.dataPages
        zeroPages = header.zeroPages
        var info = stat()
        stat(path, &info)
        fileBytes = UInt64(info.st_size)
        diskBytes = UInt64(info.st_blocks) * 512
        regions = file.layout.regions.map { Region(guestPhysicalAddress: $0.guestPhysicalAddress, bytes: $0.size) }
        parts = header.parts.sorted { $0.offset < $1.offset }.map {
            PartEntry(type: "\($0.type)", offset: $0.offset, length: $0.length, crc32c: $0.type == .memory ? "per page" : String(format: "%08x", $0.checksum))
        }
        devices = file.deviceState.map {
            Component(componentId: String(format: "0x%08x", $0.componentID), instance: $0.instance, version: $0.componentVersion, bytes: $0.blob.count)
        }
        do {
            chain = try SnapshotChain.open(path).files.map { Link(path: $0.path, id: "\($0.header.id)", kind: "\($0.header.kind)") }
        } catch {
            chainError = "\(error)"
        }
    }

    var table: String {
        func row(_ name: String, _ value: String) -> String { name.padding(toLength: 16, withPad: " ", startingAt: 0) + value }
        var lines = [
            row("file", path),
            row("snapshot id", id),
            row("kind", kind + (parentId.map { " of \($0) (saved as \(parentName ?? ""))" } ?? "")),
            row("memory format", format),
            row("created", created),
            row("guest memory", "\(Formatting.bytes(Double(guestBytes))) in \(regions.count) region\(regions.count == 1 ? "" : "s"), \(frames) pages"),
            row("pages", "\(dataPages) data (\(Formatting.bytes(Double(dataPages) * 4096))), \(zeroPages) zeroed, \(frames - dataPages - zeroPages) \(kind == "diff" ? "unchanged" : "zero")"),
            row("memory digest", memoryDigest),
            row("file size", "\(Formatting.bytes(Double(fileBytes))) (\(Formatting.bytes(Double(diskBytes))) on disk)"),
            "",
            "regions:",
        ]
        lines += regions.map { String(format: "  0x%012llx  %@", $0.guestPhysicalAddress, Formatting.bytes(Double($0.bytes))) }
        lines += ["", "parts:", "  type             offset        length  crc32c"]
        lines += parts.map {
            "  " + $0.type.padding(toLength: 15, withPad: " ", startingAt: 0) + String(format: "%8llu  %12llu  ", $0.offset, $0.length) + $0.crc32c
        }
        lines += ["", "device state:", "  component   instance  version  bytes"]
        lines += devices.map { "  \($0.componentId)  \(String($0.instance).padding(toLength: 8, withPad: " ", startingAt: 0))  \(String($0.version).padding(toLength: 7, withPad: " ", startingAt: 0))  \($0.bytes)" }
        lines += ["", "chain:"]
        if let chain {
            lines += chain.enumerated().map { "  \($0.offset)  \($0.element.kind.padding(toLength: 4, withPad: " ", startingAt: 0))  \($0.element.id)  \($0.element.path)" }
        } else {
            lines.append("  incomplete: \(chainError ?? "")")
        }
        return lines.joined(separator: "\n")
    }
}

// MARK: verify

struct Verify: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check a snapshot and its parents: every checksum, every page, each memory digest and the chain's links; or an xl save image.")

    @Argument(help: "The snapshot file, or a Xen xl save image.") var path: String
    @Option(name: .customLong("parent"), help: "A parent of the snapshot, nearest first; repeat for each.") var parents: [String] = []
    @Flag(help: "Print the result as JSON.") var json = false

    func run() async throws {
        try await reporting {
            if isXenImage(path) {
                // Reading the image checks all of it: headers, every record, padding, page frames, HVM context.
                let document = try XenInspectDocument(path: path)
                if json { try printJSON(document) } else { print("ok  xl image  \(document.dataPages) data pages  \(document.hvmContextEntries.count) HVM context entries  \(path)") }
                return
            }
            let chain = try SnapshotChain.open(path, parents: parents)
            let bar = ProgressBar("verifying", quiet: json)
            let files = try SnapshotVerifier.verify(chain) { bar.update(done: $0, total: $1) }
            bar.finish()
            if json { try printJSON(files) } else {
                for file in files { print("ok  \(file.kind)  \(file.id)  \(file.dataPages) data pages  digest \(file.memoryDigest)  \(file.path)") }
            }
        }
    }
}

// MARK: diff

struct Diff: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the guest pages whose contents differ between two snapshots (each with its chain).",
        discussion: "Exit status 0 when the memory is identical, 1 when it differs.")

    @Argument(help: "The first snapshot.") var first: String
    @Argument(help: "The second snapshot.") var second: String
    @Flag(help: "Print the differing ranges as JSON.") var json = false

    func run() async throws {
        try await reporting {
            let differences = try SnapshotCompare.differences(try SnapshotChain.open(first), try SnapshotChain.open(second))
            if json { try printJSON(differences) } else {
                for range in differences {
                    print(String(format: "0x%012llx  %6d page%@  (%@)", range.guestPhysicalAddress, range.pages, range.pages == 1 ? " " : "s",
                                 Formatting.bytes(Double(range.pages) * 4096)))
                }
                let pages = differences.reduce(0) { $0 + $1.pages }
                print(pages == 0 ? "identical memory" : "\(pages) pages differ in \(differences.count) range\(differences.count == 1 ? "" : "s")")
            }
            if !differences.isEmpty { throw ExitCode(Status.bad) }
        }
    }
}

// MARK: merge and convert

struct Merge: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Collapse a snapshot and its parents into one full snapshot.")

    @Argument(help: "The top of the chain (a diff).") var path: String
    @Argument(help: "The full snapshot to write.") var output: String
    @Option(name: .customLong("parent"), help: "A parent of the snapshot, nearest first; repeat for each.") var parents: [String] = []
    @Flag(help: "Write the compressed layout.") var compressed = false
    @Option(help: "Compression for --compressed: lz4 or zstd.") var compression: CompressionChoice = .zstd
    @Flag(help: "Replace an existing file.") var overwrite = false

    func run() async throws {
        try await reporting {
            let chain = try SnapshotChain.open(path, parents: parents)
            let bar = ProgressBar("merging")
            let header = try SnapshotConvert.merge(chain, to: output, memoryFormat: compressed ? .compressed : .plain,
                                                   compression: compression.writer, overwrite: overwrite) { bar.update(done: $0, total: $1) }
            bar.finish()
            print("merged \(chain.files.count) snapshots into \(output): full snapshot \(header.id), \(header.dataPages) data pages")
        }
    }
}

/// `vmsnap convert --json` of a snapshot rewritten in another layout.
struct ConvertedSnapshot: Codable {
    var output: String
    var to: String
    var snapshotId: String
    var dataPages: UInt64
}

struct Convert: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Rewrite a snapshot in another layout, or convert between snapshots and Xen xl save images.",
        discussion: """
            --to plain or compressed rewrites a snapshot in that layout; it stays the same snapshot (id, parent, \
            digest). --to xen writes an xl save image of a snapshot (with its chain); --to native (or plain, or \
            compressed) turns an xl save image into a full snapshot. An image carries the guest's memory and vCPU and \
            platform state, not a device model's state or xenstore (see vmsnap inspect). Xen's special pages \
            (outside RAM) become a device state of the snapshot and page data again on the way back; both ways \
            list them, and --json prints what was written as JSON.
            """)

    @Argument(help: "The snapshot or xl save image to read.") var path: String
    @Argument(help: "The file to write.") var output: String
    @Option(help: "What to write: plain, compressed, xen, or native (= plain).") var to: String
    @Option(name: .customLong("parent"), help: "With --to xen: a parent of the snapshot, nearest first; repeat for each.") var parents: [String] = []
    @Option(help: "Compression for the compressed layout: lz4 or zstd.") var compression: CompressionChoice = .zstd
    @Flag(help: "Replace an existing file.") var overwrite = false
    @Flag(help: "Print what was written as JSON (for an xl image: every Xen special frame and what became of it).") var json = false

    func validate() throws {
        guard ["plain", "compressed", "xen", "native"].contains(to) else { throw ValidationError("--to must be plain, compressed, xen or native, not '\(to)'") }
    }

    func run() async throws {
        try await reporting {
            let format: SnapshotMemoryFormat = to == "compressed" ? .compressed : .plain
            let fromXen = isXenImage(path)
            if fromXen || to == "xen" {
                guard !(fromXen && to == "xen") else { throw ValidationError("\(path) is already an xl save image") }
                let report = fromXen
                    ? try XenConversion.xenToSnapshot(path, to: output, memoryFormat: format, compression: compression.writer, overwrite: overwrite)
                    : try XenConversion.snapshotToXen(path, parents: parents, to: output, overwrite: overwrite, quiet: json)
                return json ? try printJSON(report) : print(report.text)
            }
            let bar = ProgressBar("converting", quiet: json)
            let header = try SnapshotConvert.convert(path, to: output, memoryFormat: format,
                                                     compression: compression.writer, overwrite: overwrite) { bar.update(done: $0, total: $1) }
            bar.finish()
            if json {
                try printJSON(ConvertedSnapshot(output: output, to: "\(header.memoryFormat)", snapshotId: "\(header.id)", dataPages: header.dataPages))
            } else {
                print("wrote \(output): \(header.memoryFormat) \(header.kind) snapshot \(header.id), \(header.dataPages) data pages")
            }
        }
    }
}
