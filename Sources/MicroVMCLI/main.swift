import ArgumentParser
import Foundation
import Glibc
import KVMBackend
import MicroVM

/// `microvm`: boot a PVH guest under KVM, and save or restore a running one, from the command line.
struct MicroVMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "microvm",
        abstract: "Run a PVH guest under KVM with the project's small VMM.",
        discussion: """
            Exit status: 0 when the guest exits with its pass code (0x10) or when the VM was saved; 1 when the \
            guest exits with any other code; 2 when the VMM fails.
            """,
        subcommands: [Run.self, Restore.self])
}

/// What to do with a running VM, shared by `run` and `restore`.
struct RunOptions: ParsableArguments {
    @Option(help: "Stop after this many seconds (default: run until the guest exits).")
    var duration: Double?

    @Option(help: "After this many seconds, pause the VM, save it to --save-to, and exit.")
    var saveAfter: Double?

    @Option(help: "The file to save the VM to (see protocol/microvm-save.md).")
    var saveTo: String?

    @Option(help: "Write the console to this file instead of standard output.")
    var console: String?

    func validate() throws {
        if (saveAfter == nil) != (saveTo == nil) { throw ValidationError("--save-after and --save-to go together") }
    }

    func makeConsole() throws -> SerialConsole {
        guard let console else { return SerialConsole(output: STDOUT_FILENO) }
        let fd = open(console, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw ValidationError("cannot open console file \(console): \(String(cString: strerror(errno)))") }
        return SerialConsole(output: fd)
    }

    /// Starts the VM and waits for the guest to exit, the duration to pass, or the moment to save.
    func drive(_ machine: MicroVM) throws -> Int32 {
        machine.start()
        let wait = saveAfter ?? duration ?? 365 * 86_400
        if let stop = machine.waitForStop(timeout: wait) { return report(stop) }
        if let saveTo {
            let started = DispatchTime.now()
            try machine.pause()
            let paused = DispatchTime.now()
            try MicroVMSaveFile.write(machine, to: saveTo)
            let saved = DispatchTime.now()
            machine.stop()
            log("saved to \(saveTo): pause \(milliseconds(started, paused)) ms, save \(milliseconds(paused, saved)) ms")
            return 0
        }
        machine.stop()
        log("stopped after \(duration ?? 0) s")
        return 0
    }

    func report(_ stop: MicroVMStop) -> Int32 {
        log("\(stop)")
        switch stop {
        case .guestExit(GuestExitCode.pass.rawValue), .requested: return 0
        case .guestExit: return 1
        case .failed: return 2
        }
    }
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Boot a PVH ELF guest.")

    @Option(help: "The guest: a PVH-bootable ELF file.")
    var kernel: String

    @Option(help: "The guest's command line.")
    var cmdline = ""

    @Option(help: "Guest memory, e.g. 512M or 4G.")
    var memory = "256M"

    @Option(help: "Number of vCPUs.")
    var vcpus = 1

    @Option(help: "Dirty tracking: bitmap or ring.")
    var dirtyTracking = "bitmap"

    @OptionGroup var options: RunOptions

    func run() throws {
        let image = try Array(Data(contentsOf: URL(fileURLWithPath: kernel)))
        let configuration = MicroVMConfiguration(
            memorySize: try parseSize(memory), vcpuCount: vcpus,
            dirtyTracking: try parseTracking(dirtyTracking), console: try options.makeConsole())
        let machine = try MicroVM(booting: image, commandLine: cmdline, configuration: configuration)
        throw ExitCode(try options.drive(machine))
    }
}

struct Restore: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Carry on a VM saved with --save-to, in this new process.")

    @Argument(help: "A file written by --save-to.")
    var file: String

    @OptionGroup var options: RunOptions

    func run() throws {
        let started = DispatchTime.now()
        let machine = try MicroVMSaveFile.restore(from: file, console: try options.makeConsole())
        log("restored from \(file) in \(milliseconds(started, DispatchTime.now())) ms")
        throw ExitCode(try options.drive(machine))
    }
}

func parseSize(_ text: String) throws -> UInt64 {
    let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
    let upper = text.uppercased()
    if let unit = upper.last.flatMap({ units[$0] }), let value = UInt64(upper.dropLast()) { return value * unit }
    if let value = UInt64(upper) { return value }
    throw ValidationError("not a size: \(text) (use e.g. 512M or 4G)")
}

func parseTracking(_ text: String) throws -> DirtyTrackingMethod {
    switch text {
    case "bitmap": return .bitmap
    case "ring": return .defaultRing
    default: throw ValidationError("dirty tracking is bitmap or ring, not \(text)")
    }
}

func milliseconds(_ from: DispatchTime, _ to: DispatchTime) -> String {
    String(format: "%.2f", Double(to.uptimeNanoseconds - from.uptimeNanoseconds) / 1e6)
}

/// VMM messages go to standard error, so standard output carries only the guest's console.
func log(_ message: String) {
    FileHandle.standardError.write(Data("microvm: \(message)\n".utf8))
}

MicroVMCommand.main()
