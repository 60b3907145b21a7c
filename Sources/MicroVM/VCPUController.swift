import CKVM
import Foundation
import Glibc
import KVMBackend
import Threads

/// Runs each vCPU on a thread of its own, and takes them back: pause and resume within a bounded time, throttle,
/// stop. A vCPU deep inside KVM_RUN is taken back by setting `immediate_exit` in its run page and sending its
/// thread a signal: the signal interrupts a running KVM_RUN, and `immediate_exit` catches the thread that was
/// just about to enter it.
///
/// Sendable: every mutable field is guarded by `condition`.
final class VCPUController: @unchecked Sendable {
    enum Phase { case running, paused, stopping }

    private let vcpus: [KVMVCPU]
    private let condition = NSCondition()
    // All below are guarded by `condition`.
    private var phase = Phase.running
    private var threads: [pthread_t?]
    private var parked = 0
    private var alive = 0
    private var pendingSleep: [Double]
    private var throttleFraction = 0.0

    static let kickSignal: Int32 = {
        let signal = ckvm_sigrtmin() + 2
        precondition(ckvm_install_kick_handler(signal) == 0, "cannot install the vCPU kick signal handler")
        return signal
    }()

    init(vcpus: [KVMVCPU]) {
        self.vcpus = vcpus
        threads = Array(repeating: nil, count: vcpus.count)
        pendingSleep = Array(repeating: 0, count: vcpus.count)
        _ = Self.kickSignal
    }

    /// Starts one thread per vCPU; each calls `step` after every exit, and stops when it returns false.
    func start(step: @escaping @Sendable (KVMVCPU) -> Bool) {
        condition.lock()
        alive = vcpus.count
        condition.unlock()
        for (index, vcpu) in vcpus.enumerated() {
            startThread(named: "vcpu\(vcpu.id)", stackSize: 1 << 20) { [self] in loop(index: index, vcpu: vcpu, step: step) }
        }
    }

    private func loop(index: Int, vcpu: KVMVCPU, step: (KVMVCPU) -> Bool) {
        // Without this a vCPU started from a Dispatch thread (which blocks all signals) could not be kicked out
        // of KVM_RUN: pause and throttle would wait for the guest's next exit.
        precondition(ckvm_unblock_signal(Self.kickSignal) == 0, "cannot unblock the vCPU kick signal")
        condition.lock()
        threads[index] = pthread_self()
        condition.unlock()
        defer {
            condition.lock()
            threads[index] = nil
            alive -= 1
            condition.broadcast()
            condition.unlock()
        }
        while true {
            condition.lock()
            if phase == .paused {
                parked += 1
                condition.broadcast()
                while phase == .paused { condition.wait() }
                parked -= 1
            }
            if phase == .stopping {
                condition.unlock()
                return
            }
            let sleep = pendingSleep[index]
            pendingSleep[index] = 0
            // Cleared under the lock: a kick sets it under the same lock, so none is lost.
            vcpu.requestImmediateExit(false)
            condition.unlock()
            if sleep > 0 { usleep(UInt32(sleep * 1_000_000)) }
            if !step(vcpu) {
                requestStop()
                return
            }
        }
    }

    /// Interrupts vCPU `index`. Call with the lock held.
    private func kick(_ index: Int) {
        vcpus[index].requestImmediateExit(true)
        if let thread = threads[index] { pthread_kill(thread, Self.kickSignal) }
    }

    /// Pauses every vCPU and returns once all are out of KVM_RUN, or throws after `timeout` seconds.
    func pause(timeout: TimeInterval) throws {
        let deadline = Date(timeIntervalSinceNow: timeout)
        condition.lock()
        defer { condition.unlock() }
        guard phase == .running else { return }
        phase = .paused
        for index in vcpus.indices { kick(index) }
        while parked < alive {
            if !condition.wait(until: deadline) {
                throw MicroVMError.pauseTimedOut(parked: parked, of: alive, seconds: timeout)
            }
        }
    }

    func resume() {
        condition.lock()
        if phase == .paused { phase = .running }
        condition.broadcast()
        condition.unlock()
    }

    /// Makes every vCPU sleep `fraction` of the time (0 ..< 1), in slices of 10 ms, as auto-converge needs.
    func setThrottle(_ fraction: Double) {
        let fraction = min(max(fraction, 0), 0.99)
        condition.lock()
        let wasRunning = throttleFraction > 0
        throttleFraction = fraction
        condition.unlock()
        guard fraction > 0, !wasRunning else { return }
        startThread(named: "throttle") { [self] in self.throttleLoop() }
    }

    var throttle: Double {
        condition.lock()
        defer { condition.unlock() }
        return throttleFraction
    }

    private func throttleLoop() {
        let runSlice = 0.010
        while true {
            condition.lock()
            let fraction = throttleFraction
            guard fraction > 0, phase != .stopping else {
                condition.unlock()
                return
            }
            let sleep = runSlice * fraction / (1 - fraction)
            if phase == .running {
                for index in vcpus.indices {
                    pendingSleep[index] = sleep
                    kick(index)
                }
            }
            condition.unlock()
            Thread.sleep(forTimeInterval: runSlice + sleep)
        }
    }

    /// Asks every vCPU thread to finish; returns at once.
    func requestStop() {
        condition.lock()
        phase = .stopping
        for index in vcpus.indices { kick(index) }
        condition.broadcast()
        condition.unlock()
    }

    /// Waits until every vCPU thread has finished.
    func waitUntilStopped(timeout: TimeInterval) -> Bool {
        let deadline = Date(timeIntervalSinceNow: timeout)
        condition.lock()
        defer { condition.unlock() }
        while alive > 0 {
            if !condition.wait(until: deadline) { return false }
        }
        return true
    }

    var isPaused: Bool {
        condition.lock()
        defer { condition.unlock() }
        return phase == .paused && parked == alive
    }
}
