// Live migration between two MicroVMs in one process over Unix-socket channels (plaintext), in release mode: total time,
// downtime, bytes on the wire and page throughput, for the scenarios of issue 4.
//
//   swift build -c release --product migration-bench && .build/release/migration-bench [guest.elf] [scenario...]
//   .build/release/migration-bench [guest.elf] --unchanged-ab RUNS [scenario...]
//   .build/release/migration-bench [guest.elf] --postcopy RUNS [--precopy] [--json FILE] [dirty-800|hot-2g...]
// The second form runs each scenario RUNS times with unchanged pages (stream.md §6.4.1) on and off, alternating,
// and prints medians with min-max of the wire bytes of the passes after pass 0 and of the total time. The third
// runs the post-copy rows of issue 15 (PostCopy.swift) and writes every figure as JSON; with --precopy, the same rows
// in pre-copy, for reference.
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
let optionsWithValue: Set<String> = ["--unchanged-ab", "--postcopy", "--json"]
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

/// One migration of a freshly booted guest: the sender's report and the CPU time of the whole process.
func migrateOnce(_ scenario: Scenario, unchangedPages: Bool = true) throws -> (report: MigrationReport, cpu: Double) {
    let console = SerialConsole(output: nil)
    let source = try MicroVM(booting: guest, commandLine: scenario.commandLine,
                             configuration: MicroVMConfiguration(memorySize: scenario.memory, console: console))
    source.start()
    // Wait until the working set is written once: the first status line that counts every page.
    let pages = scenario.commandLine.split(separator: " ").first { $0.hasPrefix("size_mib=") }.map { Int($0.dropFirst(9))! * 256 }!
    guard console.waitForLine(timeout: 120, where: { $0.contains("pages=\(pages) ") }) != nil else { fatalError("\(scenario.name): guest did not fill its working set") }
    let socketPath = NSTemporaryDirectory() + "migration-bench-\(getpid()).sock"
    unlink(socketPath)
    let listener = try Listener(endpoint: .unix(path: socketPath), security: .plaintext)
    let sink = MicroVMGuestSink(console: SerialConsole(output: nil))
    var options = MigrationOptions()
    options.channels = scenario.channels
    options.compression = scenario.compression
    options.unchangedPages = unchangedPages
    let done = DispatchSemaphore(value: 0)
    Thread {
        do {
            let (channels, _) = try MigrationNetwork.accept(from: listener)
            _ = try MigrationReceiver(sink: sink, channels: channels).run()
        } catch { print("receiver: \(error)") }
        done.signal()
    }.start()
    let cpu = cpuSeconds()
    let report = MigrationSender(source: MicroVMGuestSource(machine: source), options: options) { _ in
        try MigrationNetwork.connect(to: listener.endpoint, security: .plaintext)
    }.run()
    if !report.succeeded { listener.close() }
    done.wait()
    unlink(socketPath)
    let cpuUsed = cpuSeconds() - cpu
    source.stop()
    sink.machine?.stop()
    return (report, cpuUsed)
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
                let (report, cpu) = try migrateOnce(scenario, unchangedPages: unchanged)
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
    let (report, cpuUsed) = try migrateOnce(scenario)
    let payload = report.passes.reduce(0) { $0 + $1.payloadBytes - ($1.pass == 0 ? $1.zeroPages * 4096 : 0) }
    let sendSeconds = report.passes.reduce(0) { $0 + $1.seconds }
    print(scenario.name.padding(toLength: 20, withPad: " ", startingAt: 0) + String(format: " %7.3f  %11.1f  %6d  %8.1f  %12.2f  %6.2f  %@", report.totalSeconds,
                 (report.downtimeSeconds ?? .nan) * 1000, report.passes.count, Double(report.wireBytes) / 1e6,
                 Double(payload) / sendSeconds / 1e9, cpuUsed, (report.succeeded ? "ok" : report.error ?? "failed") as NSString))
}
