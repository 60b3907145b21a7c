// Live migration between two MicroVMs in one process over Unix-socket channels (plaintext), in release mode: total time,
// downtime, bytes on the wire and page throughput, for the scenarios of issue 4.
//
//   swift build -c release --product migration-bench && .build/release/migration-bench [guest.elf] [scenario...]
//   .build/release/migration-bench [guest.elf] --unchanged-ab RUNS [scenario...]
//   .build/release/migration-bench [guest.elf] --postcopy RUNS [--precopy] [--json FILE] [dirty-800|hot-2g...]
//   .build/release/migration-bench [guest.elf] --predict RUNS [--probe-mib N] [scenario...]
//   .build/release/migration-bench [guest.elf] --resume RUNS
// The second form runs each scenario RUNS times with unchanged pages (stream.md §6.4.1) on and off, alternating,
// and prints medians with min-max of the wire bytes of the passes after pass 0 and of the total time. The third
// runs the post-copy rows of issue 15 (PostCopy.swift) and writes every figure as JSON; with --precopy, the same rows
// in pre-copy, for reference. The fourth runs a dry run (ConvergenceDryRun) before each migration and prints its
// prediction of total time and downtime against what the migration then took (issue 16 item 6). The fifth measures
// resumable pre-copy (Resume.swift).
// `stdout`, a C global that Swift 6 cannot prove safe and that Foundation re-exports, is touched from the main
// thread only.
@preconcurrency import Foundation
@preconcurrency import Glibc
import KVMMigration
import MicroVM
import MigrationEngine
import MigrationNetwork
import Transport

setvbuf(stdout, nil, _IOLBF, 0)
let arguments = Array(CommandLine.arguments.dropFirst())
let guestPath = arguments.first { $0.hasSuffix(".elf") } ?? "guest/build/guest.elf"
let abRuns = arguments.firstIndex(of: "--unchanged-ab").map { Int(arguments[$0 + 1])! }
let postCopyRuns = arguments.firstIndex(of: "--postcopy").map { Int(arguments[$0 + 1])! }
let jsonPath = arguments.firstIndex(of: "--json").map { arguments[$0 + 1] }
let preCopyReference = arguments.contains("--precopy")
let predictRuns = arguments.firstIndex(of: "--predict").map { Int(arguments[$0 + 1])! }
let resumeRuns = arguments.firstIndex(of: "--resume").map { Int(arguments[$0 + 1])! }
/// The dry run's link probe, in MiB (`--probe-mib N`); ConvergenceDryRun's default without it.
let probePages = arguments.firstIndex(of: "--probe-mib").map { Int(arguments[$0 + 1])! * 256 } ?? ConvergenceDryRun.defaultProbePages
let optionsWithValue: Set<String> = ["--unchanged-ab", "--postcopy", "--json", "--predict", "--probe-mib", "--resume"]
let chosen = Set(arguments.enumerated().filter { index, argument in
    !argument.hasSuffix(".elf") && argument != "--precopy" && !optionsWithValue.contains(argument) && (index == 0 || !optionsWithValue.contains(arguments[index - 1]))
}.map(\.element))
let guest = try Array(Data(contentsOf: URL(fileURLWithPath: guestPath)))

if let runs = postCopyRuns {
    let results = try postCopyBenchmark(runs: runs, rows: chosen, guest: guest, preCopy: preCopyReference)
    if let jsonPath {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try encoder.encode(results).write(to: URL(fileURLWithPath: jsonPath))
    }
    exit(results.allSatisfy(\.succeeded) ? 0 : 1)
}

func cpuSeconds() -> Double {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6
}

struct Scenario {
    let name: String
    let memory: UInt64
    let commandLine: String
    let compression: MigrationOptions.Compression
    let channels: Int
}

let scenarios = [
    Scenario(name: "idle-4g", memory: 4 << 30, commandLine: "workload=memstress size_mib=16 rate_mib=0 pattern=text", compression: .adaptive, channels: 2),
    Scenario(name: "random-1g-static", memory: 1280 << 20, commandLine: "workload=memstress size_mib=1024 rate_mib=0 pattern=random", compression: .adaptive, channels: 2),
    Scenario(name: "text-1g-static", memory: 1280 << 20, commandLine: "workload=memstress size_mib=1024 rate_mib=0 pattern=text", compression: .adaptive, channels: 2),
    Scenario(name: "dirty-50", memory: 768 << 20, commandLine: "workload=memstress size_mib=512 rate_mib=50 pattern=mixed", compression: .adaptive, channels: 2),
    Scenario(name: "dirty-200", memory: 768 << 20, commandLine: "workload=memstress size_mib=512 rate_mib=200 pattern=mixed", compression: .adaptive, channels: 2),
    Scenario(name: "dirty-800", memory: 768 << 20, commandLine: "workload=memstress size_mib=512 rate_mib=800 pattern=mixed", compression: .adaptive, channels: 2),
    // One channel with a fixed codec: where compressing and sending on separate threads shows.
    Scenario(name: "text-1g-lz4-1ch", memory: 1280 << 20, commandLine: "workload=memstress size_mib=1024 rate_mib=0 pattern=text", compression: .lz4, channels: 1),
    Scenario(name: "text-1g-zstd-1ch", memory: 1280 << 20, commandLine: "workload=memstress size_mib=1024 rate_mib=0 pattern=text", compression: .zstd, channels: 1),
    // Rewrites of which 90 % (50 %) put back the bytes a page holds: what unchanged pages are for.
    Scenario(name: "rewrite-90", memory: 768 << 20, commandLine: "workload=memstress size_mib=512 rate_mib=200 pattern=random same_pct=90", compression: .adaptive, channels: 2),
    Scenario(name: "rewrite-90-800", memory: 768 << 20, commandLine: "workload=memstress size_mib=512 rate_mib=800 pattern=random same_pct=90", compression: .adaptive, channels: 2),
    Scenario(name: "rewrite-50", memory: 768 << 20, commandLine: "workload=memstress size_mib=512 rate_mib=200 pattern=random same_pct=50", compression: .adaptive, channels: 2),
]

/// A freshly booted guest of `scenario`, once its working set is written (the first status line that counts every page).
func bootSource(_ scenario: Scenario) throws -> MicroVM {
    let console = SerialConsole(output: nil)
    let source = try MicroVM(booting: guest, commandLine: scenario.commandLine,
                             configuration: MicroVMConfiguration(memorySize: scenario.memory, console: console))
    source.start()
    let pages = scenario.commandLine.split(separator: " ").first { $0.hasPrefix("size_mib=") }.map { Int($0.dropFirst(9))! * 256 }!
    guard console.waitForLine(timeout: 120, where: { $0.contains("pages=\(pages) ") }) != nil else { fatalError("\(scenario.name): guest did not fill its working set") }
    return source
}

/// Receives one migration from `listener` on a thread of its own into a fresh MicroVM; the function returned gives its sink once
/// it has ended (a link probe's ends with the sender giving up, and the sink holds nothing).
func receiveOnce(from listener: Listener) -> () -> MicroVMGuestSink {
    let sink = MicroVMGuestSink(console: SerialConsole(output: nil))
    let done = DispatchSemaphore(value: 0)
    Thread {
        do {
            let (channels, _) = try MigrationNetwork.accept(from: listener)
            _ = try MigrationReceiver(sink: sink, channels: channels).run()
        } catch let error as MigrationError {
            if case .peerAborted = error {} else { print("receiver: \(error)") }
        } catch { print("receiver: \(error)") }
        done.signal()
    }.start()
    return {
        done.wait()
        return sink
    }
}

func options(for scenario: Scenario, unchangedPages: Bool = true) -> MigrationOptions {
    var options = MigrationOptions()
    options.channels = scenario.channels
    options.compression = scenario.compression
    options.unchangedPages = unchangedPages
    return options
}

/// One migration of a freshly booted guest: the sender's report and the CPU time of the whole process. With
/// `dryRun`, a dry run (ConvergenceDryRun, its link probe to the same receiver's listener) comes first, and its
/// measurements are the sender's `measuredBeforehand`.
func migrateOnce(_ scenario: Scenario, unchangedPages: Bool = true, dryRun: Bool = false)
    throws -> (report: MigrationReport, cpu: Double, dryRun: DryRunResult?) {
    let source = try bootSource(scenario)
    let socketPath = NSTemporaryDirectory() + "migration-bench-\(getpid()).sock"
    unlink(socketPath)
    let listener = try Listener(endpoint: .unix(path: socketPath), security: .plaintext)
    let options = options(for: scenario, unchangedPages: unchangedPages)
    let connect: (Int) throws -> MigrationChannel = { _ in try MigrationNetwork.connect(to: listener.endpoint, security: .plaintext) }
    var result: DryRunResult?
    if dryRun {
        let probe = receiveOnce(from: listener)
        result = try ConvergenceDryRun.run(source: MicroVMGuestSource(machine: source), options: options, probePages: probePages,
                                           openChannel: connect)
        _ = probe()
    }
    let receiver = receiveOnce(from: listener)
    let cpu = cpuSeconds()
    let sender = MigrationSender(source: MicroVMGuestSource(machine: source), options: options, openChannel: connect)
    sender.measuredBeforehand = result?.measurements
    let report = sender.run()
    if !report.succeeded { listener.close() }
    let sink = receiver()
    unlink(socketPath)
    let cpuUsed = cpuSeconds() - cpu
    source.stop()
    sink.machine?.stop()
    return (report, cpuUsed, result)
}

if let runs = resumeRuns {
    _ = try resumeBenchmark(runs: runs)
    exit(0)
}

if let runs = predictRuns {
    // Predicted against actual: the dry run's prediction, made before the migration from the dry run's measurements
    // alone, and the sender's own made after pass 0.
    print("scenario          run  sample dirty MB/s  probe MB/s  pred passes  pred total s  pred down ms  after-0 total s  after-0 down ms  passes  total s  down ms  total err  down err  result")
    for scenario in scenarios where chosen.isEmpty || chosen.contains(scenario.name) {
        for run in 0 ..< runs {
            let (report, _, dry) = try migrateOnce(scenario, dryRun: true)
            let dryRun = dry!
            let before: ConvergencePrediction? = dryRun.prediction
            let after0 = report.predictions.first { $0.afterPass == 0 }
            let downtime = report.downtimeSeconds ?? .nan
            func error(_ predicted: Double?, _ actual: Double) -> Double { predicted.map { ($0 - actual) / actual * 100 } ?? .nan }
            print(scenario.name.padding(toLength: 17, withPad: " ", startingAt: 0) + String(
                format: " %3d  %17.1f  %10.1f  %11d  %12.3f  %12.1f  %15.3f  %15.1f  %6d  %7.3f  %7.1f  %+8.0f%%  %+7.0f%%  %@",
                run, dryRun.measurements.dirty.bytesPerSecond / 1e6, dryRun.measurements.pagesPerSecond * 4096 / 1e6,
                (before?.passes.count ?? 0) + 1, before?.totalSeconds ?? .nan, (before?.downtimeSeconds ?? .nan) * 1000,
                after0?.totalSeconds ?? .nan, (after0?.downtimeSeconds ?? .nan) * 1000,
                report.passes.count, report.totalSeconds, downtime * 1000,
                error(before?.totalSeconds, report.totalSeconds), error(before?.downtimeSeconds, downtime),
                (report.succeeded ? (before?.converges == false ? "ok, predicted: \(before!.failure!)" : "ok") : report.error ?? "failed") as NSString))
            // What the prediction rested on, and what the passes did: for finding where a prediction went wrong.
            let m = dryRun.measurements
            print("    measured: \(m.dataPages) data pages, \(Int(m.pagesPerSecond)) pages/s, later \(Int(m.laterPagesPerSecond)), \(Int(m.wireBytesPerPage)) B/page, setup "
                  + String(format: "%.3f s, pass overhead %.4f s; dirty windows ", m.setupSeconds, m.passOverheadSeconds)
                  + m.dirty.points.map { String(format: "%.3f s %.0f", $0.seconds, $0.pages) }.joined(separator: ", "))
            print("    predicted passes: " + (before?.passes.map { String(format: "%d pages %.3f s dirty %d", $0.pages, $0.seconds, $0.dirtyPages) }
                .joined(separator: "; ") ?? "-") + "; final \(before?.finalPages ?? 0)")
            print("    actual passes:    " + report.passes.map { String(format: "%d pages (%d zero, %d unchanged) %.0f B/page %.3f s dirty %d", $0.pagesSent,
                                                                        $0.zeroPages, $0.unchangedPages,
                                                                        Double($0.wireBytes) / Double(max($0.pagesSent - $0.zeroPages, 1)),
                                                                        $0.seconds, $0.dirtyPages) }.joined(separator: "; ")
                  + String(format: "; setup %.3f s", report.setupSeconds))
        }
    }
    exit(0)
}

if let runs = abRuns {
    /// Median and range of `values`, formatted with `format`.
    func summary(_ values: [Double], _ format: String) -> String {
        let sorted = values.sorted()
        let median = sorted.count % 2 == 1 ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
        return String(format: format, median) + " (" + String(format: format, sorted.first!) + "–" + String(format: format, sorted.last!) + ")"
    }
    print("scenario     unchanged  run  total s  downtime ms  passes  pass 0 MB  later MB  unchanged pages  CPU s  result")
    for scenario in scenarios where chosen.isEmpty || chosen.contains(scenario.name) {
        var results: [Bool: [(report: MigrationReport, cpu: Double)]] = [true: [], false: []]
        for run in 0 ..< runs {
            // Alternating, and each pair in the other order than the last, so that drift on the machine hits both.
            for unchanged in run % 2 == 0 ? [true, false] : [false, true] {
                let (report, cpu, _) = try migrateOnce(scenario, unchangedPages: unchanged)
                results[unchanged]!.append((report, cpu))
                let later = report.passes.dropFirst().reduce(0) { $0 + $1.wireBytes }
                print(scenario.name.padding(toLength: 12, withPad: " ", startingAt: 0) + String(format: " %9@  %3d  %7.3f  %11.1f  %6d  %9.1f  %8.1f  %15d  %5.2f  %@",
                      unchanged ? "on" : "off", run, report.totalSeconds, (report.downtimeSeconds ?? .nan) * 1000, report.passes.count,
                      Double(report.passes.first?.wireBytes ?? 0) / 1e6, Double(later) / 1e6,
                      report.passes.reduce(0) { $0 + $1.unchangedPages }, cpu, (report.succeeded ? "ok" : report.error ?? "failed") as NSString))
            }
        }
        for unchanged in [true, false] {
            let all = results[unchanged]!
            print("\(scenario.name) unchanged \(unchanged ? "on" : "off"): ok \(all.count { $0.report.succeeded })/\(all.count), "
                  + "later passes MB " + summary(all.map { Double($0.report.passes.dropFirst().reduce(0) { $0 + $1.wireBytes }) / 1e6 }, "%.1f")
                  + ", total s " + summary(all.map(\.report.totalSeconds), "%.3f")
                  + ", downtime ms " + summary(all.map { ($0.report.downtimeSeconds ?? .nan) * 1000 }, "%.0f")
                  + ", passes " + summary(all.map { Double($0.report.passes.count) }, "%.0f")
                  + ", pass 0 MB " + summary(all.map { Double($0.report.passes.first?.wireBytes ?? 0) / 1e6 }, "%.1f")
                  + ", CPU s " + summary(all.map(\.cpu), "%.2f"))
        }
    }
    exit(0)
}

print("scenario             total s  downtime ms  passes  wire MB   payload GB/s  CPU s   result")
for scenario in scenarios where chosen.isEmpty || chosen.contains(scenario.name) {
    let (report, cpuUsed, _) = try migrateOnce(scenario)
    let payload = report.passes.reduce(0) { $0 + $1.payloadBytes - ($1.pass == 0 ? $1.zeroPages * 4096 : 0) }
    let sendSeconds = report.passes.reduce(0) { $0 + $1.seconds }
    print(scenario.name.padding(toLength: 20, withPad: " ", startingAt: 0) + String(format: " %7.3f  %11.1f  %6d  %8.1f  %12.2f  %6.2f  %@", report.totalSeconds,
                 (report.downtimeSeconds ?? .nan) * 1000, report.passes.count, Double(report.wireBytes) / 1e6,
                 Double(payload) / sendSeconds / 1e9, cpuUsed, (report.succeeded ? "ok" : report.error ?? "failed") as NSString))
}
