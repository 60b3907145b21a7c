// Write and read throughput of xl save images against the native formats: the snapshot file
// (protocol/snapshot.md) and MicroVM's save file (protocol/microvm-save.md), for a 4 GiB guest holding 1 GiB of data.
//   swift build -c release --product xen-bench && .build/release/xen-bench guest/build/guest.elf [directory] [repeats]
// Write: a paused MicroVM to a synced file, for Xen both through GuestCopy into XenImageSink (the seam) and
// straight from the source (XenImageSink.save). Read: the file to a MicroVM ready to run, with the file's pages
// evicted from the page cache first (posix_fadvise DONTNEED), so the disk is read. Medians of `repeats`.
import Foundation
import Glibc
import KVMMigration
import MicroVM
import MigrationEngine
import Snapshots
import XenAdapter

let arguments = CommandLine.arguments
guard arguments.count >= 2 else {
    FileHandle.standardError.write("usage: xen-bench GUEST.elf [directory=/tmp] [repeats=5]\n".data(using: .utf8)!)
    exit(64)
}
let directory = arguments.count > 2 ? arguments[2] : NSTemporaryDirectory()
let repeats = arguments.count > 3 ? Int(arguments[3])! : 5
let guestBytes: UInt64 = 4 << 30
let dataBytes = 1 << 30

let console = SerialConsole(output: nil)
let kernel = try [UInt8](Data(contentsOf: URL(fileURLWithPath: arguments[1])))
let machine = try MicroVM(booting: kernel, commandLine: "workload=memstress size_mib=16 rate_mib=1",
                          configuration: MicroVMConfiguration(memorySize: guestBytes, console: console))
machine.start()
guard console.waitForLine(timeout: 20, where: { $0.hasPrefix("memstress") }) != nil else { fatalError("guest did not start") }
try machine.pause()
// 1 GiB of incompressible data at 1-2 GiB, where the guest (16 MiB of memstress) does not write.
let data = machine.memory.pointer(guestPhysicalAddress: 1 << 30, length: dataBytes)!
var x: UInt64 = 0x9E37_79B9_7F4A_7C15
for i in 0 ..< dataBytes / 8 {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17
    data.storeBytes(of: x, toByteOffset: 8 * i, as: UInt64.self)
}
var populated = 0
for range in try machine.memory.dataRanges() { populated += range.count }

func evict(_ path: String) {
    let fd = open(path, O_RDONLY)
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
    close(fd)
}

func fileSize(_ path: String) -> Int { (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? 0 }

func allocatedBytes(_ path: String) -> Int {
    var st = stat()
    stat(path, &st)
    return Int(st.st_blocks) * 512
}

func time(_ body: () throws -> Void) rethrows -> Double {
    let start = DispatchTime.now().uptimeNanoseconds
    try body()
    return Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
}

func median(_ values: [Double]) -> Double { values.sorted()[values.count / 2] }

let native = directory + "/xen-bench-native.save", xen = directory + "/xen-bench.xl", snapshot = directory + "/xen-bench.snap"
var results: [String: [Double]] = [:]
let snapshotOptions = SnapshotSaveOptions(live: false, keepTracking: false, resumeGuest: false, overwrite: true)
for _ in 0 ..< repeats {
    results["snapshot write (plain)", default: []].append(try time {
        _ = try SnapshotSaver(source: MicroVMGuestSource(machine: machine), path: snapshot, options: snapshotOptions).run()
    })
    evict(snapshot)
    results["snapshot read (eager restore)", default: []].append(try time {
        let sink = MicroVMGuestSink(console: SerialConsole(output: nil))
        _ = try SnapshotRestore.restore(try SnapshotChain.open(snapshot), into: sink)
        sink.discard()
    })
    results["native write", default: []].append(try time { try MicroVMSaveFile.write(machine, to: native) })
    evict(native)
    results["native read", default: []].append(try time {
        let restored = try MicroVMSaveFile.restore(from: native, console: SerialConsole(output: nil))
        restored.stop()
    })
    // The sink collects pages first (the seam hands out pointers), then writes the file: timed apart too.
    let sink = XenImageSink(path: xen)
    let collect = try time { try GuestCopy.copy(from: MicroVMGuestSource(machine: machine), to: sink) }
    let emit = try time { try sink.start() }
    results["xen write", default: []].append(collect + emit)
    results["  of which: collect pages in the sink", default: []].append(collect)
    results["  of which: write and sync the file", default: []].append(emit)
    results["xen write, straight from the VM (XenImageSink.save)", default: []].append(try time {
        try XenImageSink.save(MicroVMGuestSource(machine: machine), to: xen)
    })
    evict(xen)
    var source: XenImageSource!
    let parse = try time { source = try XenImageSource(path: xen) }
    let build = try time {
        let sink = MicroVMGuestSink(console: SerialConsole(output: nil))
        try GuestCopy.copy(from: source, to: sink)
        precondition(source.usedCarriedState)
        sink.discard()
    }
    source = nil
    results["xen read", default: []].append(parse + build)
    results["  of which: open and check the image", default: []].append(parse)
    results["  of which: copy pages into the MicroVM", default: []].append(build)
}
machine.stop()

print("guest \(guestBytes >> 30) GiB, populated \(String(format: "%.3f", Double(populated) / Double(1 << 30))) GiB, \(repeats) runs, files in \(directory)")
print("native save file: \(fileSize(native)) bytes apparent, \(allocatedBytes(native)) allocated; xl image: \(fileSize(xen)) bytes")
print("| operation | median s | fastest s | GB/s of guest data (median) |")
print("|---|---|---|---|")
for key in ["snapshot write (plain)", "native write", "xen write", "  of which: collect pages in the sink", "  of which: write and sync the file",
            "xen write, straight from the VM (XenImageSink.save)",
            "snapshot read (eager restore)", "native read", "xen read", "  of which: open and check the image", "  of which: copy pages into the MicroVM"] {
    let t = median(results[key]!)
    let fastest = results[key]!.min()!
    print("| \(key) | \(String(format: "%.3f", t)) | \(String(format: "%.3f", fastest)) | \(String(format: "%.2f", Double(populated) / t / 1e9)) |")
}
unlink(native)
unlink(xen)
unlink(snapshot)
