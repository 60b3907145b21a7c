// Snapshot benchmark of issue 5: a 4 GiB MicroVM holding 1 GiB of data, saved to files on the root disk and restored.
// Measures full and diff saves (plain, lz4, zstd; paused and live), file sizes, eager restores (cold and warm page
// cache) and lazy restores (time to first instruction, time to resident). Each row is repeated --repeat times; the
// table shows medians with min and max. bench/qemu/snapshot.py measures QEMU 7.2 on the same guest.
//
//   swift build -c release --scratch-path .build-bench --product snapshot-bench
//   .build-bench/release/snapshot-bench [--repeat N] [--quick] [--dir PATH] [--json PATH] [--pattern text|random]
//                                       [--skip-diff] [--guest guest/build/guest.elf] [--rows paused-plain,live-zstd,eager,...]
// `stdout`, a C global that Swift 6 cannot prove safe and that Foundation re-exports, is touched from the main
// thread only.
@preconcurrency import Foundation
@preconcurrency import Glibc
import KVMMigration
import MicroVM
import MigrationEngine
import Snapshots

setvbuf(stdout, nil, _IOLBF, 0)

// MARK: options

struct Options {
    var repeats = 3
    var repeatsGiven = false
    var quick = false
    var directory: String?
    var jsonPath: String?
    var pattern = "text"
    var skipDiff = false
    var guestPath = "guest/build/guest.elf"
    /// Which rows of phase 1 to run (all by default): a profile or an A/B run of one row need not wait for the others.
    var rows: Set<String> = allRows
}

let allRows: Set<String> = ["paused-plain", "paused-zstd", "live-plain", "live-lz4", "live-zstd", "eager", "lazy"]

func usage() -> Never {
    print("usage: snapshot-bench [--repeat N] [--quick] [--dir PATH] [--json PATH] [--pattern text|random|mixed] [--skip-diff] [--guest ELF]\n"
        + "       [--rows \(allRows.sorted().joined(separator: ","))] (restores use the live files saved)")
    exit(2)
}

var options = Options()
do {
    var arguments = Array(CommandLine.arguments.dropFirst())[...]
    func value(_ flag: String) -> String {
        guard let next = arguments.popFirst() else { print("\(flag) needs a value"); usage() }
        return next
    }
    while let argument = arguments.popFirst() {
        switch argument {
        case "--repeat": options.repeats = Int(value(argument)) ?? 0; options.repeatsGiven = true
        case "--quick": options.quick = true
        case "--dir": options.directory = value(argument)
        case "--json": options.jsonPath = value(argument)
        case "--pattern": options.pattern = value(argument)
        case "--skip-diff": options.skipDiff = true
        case "--guest": options.guestPath = value(argument)
        case "--rows":
            options.rows = Set(value(argument).split(separator: ",").map(String.init))
            guard options.rows.isSubset(of: allRows) else { print("unknown rows \(options.rows.subtracting(allRows).sorted())"); usage() }
        case "-h", "--help": usage()
        default: print("unknown argument \(argument)"); usage()
        }
    }
    if options.quick, !options.repeatsGiven { options.repeats = 1 }
    guard options.repeats >= 1 else { usage() }
}

let memorySize: UInt64 = options.quick ? 256 << 20 : 4 << 30
let dataMiB = options.quick ? 64 : 1024
let staticCommandLine = "workload=memstress size_mib=\(dataMiB) rate_mib=0 pattern=\(options.pattern)"
let writerRateMiB = 100
let writerCommandLine = "workload=memstress size_mib=\(dataMiB) rate_mib=\(writerRateMiB) pattern=\(options.pattern)"
/// How long the writing guest runs between a snapshot and its diff.
let diffInterval = 1.0

guard let guestImage = try? Array(Data(contentsOf: URL(fileURLWithPath: options.guestPath))) else {
    print("cannot read \(options.guestPath); build it with `make -C guest`")
    exit(1)
}

let directory: String = {
    if let given = options.directory {
        try? FileManager.default.createDirectory(atPath: given, withIntermediateDirectories: true)
        return given
    }
    // /var/tmp: on the root disk (not tmpfs) on these machines.
    var template = Array("/var/tmp/snapshot-bench-XXXXXX".utf8CString)
    guard let made = mkdtemp(&template) else { fatalError("mkdtemp failed: errno \(errno)") }
    return String(cString: made)
}()
let ownDirectory = options.directory == nil
func path(_ name: String) -> String { directory + "/" + name }
// Used from the main thread only, where the whole benchmark runs.
nonisolated(unsafe) var createdFiles: Set<String> = []

// MARK: measuring

func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

struct FileSizes {
    var apparent: Int
    var onDisk: Int
}

func sizes(_ path: String) -> FileSizes {
    var info = stat()
    guard stat(path, &info) == 0 else { return FileSizes(apparent: -1, onDisk: -1) }
    return FileSizes(apparent: Int(info.st_size), onDisk: Int(info.st_blocks) * 512)
}

/// Drops the file's pages from the page cache (they are clean: every snapshot file is synced), and returns the
/// fraction of its pages still resident afterwards, as mincore sees it.
@discardableResult
func evict(_ path: String) -> Double {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { return -1 }
    defer { close(fd) }
    _ = posix_fadvise(fd, 0, 0, Int32(POSIX_FADV_DONTNEED))
    return residentFraction(fd)
}

func residentFraction(_ path: String) -> Double {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { return -1 }
    defer { close(fd) }
    return residentFraction(fd)
}

func residentFraction(_ fd: Int32) -> Double {
    var info = stat()
    guard fstat(fd, &info) == 0, info.st_size > 0 else { return 0 }
    let length = Int(info.st_size)
    guard let mapping = mmap(nil, length, PROT_READ, MAP_SHARED, fd, 0), mapping != MAP_FAILED else { return -1 }
    defer { munmap(mapping, length) }
    let pages = (length + 4095) / 4096
    var vector = [UInt8](repeating: 0, count: pages)
    guard mincore(mapping, length, &vector) == 0 else { return -1 }
    // Holes of a sparse file count as not resident: report against the allocated pages.
    let allocated = max(1, Int(info.st_blocks) * 512 / 4096)
    return min(1, Double(vector.reduce(0) { $0 + Int($1 & 1) }) / Double(allocated))
}

/// One row of the table: samples of several metrics, one per repetition.
final class Row {
    let group: String
    let name: String
    var samples: [String: [Double]] = [:]
    var order: [String] = []
    var info: [String: String] = [:]

    init(group: String, name: String) {
        self.group = group
        self.name = name
    }

    func add(_ metric: String, _ value: Double) {
        if samples[metric] == nil { order.append(metric) }
        samples[metric, default: []].append(value)
    }

    func median(_ metric: String) -> Double? {
        guard let values = samples[metric]?.sorted(), !values.isEmpty else { return nil }
        let middle = values.count / 2
        return values.count % 2 == 1 ? values[middle] : (values[middle - 1] + values[middle]) / 2
    }

    func minimum(_ metric: String) -> Double? { samples[metric]?.min() }
    func maximum(_ metric: String) -> Double? { samples[metric]?.max() }

    var json: [String: Any] {
        var metrics: [String: Any] = [:]
        for metric in order {
            metrics[metric] = ["median": median(metric)!, "min": minimum(metric)!, "max": maximum(metric)!, "samples": samples[metric]!]
        }
        return ["group": group, "name": name, "metrics": metrics, "info": info]
    }
}

// Used from the main thread only, where the whole benchmark runs.
nonisolated(unsafe) var rows: [Row] = []
func row(_ group: String, _ name: String) -> Row {
    if let found = rows.first(where: { $0.group == group && $0.name == name }) { return found }
    let made = Row(group: group, name: name)
    rows.append(made)
    return made
}

func gigabytesPerSecond(pages: Int, seconds: Double) -> Double { Double(pages * 4096) / seconds / 1e9 }

/// CPU time of this process so far (all threads, user + system). On a shared 2-core machine the wall time of a
/// row depends on what else runs; its CPU time much less, so the table shows both.
func processCPUSeconds() -> Double {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    func seconds(_ time: timeval) -> Double { Double(time.tv_sec) + Double(time.tv_usec) / 1e6 }
    return seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

// MARK: guests

func boot(_ commandLine: String) throws -> (MicroVM, SerialConsole, Double) {
    let console = SerialConsole(output: nil)
    let started = now()
    let machine = try MicroVM(booting: guestImage, commandLine: commandLine,
                              configuration: MicroVMConfiguration(memorySize: memorySize, console: console))
    machine.start()
    // Populated: the first status line that verified the whole working set.
    let pages = dataMiB * 256
    guard console.waitForLine(timeout: 180, where: { $0.contains("pages=\(pages) ") && $0.hasSuffix("verify=ok") }) != nil else {
        fatalError("guest did not fill its working set: \(console.receivedLines.suffix(3))")
    }
    return (machine, console, now() - started)
}

func saveOptions(live: Bool, format: SnapshotMemoryFormat = .plain, compression: SnapshotWriter.Compression = .zstd,
                 keepTracking: Bool = false) -> SnapshotSaveOptions {
    SnapshotSaveOptions(live: live, keepTracking: keepTracking, memoryFormat: format, compression: compression, overwrite: true)
}

@discardableResult
func recordSave(_ report: SnapshotSaveReport, into row: Row) -> SnapshotSaveReport {
    let pages = Int(report.header.dataPages)
    let size = sizes(report.path)
    createdFiles.insert(report.path)
    row.add("seconds", report.totalSeconds)
    row.add("GB/s", gigabytesPerSecond(pages: pages, seconds: report.totalSeconds))
    row.add("pause ms", report.pauseSeconds * 1000)
    row.add("finish s", report.finishSeconds)
    row.add("fsync s", report.syncSeconds)
    row.add("GB/s before fsync", gigabytesPerSecond(pages: pages, seconds: report.totalSeconds - report.syncSeconds))
    row.add("passes", Double(report.passes.count))
    row.add("data pages", Double(pages))
    row.add("file bytes", Double(size.apparent))
    row.add("file bytes on disk", Double(size.onDisk))
    return report
}

@discardableResult
func save(_ source: MicroVMGuestSource, _ name: String, base: SnapshotBase? = nil, _ options: SnapshotSaveOptions, row: Row) throws -> SnapshotSaveReport {
    let cpuBefore = processCPUSeconds()
    let report = try SnapshotSaver(source: source, path: path(name), base: base, options: options).run()
    row.add("CPU s", processCPUSeconds() - cpuBefore)
    recordSave(report, into: row)
    return report
}

/// Eager restore into a MicroVM that is not started, then discarded.
func eagerRestore(_ name: String, cold: Bool, row: Row) throws {
    if cold { row.add("resident before", evict(path(name))) } else { row.add("resident before", residentFraction(path(name))) }
    let sink = MicroVMGuestSink(console: SerialConsole(output: nil))
    let started = now()
    let cpuBefore = processCPUSeconds()
    let chain = try SnapshotChain.open(path(name))
    let opened = now()
    let report = try SnapshotRestore.restore(chain, into: sink)
    let seconds = now() - started
    row.add("CPU s", processCPUSeconds() - cpuBefore)
    row.add("seconds", seconds)
    row.add("GB/s", gigabytesPerSecond(pages: report.dataPages, seconds: seconds))
    row.add("open ms", (opened - started) * 1000)
    row.add("data pages", Double(report.dataPages))
    sink.discard()
}

/// Lazy restore, and the guest started: time to first instruction = open + prepare + start.
func lazyRestore(_ name: String, cold: Bool, row: Row) throws {
    if cold { row.add("resident before", evict(path(name))) } else { row.add("resident before", residentFraction(path(name))) }
    let console = SerialConsole(output: nil)
    let sink = MicroVMGuestSink(console: console)
    let started = now()
    let chain = try SnapshotChain.open(path(name))
    let opened = now()
    let restore = LazyRestore(chain, into: sink)
    restore.onFailure = { error in print("lazy restore of \(name) failed: \(error)"); sink.machine?.stop() }
    try restore.prepare()
    let prepared = now()
    try sink.start()
    let running = now()
    let report = try restore.waitUntilResident()
    let resident = now()
    row.add("first instruction ms", (running - started) * 1000)
    row.add("open ms", (opened - started) * 1000)
    row.add("prepare ms", (prepared - opened) * 1000)
    row.add("secondsToReady ms", report.secondsToReady * 1000)
    row.add("start ms", (running - prepared) * 1000)
    row.add("resident s", resident - started)
    row.add("GB/s to resident", gigabytesPerSecond(pages: report.dataPages, seconds: resident - started))
    row.add("faults served", Double(report.faultsServed))
    // The guest carries on: its next status line verifies every page of its working set.
    let skip = console.lineCount
    let line = console.waitForLine(after: skip, timeout: 5) { $0.hasPrefix("memstress t=") || $0.contains("FAIL") }
    let ok = line?.hasSuffix("verify=ok") == true
    row.add("guest verify ok", ok ? 1 : 0)
    if !ok { print("  lazy restore of \(name): guest did not verify: \(line ?? "no line in 5 s")") }
    sink.discard()
}

// MARK: run

let runStarted = now()
let loadStart = (try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8))?.split(separator: " ").prefix(3).joined(separator: " ") ?? "?"
print("snapshot-bench: \(memorySize >> 20) MiB guest, \(dataMiB) MiB of \(options.pattern) data, \(options.repeats) repetition(s), files in \(directory)")

var notes: [String] = []
do {
    // Phase 1: the static guest. Full saves, then restores of the files just written.
    let (machine, _, fillSeconds) = try boot(staticCommandLine)
    print(String(format: "static guest populated in %.1f s: %@", fillSeconds, staticCommandLine))
    let source = MicroVMGuestSource(machine: machine)
    for repetition in 1 ... options.repeats {
        print("repetition \(repetition)/\(options.repeats): full saves")
        let rowsWanted = options.rows
        if rowsWanted.contains("paused-plain") {
            try save(source, "full-plain-paused.snap", saveOptions(live: false), row: row("save", "full plain, paused"))
            unlink(path("full-plain-paused.snap"))
        }
        if rowsWanted.contains("paused-zstd") {
            try save(source, "full-zstd-paused.snap", saveOptions(live: false, format: .compressed, compression: .zstd),
                     row: row("save", "full zstd, paused (compressed as written)"))
            unlink(path("full-zstd-paused.snap"))
        }
        var saved: [(file: String, label: String)] = []
        if rowsWanted.contains("live-plain") {
            try save(source, "full-plain.snap", saveOptions(live: true), row: row("save", "full plain, live"))
            saved.append(("full-plain.snap", "plain"))
        }
        if rowsWanted.contains("live-lz4") {
            try save(source, "full-lz4.snap", saveOptions(live: true, format: .compressed, compression: .lz4), row: row("save", "full lz4, live"))
            saved.append(("full-lz4.snap", "lz4"))
        }
        if rowsWanted.contains("live-zstd") {
            try save(source, "full-zstd.snap", saveOptions(live: true, format: .compressed, compression: .zstd), row: row("save", "full zstd, live"))
            saved.append(("full-zstd.snap", "zstd"))
        }
        // Restores: the source guest is paused so that its once-a-second verification does not compete.
        try machine.pause()
        print("repetition \(repetition)/\(options.repeats): restores")
        for (file, label) in saved where rowsWanted.contains("eager") {
            try eagerRestore(file, cold: false, row: row("eager restore", "\(label), warm cache"))
            try eagerRestore(file, cold: true, row: row("eager restore", "\(label), cold cache"))
        }
        for (file, label) in saved where rowsWanted.contains("lazy") {
            try lazyRestore(file, cold: false, row: row("lazy restore", "\(label), warm cache"))
            if label == "plain" { try lazyRestore(file, cold: true, row: row("lazy restore", "\(label), cold cache")) }
        }
        machine.resume()
    }
    machine.stop()
    for file in ["full-plain.snap", "full-lz4.snap", "full-zstd.snap"] { unlink(path(file)) }

    // Phase 2: a guest rewriting its working set at 100 MiB/s. A full snapshot that keeps dirty tracking on, then a
    // diff of what the guest wrote in the next second (plain), and another second later a diff on top of that (zstd).
    if !options.skipDiff {
        let (writer, _, writerFill) = try boot(writerCommandLine)
        print(String(format: "writing guest populated in %.1f s: %@", writerFill, writerCommandLine))
        let source = MicroVMGuestSource(machine: writer)
        for repetition in 1 ... options.repeats {
            print("repetition \(repetition)/\(options.repeats): diff saves")
            let full = try save(source, "diff-base.snap", saveOptions(live: true, keepTracking: true), row: row("diff", "full plain, live, keeps tracking"))
            Thread.sleep(forTimeInterval: diffInterval)
            let first = try save(source, "diff-1.snap", base: full.base, saveOptions(live: true, keepTracking: true), row: row("diff", "diff plain, live, 1 s after the full"))
            Thread.sleep(forTimeInterval: diffInterval)
            try save(source, "diff-2.snap", base: first.base, saveOptions(live: true, format: .compressed, compression: .zstd, keepTracking: false),
                     row: row("diff", "diff zstd, live, 1 s after diff 1"))
            // The chain restores (checks every page and the memory digest of full + 2 diffs).
            try eagerRestore("diff-2.snap", cold: false, row: row("diff", "eager restore of full + 2 diffs, warm"))
            for file in ["diff-base.snap", "diff-1.snap", "diff-2.snap"] { unlink(path(file)) }
        }
        writer.stop()
    }
} catch {
    print("snapshot-bench failed: \(error)")
    notes.append("failed: \(error)")
}

for file in createdFiles { unlink(file) }
if ownDirectory { rmdir(directory) }

// MARK: report

func format(_ value: Double?, _ pattern: String) -> String { value.map { String(format: pattern, $0) } ?? "-" }
func spread(_ row: Row, _ metric: String, _ pattern: String) -> String {
    guard let median = row.median(metric) else { return "-" }
    if row.samples[metric]!.count == 1 { return String(format: pattern, median) }
    return String(format: pattern, median) + " (" + String(format: pattern, row.minimum(metric)!) + "–" + String(format: pattern, row.maximum(metric)!) + ")"
}
func megabytes(_ value: Double?) -> String { value.map { String(format: "%.0f", $0 / 1e6) } ?? "-" }

let seconds = now() - runStarted
let loadEnd = (try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8))?.split(separator: " ").prefix(3).joined(separator: " ") ?? "?"
print("")
print(String(format: "migrated snapshots: %d MiB guest, %d MiB of %@ data, medians of %d (min–max), run %.0f s, loadavg %@ → %@",
             memorySize >> 20, dataMiB, options.pattern, options.repeats, seconds, loadStart, loadEnd))
print("")
print("| save | seconds | GB/s | before fsync: GB/s | fsync s | CPU s | pause ms | passes | data pages | file MB apparent / on disk |")
print("|---|---|---|---|---|---|---|---|---|---|")
for row in rows where row.group == "save" || (row.group == "diff" && row.samples["pause ms"] != nil) {
    print("| \(row.name) | \(spread(row, "seconds", "%.3f")) | \(format(row.median("GB/s"), "%.2f")) | "
        + "\(spread(row, "GB/s before fsync", "%.2f")) | \(spread(row, "fsync s", "%.3f")) | \(spread(row, "CPU s", "%.3f")) | \(spread(row, "pause ms", "%.1f")) | "
        + "\(format(row.median("passes"), "%.0f")) | \(format(row.median("data pages"), "%.0f")) | "
        + "\(megabytes(row.median("file bytes"))) / \(megabytes(row.median("file bytes on disk"))) |")
}
print("")
print("| eager restore (not started) | seconds | GB/s | CPU s | open ms | file resident before |")
print("|---|---|---|---|---|---|")
for row in rows where row.group == "eager restore" || (row.group == "diff" && row.samples["pause ms"] == nil) {
    print("| \(row.name) | \(spread(row, "seconds", "%.3f")) | \(format(row.median("GB/s"), "%.2f")) | \(spread(row, "CPU s", "%.3f")) | \(spread(row, "open ms", "%.1f")) | "
        + "\(format(row.median("resident before").map { $0 * 100 }, "%.0f")) % |")
}
print("")
print("| lazy restore, guest started | first instruction ms | open ms | prepare ms | start ms | resident s | GB/s to resident | faults served | guest verified |")
print("|---|---|---|---|---|---|---|---|---|")
for row in rows where row.group == "lazy restore" {
    let verified = row.samples["guest verify ok"].map { "\(Int($0.reduce(0, +)))/\($0.count)" } ?? "-"
    print("| \(row.name) | \(spread(row, "first instruction ms", "%.1f")) | \(format(row.median("open ms"), "%.1f")) | \(format(row.median("prepare ms"), "%.1f")) | "
        + "\(format(row.median("start ms"), "%.2f")) | \(spread(row, "resident s", "%.3f")) | \(format(row.median("GB/s to resident"), "%.2f")) | "
        + "\(format(row.median("faults served"), "%.0f")) | \(verified) |")
}
for note in notes { print("note: \(note)") }

if let jsonPath = options.jsonPath {
    let document: [String: Any] = [
        "meta": [
            "date": ISO8601DateFormatter().string(from: Date()),
            "guest_memory_bytes": memorySize, "data_mib": dataMiB, "pattern": options.pattern,
            "static_command_line": staticCommandLine, "writer_command_line": writerCommandLine,
            "diff_interval_s": diffInterval, "repeats": options.repeats, "directory": directory,
            "loadavg_start": loadStart, "loadavg_end": loadEnd, "run_s": seconds, "notes": notes,
            "cache": "warm: the file as the save left it in the page cache; cold: posix_fadvise(DONTNEED) on the file before the restore",
        ],
        "rows": rows.map(\.json),
    ]
    let data = try JSONSerialization.data(withJSONObject: document, options: [.prettyPrinted, .sortedKeys])
    try data.write(to: URL(fileURLWithPath: jsonPath))
    print("wrote \(jsonPath)")
}
exit(notes.isEmpty ? 0 : 1)
