import Foundation
import KVMBackend
import MicroVM
import TestSupport
import XCTest

/// memstress under MicroVM, in this process: it boots, verifies its memory every second, and its ticks rise;
/// pausing and resuming it, and throttling it, leave it intact.
final class MemstressKVMTests: KVMTestCase {
    func boot(_ commandLine: String, memory: UInt64 = 128 << 20, vcpus: Int = 1) throws -> (MicroVM, SerialConsole) {
        let console = SerialConsole(output: nil)
        let machine = try MicroVM(booting: try TestGuest.image(), commandLine: commandLine,
                                  configuration: MicroVMConfiguration(memorySize: memory, vcpuCount: vcpus, console: console))
        machine.start()
        return (machine, console)
    }

    /// The next `count` status lines after line `after`; fails if one is not `verify=ok`.
    func statuses(_ console: SerialConsole, after: Int = 0, count: Int, timeout: TimeInterval = 10) -> [MemstressStatus] {
        var found: [MemstressStatus] = []
        var next = after
        while found.count < count {
            guard let line = console.waitForLine(after: next, timeout: timeout, where: { $0.hasPrefix("memstress") }) else {
                XCTFail("no memstress line within \(timeout) s; console: \(console.receivedLines.suffix(5))")
                return found
            }
            next = console.receivedLines.lastIndex(of: line).map { $0 + 1 } ?? next + 1
            XCTAssertFalse(line.contains("FAIL"), line)
            if let status = MemstressStatus(line) {
                XCTAssertTrue(status.verified, line)
                found.append(status)
            }
        }
        return found
    }

    func testBootsAndVerifiesWithRisingTicks() throws {
        let (machine, console) = try boot("workload=memstress size_mib=32 rate_mib=100 pattern=mixed")
        let seen = statuses(console, count: 3)
        XCTAssertEqual(seen.count, 3)
        XCTAssertEqual(seen.map(\.ticks), seen.map(\.ticks).sorted())
        XCTAssertGreaterThan(seen.last!.ticks, seen.first!.ticks, "the LAPIC timer must tick")
        XCTAssertEqual(seen.last!.pages, 32 * 256)
        XCTAssertNil(machine.stopped)
        machine.stop()
    }

    func testBootsWithSeveralVCPUs() throws {
        let (machine, console) = try boot("workload=memstress size_mib=16 rate_mib=50", vcpus: 4)
        XCTAssertEqual(statuses(console, count: 2).count, 2)
        // The application processors wait for a startup IPI that never comes; their state is still complete.
        try machine.pause()
        XCTAssertEqual(try machine.captureState().vcpus.count, 4)
        machine.stop()
    }

    func testPauseCaptureResumeLeavesTheGuestIntact() throws {
        let (machine, console) = try boot("workload=memstress size_mib=32 rate_mib=200 pattern=random")
        _ = statuses(console, count: 1)
        for _ in 0 ..< 10 {
            try machine.pause(timeout: 0.5)
            let state = try machine.captureState()
            XCTAssertEqual(try MachineStateEncoding.decode(MachineStateEncoding.encode(state)).vcpus[0].registers.rip,
                           state.vcpus[0].registers.rip)
            machine.resume()
            usleep(50_000)
        }
        let after = console.lineCount
        XCTAssertEqual(statuses(console, after: after, count: 2).count, 2)
        XCTAssertNil(machine.stopped)
        machine.stop()
    }

    func testThrottledGuestKeepsRunningCorrectly() throws {
        let (machine, console) = try boot("workload=memstress size_mib=32 rate_mib=400 pattern=text")
        _ = statuses(console, count: 1)
        machine.setThrottle(0.8)
        XCTAssertEqual(machine.throttle, 0.8)
        let after = console.lineCount
        XCTAssertEqual(statuses(console, after: after, count: 2, timeout: 20).count, 2)
        machine.setThrottle(0)
        machine.stop()
    }

    func testGuestThatDoesNotFitItsWorkloadExitsWithItsCode() throws {
        let (machine, _) = try boot("workload=memstress size_mib=512", memory: 64 << 20)
        XCTAssertEqual(machine.waitForStop(timeout: 10), .guestExit(GuestExitCode.badCommandLine.rawValue))
    }

    /// A VM started from a Dispatch worker thread (which blocks every signal, and whose mask new threads inherit)
    /// still pauses at once: its idle vCPU sits in an in-kernel HLT and leaves KVM_RUN only when kicked.
    func testVMStartedFromDispatchPausesPromptly() throws {
        let console = SerialConsole(output: nil)
        let machine = try MicroVM(booting: try TestGuest.image(), commandLine: "workload=memstress size_mib=4 rate_mib=0",
                                  configuration: MicroVMConfiguration(memorySize: 64 << 20, console: console))
        let started = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            machine.start()
            started.signal()
        }
        started.wait()
        XCTAssertNotNil(console.waitForLine(timeout: 10) { $0.contains("verify=ok") })
        for _ in 0 ..< 5 {
            XCTAssertNoThrow(try machine.pause(timeout: 0.2))
            machine.resume()
            usleep(50_000)
        }
        machine.stop()
    }
}
