// KVM benchmarks of the foundation: the cost of harvesting the dirty log, by method and dirty fraction;
// the latency of pausing all vCPUs; the time to capture and to restore the complete machine state.
//
//   swift build -c release --product kvm-bench && .build/release/kvm-bench [guest.elf]
//
// Figures are medians over repeated runs in one process; see bench/README.md.
import Foundation
import KVMBackend
import MicroVM

let guestPath = CommandLine.arguments.dropFirst().first ?? "guest/build/guest.elf"
let guest = try Array(Data(contentsOf: URL(fileURLWithPath: guestPath)))

func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

func median(_ values: [Double]) -> Double {
    let sorted = values.sorted()
    return sorted.isEmpty ? .nan : sorted[sorted.count / 2]
}

func format(_ value: Double, _ digits: Int = 1) -> String { String(format: "%.\(digits)f", value) }

// MARK: dirty log harvest

/// The dirtyrounds guest dirties `fraction` of a 1 GiB region per round and stops at the sync port, where the
/// harvest is timed. Memory is 1 GiB of region plus the guest's own 16 MiB and a little room.
func harvestCost(method: DirtyTrackingMethod, fraction: Double, rounds: Int = 15) throws -> (perGiB: Double, pages: Int) {
    let regionMiB = 1024
    let memory: UInt64 = UInt64(regionMiB + 32) << 20
    let count = Int(Double(regionMiB * 256) * fraction)
    let machine = try MicroVM(
        booting: guest, commandLine: "workload=dirtyrounds region_mib=\(regionMiB) count=\(count) rounds=\(rounds)",
        configuration: MicroVMConfiguration(memorySize: memory, dirtyTracking: method, console: SerialConsole(output: nil)))
    var pages = GuestPageBitmap(slots: machine.memory.slots)
    var timings: [Double] = []
    var harvested: [Int] = []
    machine.onSync = { round in
        pages.removeAll()
        let start = now()
        try! machine.dirtyTracker.harvest(into: &pages)
        let elapsed = Double(now() - start) / 1000
        if round > 0 {
            timings.append(elapsed)
            harvested.append(pages.count)
        }
    }
    try machine.dirtyTracker.start()
    machine.start()
    guard machine.waitForStop(timeout: 120) == .guestExit(GuestExitCode.pass.rawValue) else {
        fatalError("dirtyrounds did not finish: \(machine.stopped.map { "\($0)" } ?? "timeout")")
    }
    let gib = Double(memory) / Double(1 << 30)
    return (median(timings) / gib, Int(median(harvested.map(Double.init))))
}

print("== dirty log harvest: µs per GiB of guest memory (median of 15 rounds, 1 vCPU, 1 GiB dirtied region) ==")
print("method                          dirty    pages/round   µs per GiB")
for fraction in [0.001, 0.01, 0.1] {
    for method in [DirtyTrackingMethod.bitmap, .defaultRing] {
        let (cost, pages) = try harvestCost(method: method, fraction: fraction)
        print("\(method.description.padding(toLength: 31, withPad: " ", startingAt: 0)) \(format(fraction * 100, 1).padding(toLength: 5, withPad: " ", startingAt: 0))%   \(String(pages).padding(toLength: 12, withPad: " ", startingAt: 0))  \(format(cost))")
    }
}

// MARK: pause, capture, restore

print("\n== pause latency and full machine state capture/restore (1 vCPU, memstress writing 200 MiB/s) ==")
let console = SerialConsole(output: nil)
let machine = try MicroVM(booting: guest, commandLine: "workload=memstress size_mib=64 rate_mib=200",
                          configuration: MicroVMConfiguration(memorySize: 256 << 20, console: console))
machine.start()
_ = console.waitForLine(timeout: 10) { $0.contains("verify=ok") }
var pauses: [Double] = [], captures: [Double] = [], encodes: [Double] = [], restores: [Double] = []
var blobSize = 0
var lastState: MachineState?
for _ in 0 ..< 200 {
    usleep(2000)
    var start = now()
    try machine.pause()
    pauses.append(Double(now() - start) / 1000)
    start = now()
    let state = try machine.captureState()
    captures.append(Double(now() - start) / 1000)
    start = now()
    blobSize = MachineStateEncoding.encode(state).count
    encodes.append(Double(now() - start) / 1000)
    lastState = state
    machine.resume()
}
machine.stop()
let target = try MicroVM(restoring: lastState!, memory: try GuestMemory(size: 256 << 20),
                         configuration: MicroVMConfiguration(memorySize: 256 << 20, console: SerialConsole(output: nil)))
for _ in 0 ..< 200 {
    let start = now()
    for (vcpu, saved) in zip(target.vcpus, lastState!.vcpus) { try vcpu.restoreState(saved) }
    try target.vm.restoreDevices(lastState!.devices)
    restores.append(Double(now() - start) / 1000)
}
print("pause all vCPUs:          median \(format(median(pauses))) µs, max \(format(pauses.max()!)) µs")
print("capture machine state:    median \(format(median(captures))) µs")
print("encode state blob:        median \(format(median(encodes))) µs (\(blobSize) bytes)")
print("restore machine state:    median \(format(median(restores))) µs")
