// Live migration between two MicroVMs in one process over Unix socket pairs, in release mode: total time,
// downtime, bytes on the wire and page throughput, for the scenarios of issue 4.
//
//   swift build -c release --product migration-bench && .build/release/migration-bench [guest.elf] [scenario...]
import Foundation
import Glibc
import KVMMigration
import MicroVM
import MigrationEngine

signal(SIGPIPE, SIG_IGN)
setvbuf(stdout, nil, _IOLBF, 0)
let arguments = Array(CommandLine.arguments.dropFirst())
let guestPath = arguments.first { $0.hasSuffix(".elf") } ?? "guest/build/guest.elf"
let chosen = Set(arguments.filter { !$0.hasSuffix(".elf") })
let guest = try Array(Data(contentsOf: URL(fileURLWithPath: guestPath)))

/// A Unix socket pair end, the simplest real channel (no TLS: this measures the engine).
final class SocketChannel: MigrationChannel {
    let fd: Int32
    init(_ fd: Int32) { self.fd = fd }
    static func pair() -> (SocketChannel, SocketChannel) {
        var fds: [Int32] = [0, 0]
        precondition(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        for fd in fds { var size: Int32 = 4 << 20; setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, 4) }
        return (SocketChannel(fds[0]), SocketChannel(fds[1]))
    }
    func send(_ buffers: [UnsafeRawBufferPointer]) throws {
        var iov = buffers.filter { $0.count > 0 }.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
        var index = 0
        while index < iov.count {
            let n = iov.withUnsafeMutableBufferPointer { writev(fd, $0.baseAddress! + index, Int32(min($0.count - index, 1024))) }
            if n < 0 { if errno == EINTR { continue }; throw NSError(domain: "writev", code: Int(errno)) }
            var left = n
            while left > 0, index < iov.count {
                if left >= iov[index].iov_len { left -= iov[index].iov_len; index += 1 } else {
                    iov[index].iov_base += left; iov[index].iov_len -= left; left = 0
                }
            }
        }
    }
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        while true {
            let n = recv(fd, buffer.baseAddress, buffer.count, 0)
            if n >= 0 { return n }
            if errno != EINTR { throw NSError(domain: "recv", code: Int(errno)) }
        }
    }
    func close() { shutdown(fd, Int32(SHUT_RDWR)) }
    deinit { Glibc.close(fd) }
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
    let pairs = (0 ..< scenario.channels).map { _ in SocketChannel.pair() }
    let sink = MicroVMGuestSink(console: SerialConsole(output: nil))
    var options = MigrationOptions()
    options.channels = scenario.channels
    options.compression = scenario.compression
    let receiver = MigrationReceiver(sink: sink, channels: pairs.map(\.1))
    let done = DispatchSemaphore(value: 0)
    Thread {
        do { _ = try receiver.run() } catch { print("receiver: \(error)") }
        done.signal()
    }.start()
    let cpu = cpuSeconds()
    let report = MigrationSender(source: MicroVMGuestSource(machine: source), channels: pairs.map(\.0), options: options).run()
    done.wait()
    let cpuUsed = cpuSeconds() - cpu
    let payload = report.passes.reduce(0) { $0 + $1.payloadBytes - ($1.pass == 0 ? $1.zeroPages * 4096 : 0) }
    let sendSeconds = report.passes.reduce(0) { $0 + $1.seconds }
    print(scenario.name.padding(toLength: 20, withPad: " ", startingAt: 0) + String(format: " %7.3f  %11.1f  %6d  %8.1f  %12.2f  %6.2f  %@", report.totalSeconds,
                 (report.downtimeSeconds ?? .nan) * 1000, report.passes.count, Double(report.wireBytes) / 1e6,
                 Double(payload) / sendSeconds / 1e9, cpuUsed, (report.succeeded ? "ok" : report.error ?? "failed") as NSString))
    source.stop()
    sink.machine?.stop()
}
