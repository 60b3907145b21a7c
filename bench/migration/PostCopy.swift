// Post-copy rows of issue 15 (`migration-bench --postcopy RUNS [--json FILE] [row...]`): each run boots a fresh guest
// that times its page accesses (memstress `stall_us=`, guest/README.md), waits until it has written its working set
// and printed three more status lines (the baseline), then migrates it with `postCopy` after one pre-copy pass, and
// collects the sender's and receiver's reports and the guest's status lines at both ends.
@preconcurrency import Foundation
@preconcurrency import Glibc
import KVMMigration
import MicroVM
import MigrationEngine
import MigrationNetwork
import Threads
import Transport

struct PostCopyRow {
    let name: String
    let memory: UInt64
    let commandLine: String
    let workingSetPages: Int
}

/// Accesses over 20 µs count as stalls; the same threshold as `bench/qemu/migrate.py --postcopy`.
let stallThresholdMicroseconds = 20

/// The host's TSC rate in kHz (/proc/cpuinfo's `cpu MHz`, constant here), which KVM passes to the guest unscaled:
/// given to memstress as `tsc_khz=`, as `bench/qemu/migrate.py` does, because its own measurement against the
/// tick drifts by a few per cent on a loaded host.
let hostTSCkHz: Int = {
    let text = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
    let line = text.split(separator: "\n").first { $0.hasPrefix("cpu MHz") }
    let mhz = line.flatMap { Double($0.split(separator: ":").last!.trimmingCharacters(in: .whitespaces)) } ?? 0
    return Int((mhz * 1000).rounded())
}()

let stallKeys = "stall_us=\(stallThresholdMicroseconds) tsc_khz=\(hostTSCkHz)"

let postCopyRows = [
    // The pre-copy row dirty-800, timed.
    PostCopyRow(name: "dirty-800", memory: 768 << 20,
                commandLine: "workload=memstress size_mib=512 rate_mib=800 pattern=mixed \(stallKeys)",
                workingSetPages: 512 * 256),
    // A 2 GiB guest rewriting 1 GiB of it at full speed, for ever.
    PostCopyRow(name: "hot-2g", memory: 2048 << 20,
                commandLine: "workload=memstress size_mib=1024 rate_mib=0 rewrite=1 pattern=mixed \(stallKeys)",
                workingSetPages: 1024 * 256),
]

func monotonicNow() -> Double {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
}

func loadAverage() -> [String] {
    ((try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8)) ?? "").split(separator: " ").prefix(3).map(String.init)
}

/// What one post-copy run measured; written as JSON for `bench/migration/postcopy_table.py`.
struct PostCopyRun: Codable {
    var engine = "migrated"
    var mode = "postcopy"
    var row: String
    var run: Int
    var memoryMiB: UInt64
    var commandLine: String
    var loadavgStart: [String]
    var loadavgEnd: [String] = []
    var succeeded = false
    var error: String?
    /// From the start of the migration until the destination guest ran (the receiver's start of post-copy).
    var secondsUntilDestinationRuns: Double?
    var totalSeconds: Double?
    var downtimeSeconds: Double?
    var wireBytes: Int?
    var cpuSeconds: Double?
    var sender: MigrationReport?
    var receiverPostCopyPages: Int?
    var receiverPostCopyRequests: Int?
    var receiverPostCopySeconds: Double?
    /// The guest's stall lines (`memstress stall`, one per 100 ms of guest time): those of the three seconds before
    /// the migration (baseline), those the source printed during it, the destination's up to and including the first
    /// one printed after post-copy ended, and the destination's after that until two status lines verified.
    var baselineLines: [String] = []
    var sourceLinesDuring: [String] = []
    var destinationLinesDuringPostCopy: [String] = []
    var destinationLinesAfter: [String] = []
    var destinationStatusLines: [String] = []
    var destinationVerified = false
}

/// Results the receiver's thread hands back.
struct ReceiverOutcome: Sendable {
    var report: MigrationReceiver.Report?
    var error: String?
    var returnedAt: Double
    var destinationLineCount: Int
}

func statusLines(_ lines: [String]) -> [String] { lines.filter { $0.hasPrefix("memstress t=") } }
func stallLines(_ lines: [String]) -> [String] { lines.filter { $0.hasPrefix("memstress stall ") } }

/// `preCopy`: the same row without post-copy, for reference.
func postCopyOnce(_ row: PostCopyRow, run: Int, guest: [UInt8], preCopy: Bool = false) throws -> PostCopyRun {
    var result = PostCopyRun(mode: preCopy ? "precopy" : "postcopy", row: row.name, run: run, memoryMiB: row.memory >> 20,
                             commandLine: row.commandLine, loadavgStart: loadAverage())
    let console = SerialConsole(output: nil)
    let source = try MicroVM(booting: guest, commandLine: row.commandLine,
                             configuration: MicroVMConfiguration(memorySize: row.memory, console: console))
    source.start()
    defer { source.stop() }
    guard console.waitForLine(timeout: 180, where: { $0.contains("pages=\(row.workingSetPages) ") }) != nil else {
        result.error = "guest did not fill its working set"
        return result
    }
    // Three more status lines: the baseline of what the guest sees without a migration.
    let filled = console.lineCount
    var seen = 0
    while seen < 3, console.waitForLine(after: filled + seen, timeout: 10, where: { $0.hasPrefix("memstress t=") }) != nil {
        seen = statusLines(Array(console.receivedLines.suffix(console.lineCount - filled))).count
    }
    let linesBefore = console.lineCount
    result.baselineLines = stallLines(Array(console.receivedLines.suffix(linesBefore - filled)))

    let socketPath = NSTemporaryDirectory() + "migration-bench-pc-\(getpid()).sock"
    unlink(socketPath)
    let listener = try Listener(endpoint: .unix(path: socketPath), security: .plaintext)
    let destinationConsole = SerialConsole(output: nil)
    let sink = MicroVMGuestSink(console: destinationConsole)
    var options = MigrationOptions()
    options.channels = 2
    options.compression = .adaptive
    options.postCopy = !preCopy
    options.postCopyAfterPasses = 1
    let outcome = Locked<ReceiverOutcome?>(nil)
    let done = DispatchSemaphore(value: 0)
    startThread(named: "bench-receiver") {
        var received = ReceiverOutcome(report: nil, error: nil, returnedAt: 0, destinationLineCount: 0)
        do {
            let (channels, _) = try MigrationNetwork.accept(from: listener)
            received.report = try MigrationReceiver(sink: sink, channels: channels).run()
        } catch { received.error = "\(error)" }
        // The receiver returns once post-copy has ended (the last page verified).
        received.returnedAt = monotonicNow()
        received.destinationLineCount = destinationConsole.lineCount
        let handed = received
        outcome.withLock { $0 = handed }
        done.signal()
    }
    let cpu = cpuSeconds()
    let startedAt = monotonicNow()
    let report = MigrationSender(source: MicroVMGuestSource(machine: source), options: options) { _ in
        try MigrationNetwork.connect(to: listener.endpoint, security: .plaintext)
    }.run()
    if !report.succeeded { listener.close() }
    done.wait()
    unlink(socketPath)
    result.cpuSeconds = cpuSeconds() - cpu
    let received = outcome.withLock { $0 }!
    result.sender = report
    result.succeeded = report.succeeded && received.error == nil && (preCopy || report.postCopy != nil)
    result.error = report.error ?? received.error ?? (report.postCopy == nil && !preCopy ? "did not finish in post-copy" : nil)
    result.totalSeconds = report.totalSeconds
    result.downtimeSeconds = report.downtimeSeconds
    result.wireBytes = report.wireBytes
    if let receiverReport = received.report {
        result.receiverPostCopyPages = receiverReport.postCopyPages
        result.receiverPostCopyRequests = receiverReport.postCopyRequests
        result.receiverPostCopySeconds = receiverReport.postCopySeconds
        if let seconds = receiverReport.postCopySeconds {
            result.secondsUntilDestinationRuns = received.returnedAt - seconds - startedAt
        } else if preCopy {
            // Pre-copy: the receiver returns just after starting the guest.
            result.secondsUntilDestinationRuns = received.returnedAt - startedAt
        }
    }
    result.sourceLinesDuring = stallLines(Array(console.receivedLines.suffix(max(0, console.lineCount - linesBefore))))
    if let destination = sink.machine {
        // The first stall line after the end of post-copy belongs to it; then two status lines: the guest runs on
        // and verifies.
        _ = destinationConsole.waitForLine(after: received.destinationLineCount, timeout: 10) { $0.hasPrefix("memstress stall ") }
        var after = destinationConsole.lineCount
        for _ in 0 ..< 2 {
            if destinationConsole.waitForLine(after: after, timeout: 10, where: { $0.hasPrefix("memstress t=") }) != nil { after = destinationConsole.lineCount }
        }
        let lines = destinationConsole.receivedLines
        let dropped = destinationConsole.lineCount - lines.count
        let cut = received.destinationLineCount - dropped
        var during = stallLines(Array(lines.prefix(cut)))
        var later = stallLines(Array(lines.dropFirst(cut)))
        if !later.isEmpty { during.append(later.removeFirst()) }
        result.destinationLinesDuringPostCopy = during
        result.destinationLinesAfter = later
        result.destinationStatusLines = statusLines(lines)
        result.destinationVerified = result.destinationStatusLines.count >= 2 && result.destinationStatusLines.allSatisfy { $0.contains("verify=ok") }
            && !lines.contains { $0.contains("verify=FAIL") }
        destination.stop()
    }
    result.loadavgEnd = loadAverage()
    return result
}

/// Runs every chosen row `runs` times, one fresh guest each; prints a line per run and returns every run.
func postCopyBenchmark(runs: Int, rows chosen: Set<String>, guest: [UInt8], preCopy: Bool = false) throws -> [PostCopyRun] {
    var all: [PostCopyRun] = []
    print("row        run  until-runs s  total s  downtime ms  wire MB  missing  requested/requests  post-copy s  CPU s  guest  result")
    for row in postCopyRows where chosen.isEmpty || chosen.contains(row.name) {
        for run in 0 ..< runs {
            let result = try postCopyOnce(row, run: run, guest: guest, preCopy: preCopy)
            let postCopy = result.sender?.postCopy
            print(row.name.padding(toLength: 10, withPad: " ", startingAt: 0)
                  + String(format: " %3d  %12.3f  %7.3f  %11.1f  %7.1f  %7d  %8d/%-8d  %11.3f  %5.2f  %@  %@", run,
                           result.secondsUntilDestinationRuns ?? .nan, result.totalSeconds ?? .nan, (result.downtimeSeconds ?? .nan) * 1000,
                           Double(result.wireBytes ?? 0) / 1e6, postCopy?.missingPages ?? 0, postCopy?.requestedPages ?? 0, postCopy?.requests ?? 0,
                           postCopy?.seconds ?? .nan, result.cpuSeconds ?? .nan, (result.destinationVerified ? "ok" : "FAIL") as NSString,
                           (result.succeeded ? "ok" : result.error ?? "failed") as NSString))
            for line in result.destinationLinesDuringPostCopy { print("    dst: \(line)") }
            all.append(result)
        }
    }
    return all
}
