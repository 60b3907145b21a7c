import Foundation
import Glibc
import KVMBackend
import Logging
import MicroVM
import MigratedAPI

/// One VM the daemon knows about. While it runs it holds its MicroVM; once it has stopped, the MicroVM (and with
/// it the guest's RAM) is released and only its final account is kept, until the VM is deleted.
///
/// Sendable: the mutable fields (`consoleFD`, `final`, `paused`, `inDoubt`, `arrival`, `arrivalPause`) are read and written only under
/// the owning `VMManager`'s lock (hence fileprivate).
public final class ManagedVM: @unchecked Sendable {
    public let id: String
    /// What it was started with; a migration sends this as the VM's static configuration.
    public let request: VMCreateRequest
    /// What holds its RAM: the daemon's choice when it was started or arrived (`guest_memory`).
    public let memoryBacking: GuestMemory.Backing
    let startedAt: Date
    private let startedUptime: DispatchTime
    // Guarded by the manager's lock.
    fileprivate(set) var machine: MicroVM?
    fileprivate var consoleFD: Int32?
    fileprivate var final: Final?
    /// Paused through the API (not by a migration or snapshot, which pause and resume it themselves), or left
    /// paused by a migration whose outcome is in doubt.
    fileprivate var paused = false
    /// Why a migration left it paused: it may run at the destination (control-api.md §3.7).
    fileprivate var inDoubt: MigrationInDoubt?
    /// Set from the start of a guest that arrived by migration until that migration has ended (in post-copy, until
    /// its last page has come): where it came from, and the machine the receiver started, so that the end of the
    /// arrival is not taken for another VM's that got the id meanwhile.
    fileprivate var arrival: (peer: String, machine: ObjectIdentifier)?
    /// While that migration's post-copy waits for its source to resume: why, and until when (DispatchTime uptime
    /// nanoseconds).
    fileprivate var arrivalPause: (reason: String?, until: UInt64)?

    struct Final {
        var state: VMState
        var reason: String
        var exitCode: Int?
        var uptime: Double
        var consoleLines: Int
        var lastConsoleLine: String?
    }

    init(id: String, request: VMCreateRequest, machine: MicroVM, consoleFD: Int32?) {
        self.id = id
        self.request = request
        memoryBacking = machine.memory.backing
        self.machine = machine
        self.consoleFD = consoleFD
        startedAt = Date()
        startedUptime = .now()
    }

    var uptime: Double { Double(DispatchTime.now().uptimeNanoseconds - startedUptime.uptimeNanoseconds) / 1e9 }

    /// Its account once stopped; nil while it runs.
    fileprivate func finalAccount(_ state: VMState, _ reason: String, exitCode: Int? = nil) -> Final {
        let lines = machine?.console.receivedLines ?? []
        return Final(state: state, reason: reason, exitCode: exitCode, uptime: uptime,
                     consoleLines: machine?.console.lineCount ?? 0, lastConsoleLine: lines.last)
    }
}

/// The daemon's VMs: starting, listing, stopping and deleting them, and the memory budget they share.
///
/// Sendable: `vms`, `order`, `reserved` and the counters, and every ManagedVM's mutable fields, are guarded by `lock`.
/// Every method is safe to call from any thread; the ones that wait for KVM (boot, stop) block their caller,
/// so async callers run them on a Dispatch queue (see ControlAPI).
public final class VMManager: @unchecked Sendable {
    /// Guest memory all VMs together may hold.
    public let memoryBudget: UInt64
    /// What holds the RAM of the VMs this manager boots.
    public let memoryBacking: GuestMemory.Backing
    private let logger: Logger
    private let lock = NSLock()
    private var vms: [String: ManagedVM] = [:]
    /// Ids in the order the VMs were created, so that listings are stable.
    private var order: [String] = []
    /// Memory promised to VMs being booted, which are not in `vms` yet.
    private var reserved: UInt64 = 0
    private(set) var startedTotal = 0
    private(set) var startFailuresTotal = 0
    /// How incoming migrations ended.
    let arrivals = ArrivalLog()

    public init(memoryBudget: UInt64, memoryBacking: GuestMemory.Backing = .sharedMemory, logger: Logger) {
        self.memoryBudget = memoryBudget
        self.memoryBacking = memoryBacking
        self.logger = logger
    }

    /// `[a-z0-9][a-z0-9_-]{0,62}`: safe in a URL path, a file name and a Prometheus label without escaping.
    static func isValidID(_ id: String) -> Bool {
        let bytes = Array(id.utf8)
        func allowed(_ byte: UInt8, first: Bool) -> Bool {
            (byte >= 0x61 && byte <= 0x7A) || (byte >= 0x30 && byte <= 0x39) || (!first && (byte == 0x2D || byte == 0x5F))
        }
        return (1 ... 63).contains(bytes.count) && bytes.enumerated().allSatisfy { allowed($1, first: $0 == 0) }
    }

    // MARK: start

    /// Boots a guest as `request` asks and starts it.
    public func create(_ request: VMCreateRequest) throws(ControlError) -> ManagedVM {
        let id = try validate(request)
        let memory = request.memoryMib << 20
        try reserve(id: id, memory: memory)
        var consoleFD: Int32?
        do throws(ControlError) {
            let image = try readImage(request.image)
            if let path = request.consoleLog {
                let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
                guard fd >= 0 else {
                    throw ControlError.unprocessable("bad_console_log", "cannot open console log \(path): \(String(cString: strerror(errno)))")
                }
                consoleFD = fd
            }
            let configuration = MicroVMConfiguration(
                memorySize: memory, vcpuCount: request.vcpus,
                dirtyTracking: request.dirtyTracking == .ring ? .defaultRing : .bitmap,
                console: SerialConsole(output: consoleFD), memoryBacking: memoryBacking)
            let machine: MicroVM
            do {
                machine = try MicroVM(booting: image, commandLine: request.cmdline, configuration: configuration)
            } catch let error as PVHLoadError {
                throw ControlError.unprocessable("bad_image", "\(request.image) is not a bootable PVH image: \(error)")
            } catch {
                throw ControlError(500, "vm_create_failed", "cannot create the VM: \(error)")
            }
            let vm = ManagedVM(id: id, request: request, machine: machine, consoleFD: consoleFD)
            register(vm, reservedMemory: memory)
            machine.start()
            logger.info("started VM", metadata: ["vm": "\(id)", "memory_mib": "\(request.memoryMib)", "vcpus": "\(request.vcpus)"])
            return vm
        } catch {
            if let consoleFD { close(consoleFD) }
            release(reservation: memory, failed: true)
            logger.warning("VM did not start", metadata: ["vm": "\(id)", "error": "\(error)"])
            throw error
        }
    }

    /// Takes in a VM that was built elsewhere and is already running: one restored from a snapshot, or one that
    /// arrived by migration into memory reserved for it (`reserved`, see `reserveArrival`).
    /// It keeps the id it had at the source when that id is valid and free here, and gets a new one otherwise.
    public func adopt(_ machine: MicroVM, as request: VMCreateRequest, reserved: Bool = false) throws(ControlError) -> ManagedVM {
        var id = request.id ?? Self.makeID()
        if !Self.isValidID(id) || (try? vm(id)) != nil {
            let fresh = Self.makeID()
            logger.notice("arriving VM renamed", metadata: ["vm": "\(fresh)", "source_id": "\(id)"])
            id = fresh
        }
        if !reserved { try reserve(id: id, memory: machine.memory.size, overcommitAllowed: true) }
        var request = request
        request.id = id
        let vm = ManagedVM(id: id, request: request, machine: machine, consoleFD: nil)
        register(vm, reservedMemory: machine.memory.size)
        logger.info("adopted VM", metadata: ["vm": "\(id)", "memory_mib": "\(request.memoryMib)"])
        return vm
    }

    // MARK: arrivals

    public func reserveArrival(memory: UInt64) throws(ControlError) {
        reapStopped()
        lock.lock()
        defer { lock.unlock() }
        if let message = budgetProblemLocked(memory) { throw .conflict("memory_does_not_fit", "an arriving VM of \(message)") }
        reserved += memory
    }

    public func cancelArrival(memory: UInt64) { release(reservation: memory, failed: false) }

    public func adoptArrival(_ vm: IncomingVM) throws(ControlError) -> String {
        let managed = try adopt(vm.machine, as: vm.configuration, reserved: true)
        lock.withLock { managed.arrival = (vm.peer, ObjectIdentifier(vm.machine)) }
        return managed.id
    }

    public func endArrival(id: String, machine: MicroVM, failure: String?) {
        guard let vm = try? vm(id) else { return } // deleted meanwhile
        lock.lock()
        guard vm.arrival?.machine == ObjectIdentifier(machine) else {
            lock.unlock()
            return
        }
        vm.arrival = nil
        vm.arrivalPause = nil
        // Stopped in the same step as the mark goes: nobody may see it running, arrived, with pages missing.
        let taken = failure.flatMap { take(vm, .failed, $0) }
        lock.unlock()
        if let (machine, fd) = taken {
            Self.dispose(machine, consoleFD: fd)
            logger.error("arrived VM stopped: its migration failed after it had started here", metadata: ["vm": "\(id)", "reason": "\(failure ?? "")"])
        }
    }

    public func notePostCopyPause(id: String, machine: MicroVM, _ pause: PostCopyPause?) {
        guard let vm = try? vm(id) else { return } // deleted meanwhile
        let until = pause.map { DispatchTime.now().uptimeNanoseconds + UInt64(max(0, $0.waitSecondsLeft) * 1e9) }
        lock.withLock {
            guard vm.arrival?.machine == ObjectIdentifier(machine) else { return }
            vm.arrivalPause = pause.map { ($0.reason, until!) }
        }
    }

    /// 409 `vm_arriving` while the migration that brought the VM has not ended: in post-copy its memory still lacks
    /// pages, which reading it (for a migration or a snapshot) would take for holes, and the dirty log does not see
    /// them come.
    public func checkArrived(_ id: String) throws(ControlError) {
        let vm = try vm(id)
        guard let peer = lock.withLock({ vm.final == nil ? vm.arrival?.peer : nil }) else { return }
        throw .conflict("vm_arriving", "VM '\(id)' is still arriving from \(peer): its migration has not ended (in post-copy, pages are "
            + "still coming); try again once `arriving_from` is gone from its status")
    }

    public func recordArrival(_ record: IncomingMigrationRecord) { arrivals.record(record) }

    /// The checks that need no KVM; returns the VM's id.
    private func validate(_ request: VMCreateRequest) throws(ControlError) -> String {
        let id = request.id ?? Self.makeID()
        guard Self.isValidID(id) else { throw .badRequest("id '\(id)' must match [a-z0-9][a-z0-9_-]{0,62}") }
        // The daemon's working directory is no business of the client's: paths are absolute.
        guard request.image.hasPrefix("/") else { throw .badRequest("image must be an absolute path, not '\(request.image)'") }
        if let log = request.consoleLog, !log.hasPrefix("/") { throw .badRequest("console_log must be an absolute path, not '\(log)'") }
        guard (1 ... MicroVM.maximumVCPUs).contains(request.vcpus) else {
            throw .unprocessable("invalid_vcpus", "vcpus must be in 1...\(MicroVM.maximumVCPUs), not \(request.vcpus)")
        }
        guard request.memoryMib <= GuestMemory.maximumSize >> 20 else {
            throw .unprocessable("invalid_memory", "memory_mib \(request.memoryMib) exceeds the maximum of \(GuestMemory.maximumSize >> 20)")
        }
        do { try GuestMemory.validate(size: request.memoryMib << 20) } catch {
            throw .unprocessable("invalid_memory", "memory_mib \(request.memoryMib): \(error)")
        }
        guard request.cmdline.utf8.count < 1024 else { throw .unprocessable("invalid_cmdline", "cmdline is longer than 1023 bytes") }
        return id
    }

    private func readImage(_ path: String) throws(ControlError) -> [UInt8] {
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw .unprocessable("image_not_found", "image \(path): \(String(cString: strerror(errno)))")
        }
        guard info.st_mode & S_IFMT == S_IFREG else { throw .unprocessable("image_not_found", "image \(path) is not a regular file") }
        // Guest images are a few MiB; a huge file here is a mistake, not a guest.
        guard info.st_size <= 256 << 20 else { throw .unprocessable("bad_image", "image \(path) is larger than 256 MiB") }
        do {
            return Array(try Data(contentsOf: URL(fileURLWithPath: path)))
        } catch {
            throw .unprocessable("image_not_found", "cannot read image \(path): \(error.localizedDescription)")
        }
    }

    private static func makeID() -> String {
        "vm-" + String(UInt32.random(in: 0 ... .max), radix: 16).leftPadded(to: 8)
    }

    // MARK: bookkeeping

    /// Memory held by VMs and by boots under way.
    private var committedLocked: UInt64 {
        vms.values.reduce(reserved) { $0 + ($1.machine == nil ? 0 : $1.request.memoryMib << 20) }
    }

    /// An arriving VM's memory already exists, so it is taken in even past the budget, with a warning.
    private func reserve(id: String, memory: UInt64, overcommitAllowed: Bool = false) throws(ControlError) {
        reapStopped()
        lock.lock()
        defer { lock.unlock() }
        guard vms[id] == nil else { throw .conflict("vm_exists", "a VM with id '\(id)' exists; delete it first") }
        if let message = budgetProblemLocked(memory) {
            guard overcommitAllowed else { throw .conflict("memory_does_not_fit", message) }
            logger.warning("over the memory budget", metadata: ["vm": "\(id)", "detail": "\(message)"])
        }
        reserved += memory
    }

    /// Refuses `memory` when the budget cannot hold it now: for work that is about to build a VM of that size
    /// from elsewhere, such as a snapshot restore, and had better not start.
    public func checkFits(memory: UInt64) throws(ControlError) {
        reapStopped()
        lock.lock()
        defer { lock.unlock() }
        if let message = budgetProblemLocked(memory) { throw .conflict("memory_does_not_fit", message) }
    }

    /// Why `memory` does not fit in the budget, or nil when it does. Call with the lock held.
    private func budgetProblemLocked(_ memory: UInt64) -> String? {
        let committed = committedLocked
        guard committed + memory > memoryBudget else { return nil }
        return "\(memory >> 20) MiB does not fit: \((memoryBudget - min(committed, memoryBudget)) >> 20) MiB of the daemon's \(memoryBudget >> 20) MiB budget are free"
    }

    private func register(_ vm: ManagedVM, reservedMemory: UInt64) {
        lock.lock()
        defer { lock.unlock() }
        reserved -= reservedMemory
        vms[vm.id] = vm
        order.append(vm.id)
        startedTotal += 1
    }

    private func release(reservation: UInt64, failed: Bool) {
        lock.lock()
        defer { lock.unlock() }
        reserved -= reservation
        if failed { startFailuresTotal += 1 }
    }

    /// Releases the MicroVM of every VM whose guest stopped by itself, so its RAM goes back to the host.
    /// Called on every observation and by the daemon's periodic sweep.
    public func reapStopped() {
        var released: [(MicroVM, Int32?)] = []
        lock.lock()
        for vm in vms.values {
            guard let machine = vm.machine, let stop = machine.stopped else { continue }
            switch stop {
            case .guestExit(let code): vm.final = vm.finalAccount(.exited, stop.description, exitCode: Int(code))
            case .failed: vm.final = vm.finalAccount(.failed, stop.description)
            case .requested: vm.final = vm.finalAccount(.stopped, stop.description)
            }
            released.append((machine, vm.consoleFD))
            vm.machine = nil
            vm.consoleFD = nil
            logger.info("VM stopped", metadata: ["vm": "\(vm.id)", "reason": "\(stop)"])
        }
        lock.unlock()
        // Callers include async request handlers: the joining of vCPU threads happens off their threads.
        for (machine, fd) in released { DispatchQueue.global().async { Self.dispose(machine, consoleFD: fd) } }
    }

    /// Joins the vCPU threads (which may take a moment) and closes the console log only after them, since they
    /// write to it.
    private static func dispose(_ machine: MicroVM, consoleFD: Int32?) {
        machine.stop()
        if let consoleFD { close(consoleFD) }
    }

    // MARK: queries

    public func vm(_ id: String) throws(ControlError) -> ManagedVM {
        reapStopped()
        lock.lock()
        defer { lock.unlock() }
        guard let vm = vms[id] else { throw .vmNotFound(id) }
        return vm
    }

    public func list() -> [ManagedVM] {
        reapStopped()
        lock.lock()
        defer { lock.unlock() }
        return order.compactMap { vms[$0] }
    }

    public func info(_ vm: ManagedVM) -> VMInfo {
        lock.lock()
        let machine = vm.machine
        let final = vm.final
        let paused = vm.paused
        let inDoubt = final == nil ? vm.inDoubt : nil
        let arrivingFrom = final == nil ? vm.arrival?.peer : nil
        let pause = final == nil ? vm.arrivalPause : nil
        lock.unlock()
        let now = DispatchTime.now().uptimeNanoseconds
        let postcopyPause = pause.map { PostCopyPause(reason: $0.reason, waitSecondsLeft: Double($0.until > now ? $0.until - now : 0) / 1e9) }
        let lines = machine?.console.receivedLines
        return VMInfo(
            id: vm.id, state: final?.state ?? (paused ? .paused : .running), image: vm.request.image, memoryMib: vm.request.memoryMib,
            vcpus: vm.request.vcpus, cmdline: vm.request.cmdline, consoleLog: vm.request.consoleLog,
            dirtyTracking: vm.request.dirtyTracking, memoryBacking: vm.memoryBacking.rawValue, startedAt: ISO8601DateFormatter().string(from: vm.startedAt),
            uptimeSeconds: final?.uptime ?? vm.uptime, stopReason: final?.reason, exitCode: final?.exitCode,
            consoleLines: final?.consoleLines ?? machine?.console.lineCount ?? 0,
            lastConsoleLine: final?.lastConsoleLine ?? lines?.last, inDoubt: inDoubt, arrivingFrom: arrivingFrom,
            postcopyPause: postcopyPause)
    }

    /// The running MicroVM of a VM, for a migration; 409 when it is not running.
    public func runningMachine(_ id: String) throws(ControlError) -> MicroVM {
        let vm = try vm(id)
        lock.lock()
        defer { lock.unlock() }
        guard let machine = vm.machine else {
            throw .conflict("vm_not_running", "VM '\(id)' is \(vm.final?.state.rawValue ?? "not running")")
        }
        return machine
    }

    /// Whether the VM was paused through the API.
    public func isPaused(_ id: String) throws(ControlError) -> Bool {
        let vm = try vm(id)
        return lock.withLock { vm.paused }
    }

    /// Pauses or resumes a running VM's vCPUs; doing it twice changes nothing. A VM in doubt (`markInDoubt`) is
    /// resumed only with `force`: the caller has made sure that the guest does not run at the destination.
    public func setPaused(_ id: String, _ paused: Bool, force: Bool = false) throws(ControlError) -> ManagedVM {
        let machine = try runningMachine(id)
        let vm = try vm(id)
        if paused {
            do { try machine.pause() } catch { throw ControlError(500, "pause_failed", "cannot pause VM '\(id)': \(error)") }
            lock.withLock { vm.paused = true }
            logger.info("VM paused", metadata: ["vm": "\(id)"])
            return vm
        }
        lock.lock()
        let wasInDoubt = vm.inDoubt
        if wasInDoubt != nil && force { vm.inDoubt = nil }
        lock.unlock()
        if let wasInDoubt, !force { throw Self.inDoubtRefusal(id, wasInDoubt) }
        machine.resume()
        lock.withLock { vm.paused = false }
        if let wasInDoubt {
            logger.warning("VM in doubt resumed with force: the operator found it not running at the destination",
                           metadata: ["vm": "\(id)", "peer": "\(wasInDoubt.peer)"])
        } else {
            logger.info("VM resumed", metadata: ["vm": "\(id)"])
        }
        return vm
    }

    /// The answer to a plain resume of a VM in doubt: what the operator must find out first, and how to go on.
    static func inDoubtRefusal(_ id: String, _ inDoubt: MigrationInDoubt) -> ControlError {
        .conflict("migration_in_doubt", "VM '\(id)' may run at \(inDoubt.peer): its migration committed the switchover and the "
            + "destination did not confirm that it started. Ask the destination daemon whether it runs VM '\(id)' there: if it "
            + "does, delete it here; if it does not, resume it here with force ({\"force\": true}, migratectl vm resume \(id) --force)")
    }

    /// Leaves a VM paused, in doubt, after its migration committed the switchover and the destination did not
    /// confirm that it started. Its vCPUs are paused already (by the migration); it keeps its memory, since it may
    /// be the only copy of the guest.
    public func markInDoubt(_ id: String, _ inDoubt: MigrationInDoubt) {
        guard let vm = try? vm(id) else { return }
        let running = lock.withLock {
            guard vm.machine != nil else { return false }
            vm.paused = true
            vm.inDoubt = inDoubt
            return true
        }
        guard running else { return }
        logger.error("VM left paused, in doubt: check the destination, then delete it here or resume it with force",
                     metadata: ["vm": "\(id)", "peer": "\(inDoubt.peer)"])
    }

    // MARK: stop and delete

    /// Stops a VM and releases its memory; stopping a stopped VM changes nothing.
    @discardableResult
    public func stop(_ id: String, reason: VMState = .stopped, because why: String = "stopped on request") throws(ControlError) -> ManagedVM {
        let vm = try vm(id)
        let taken = lock.withLock { take(vm, reason, why) }
        if let (machine, fd) = taken {
            Self.dispose(machine, consoleFD: fd)
            logger.info("VM stopped", metadata: ["vm": "\(id)", "reason": "\(why)"])
        }
        return vm
    }

    /// Records a running VM's final account and takes its machine and console log from it, for `dispose`; nil when it
    /// has stopped already. Call with the lock held.
    private func take(_ vm: ManagedVM, _ reason: VMState, _ why: String) -> (MicroVM, Int32?)? {
        guard let machine = vm.machine else { return nil }
        vm.final = vm.finalAccount(reason, why)
        vm.machine = nil
        defer { vm.consoleFD = nil }
        return (machine, vm.consoleFD)
    }

    /// Stops a VM if it runs, and forgets it.
    public func delete(_ id: String) throws(ControlError) -> ManagedVM {
        let vm = try stop(id)
        lock.lock()
        vms[id] = nil
        order.removeAll { $0 == id }
        lock.unlock()
        logger.info("VM deleted", metadata: ["vm": "\(id)"])
        return vm
    }

    /// Stops every VM, for the daemon's shutdown.
    public func stopAll() {
        for vm in list() { _ = try? stop(vm.id, because: "the daemon shut down") }
    }

    // MARK: metrics

    struct Snapshot {
        var byState: [VMState: Int]
        var running: [(id: String, memory: UInt64, vcpus: Int, uptime: Double)]
        var committedMemory: UInt64
        var startedTotal: Int
        var startFailuresTotal: Int
    }

    func snapshot() -> Snapshot {
        reapStopped()
        lock.lock()
        defer { lock.unlock() }
        var byState = Dictionary(uniqueKeysWithValues: VMState.allCases.map { ($0, 0) })
        var running: [(String, UInt64, Int, Double)] = []
        for id in order {
            guard let vm = vms[id] else { continue }
            byState[vm.final?.state ?? .running, default: 0] += 1
            if vm.machine != nil { running.append((id, vm.request.memoryMib << 20, vm.request.vcpus, vm.uptime)) }
        }
        return Snapshot(byState: byState, running: running, committedMemory: committedLocked,
                        startedTotal: startedTotal, startFailuresTotal: startFailuresTotal)
    }
}

private extension String {
    func leftPadded(to width: Int) -> String { String(repeating: "0", count: max(0, width - count)) + self }
}

extension VMManager: ArrivalDesk {}
