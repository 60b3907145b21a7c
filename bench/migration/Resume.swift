// Resumable pre-copy (issue 15 item 3, stream.md §6.15), in release mode: a 1 GiB guest with 512 MiB of random data
// rewritten at 50 MiB/s; per run, a fresh migration (the yardstick), then one whose channel 0 is cut at 90 % of what
// pass 0 put on it, then the migration that resumes it. The figure is the resume's wire bytes over the fresh one's
// (the issue's bound: 20 %).
//
//   .build/release/migration-bench [guest.elf] --resume RUNS
@preconcurrency import Foundation
import KVMMigration
import MicroVM
import MigrationEngine
import MigrationNetwork
import MigrationWire
import Threads
import Transport

/// A channel that fails, as a broken link does, once `cutAfter` bytes have been sent on it.
///
/// Sendable: `sent` belongs to the one thread that sends on a channel.
final class CuttingChannel: MigrationChannel, @unchecked Sendable {
    private let base: MigrationChannel
    private let cutAfter: Int
    private var sent = 0

    init(_ base: MigrationChannel, cutAfter: Int) {
        self.base = base
        self.cutAfter = cutAfter
    }

    func send(_ buffers: [UnsafeRawBufferPointer]) throws {
        sent += buffers.reduce(0) { $0 + $1.count }
        if sent > cutAfter {
            base.close()
            throw MigrationError.channel("the benchmark cut the link after \(cutAfter) bytes")
        }
        try base.send(buffers)
    }

    func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> Int { try base.receive(into: buffer) }
    func close() { base.close() }
}

/// One row of the resume benchmark.
struct ResumeRun {
    var freshBytes: Int, freshSeconds: Double
    var resumedBytes: Int, resumedSeconds: Double, resumedSetupSeconds: Double
    var heldPages: Int, keptPages: Int, passZeroSeconds: Double
    var ratio: Double { Double(resumedBytes) / Double(freshBytes) }
}

func resumeBenchmark(runs: Int) throws -> [ResumeRun] {
    let scenario = Scenario(name: "resume-1g", memory: 1 << 30, commandLine: "workload=memstress size_mib=512 rate_mib=50 pattern=random",
                            compression: .none, channels: 2)
    let source = try bootSource(scenario)
    defer { source.stop() }
    let socketPath = NSTemporaryDirectory() + "migration-bench-resume-\(getpid()).sock"
    unlink(socketPath)
    let listener = try Listener(endpoint: .unix(path: socketPath), security: .plaintext)
    defer {
        listener.close()
        unlink(socketPath)
    }
    let shelf = PreCopyLeftoverShelf(gracePeriod: 60)
    /// Receives one migration with the shelf; returns a wait for its sink (the one it resumed into, if it did).
    func receive() -> () -> GuestSink {
        let given = MicroVMGuestSink(console: SerialConsole(output: nil))
        let done = DispatchSemaphore(value: 0)
        let used = Locked<GuestSink>(given)
        Thread {
            if let (channels, _) = try? MigrationNetwork.accept(from: listener) {
                let receiver = MigrationReceiver(sink: given, channels: channels, leftoverShelf: shelf, peer: "bench")
                _ = try? receiver.run()
                used.withLock { $0 = receiver.sink }
            }
            done.signal()
        }.start()
        return {
            done.wait()
            return used.withLock { $0 }
        }
    }
    /// Migrates the source (its channel 0 cut after `cut` bytes, if given); a destination that runs is stopped and the
    /// source resumed, so that the next migration finds it as before.
    func migrate(_ options: MigrationOptions, cut: Int? = nil) -> MigrationReport {
        let destination = receive()
        let sender = MigrationSender(source: MicroVMGuestSource(machine: source), options: options) { index in
            let channel = try MigrationNetwork.connect(to: listener.endpoint, security: .plaintext)
            return index == 0 ? cut.map { CuttingChannel(channel, cutAfter: $0) } ?? channel : channel
        }
        let report = sender.run()
        if let sink = destination() as? MicroVMGuestSink, let machine = sink.machine {
            machine.stop()
            source.resume()
        }
        return report
    }
    var options = MigrationOptions()
    options.channels = scenario.channels
    options.compression = scenario.compression
    var results: [ResumeRun] = []
    print("run  fresh MB  fresh s  resumed MB  resumed s  setup s  held pages  kept pages  pass 0 s  resumed/fresh")
    for run in 0 ..< runs {
        let fresh = migrate(options)
        guard fresh.succeeded, let passZero = fresh.passes.first else { fatalError("fresh migration failed: \(fresh.error ?? "")") }
        let broken = migrate(options, cut: passZero.wireBytes / scenario.channels * 9 / 10)
        guard let ticket = broken.resumeTicket else { fatalError("the cut migration is not resumable: \(broken.error ?? "")") }
        var resumeOptions = options
        resumeOptions.resumeTicket = ticket
        let resumed = migrate(resumeOptions)
        guard resumed.succeeded, let held = resumed.resumedPreCopy, held.resumed, let resumedZero = resumed.passes.first else {
            fatalError("the resume failed: \(resumed.error ?? "") \(String(describing: resumed.resumedPreCopy))")
        }
        let row = ResumeRun(freshBytes: fresh.wireBytes, freshSeconds: fresh.totalSeconds,
                            resumedBytes: resumed.wireBytes, resumedSeconds: resumed.totalSeconds, resumedSetupSeconds: resumed.setupSeconds,
                            heldPages: held.heldPages, keptPages: resumedZero.unchangedPages, passZeroSeconds: resumedZero.seconds)
        results.append(row)
        print(String(format: "%3d  %8.1f  %7.3f  %10.1f  %9.3f  %7.3f  %10d  %10d  %8.3f  %12.1f%%", run, Double(row.freshBytes) / 1e6,
                     row.freshSeconds, Double(row.resumedBytes) / 1e6, row.resumedSeconds, row.resumedSetupSeconds,
                     row.heldPages, row.keptPages, row.passZeroSeconds, row.ratio * 100))
    }
    let ratios = results.map(\.ratio).sorted()
    print(String(format: "median resumed/fresh: %.1f%% (min %.1f%%, max %.1f%%) over %d runs", ratios[ratios.count / 2] * 100,
                 ratios.first! * 100, ratios.last! * 100, ratios.count))
    return results
}
