// Live migration between two MicroVMs in one process over Unix-socket channels (plaintext), in release mode: total time,
// downtime, bytes on the wire and page throughput, for the scenarios of issue 4.
//
//   swift build -c release --product migration-bench && .build/release/migration-bench [guest.elf] [scenario...]
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
let chosen = Set(arguments.filter { !$0.hasSuffix(".elf") })
let guest = try Array(Data(contentsOf: URL(fileURLWithPath: guestPath)))

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
]

print("scenario             total s  downtime ms  passes  wire MB   payload GB/s  CPU s   result")
for scenario in scenarios where chosen.isEmpty || chosen.contains(scenario.name) {
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
    let payload = report.passes.reduce(0) { $0 + $1.payloadBytes - ($1.pass == 0 ? $1.zeroPages * 4096 : 0) }
    let sendSeconds = report.passes.reduce(0) { $0 + $1.seconds }
    print(scenario.name.padding(toLength: 20, withPad: " ", startingAt: 0) + String(format: " %7.3f  %11.1f  %6d  %8.1f  %12.2f  %6.2f  %@", report.totalSeconds,
                 (report.downtimeSeconds ?? .nan) * 1000, report.passes.count, Double(report.wireBytes) / 1e6,
                 Double(payload) / sendSeconds / 1e9, cpuUsed, (report.succeeded ? "ok" : report.error ?? "failed") as NSString))
    source.stop()
    sink.machine?.stop()
}
