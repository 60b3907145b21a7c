import Foundation
import KVMMigration
import Logging
import MicroVM
import MigratedAPI
import MigrationEngine
import Snapshots
import Threads

/// Snapshots of the daemon's VMs: saves run on a thread of their own, one per VM at a time; restores start a
/// new VM. For each VM the service keeps what a diff needs (the last snapshot's base, with dirty tracking
/// left on) until the VM goes away or a migration takes over its dirty log.
///
/// Sendable: `jobs`, `bases`, `lazyRestores` and the counters are guarded by `lock`.
public final class SnapshotService: @unchecked Sendable {
    private let logger: Logger
    private let lock = NSLock()
    private var jobs: [String: Job] = [:]
    private var bases: [String: SnapshotBase] = [:]
    /// Lazy restores still bringing memory in; kept alive until they are done.
    private var lazyRestores: [ObjectIdentifier: LazyRestore] = [:]
    private var saved = 0, failedSaves = 0, restored = 0

    public init(logger: Logger) { self.logger = logger }

    final class Job: Sendable {
        private let current: Locked<SnapshotStatus>
        init(_ status: SnapshotStatus) { current = Locked(status) }
        var status: SnapshotStatus { current.withLock { $0 } }
        func update(_ change: (inout SnapshotStatus) -> Void) { current.withLock { change(&$0) } }
    }

    public func isSaving(vm id: String) -> Bool { lock.withLock { jobs[id]?.status.state == .running } }

    /// Forgets the base of a VM's next diff: its dirty log is someone else's now (a migration), or it is gone.
    public func forgetBase(vm id: String) { _ = lock.withLock { bases.removeValue(forKey: id) } }

    /// A VM `paused` through the API is saved as it is (no pre-copy) and stays paused.
    public func startSave(vm: ManagedVM, machine: MicroVM, request: SnapshotRequest, paused: Bool) throws(ControlError) -> SnapshotStatus {
        if let problem = request.problem() { throw .badRequest(problem) }
        let job = Job(SnapshotStatus(vm: vm.id, state: .running, path: request.path, kind: request.kind, format: request.format))
        lock.lock()
        let running = jobs[vm.id]?.status.state == .running
        let base = request.kind == .diff ? bases[vm.id] : nil
        if !running, request.kind == .full || base != nil { jobs[vm.id] = job }
        lock.unlock()
        if running { throw .conflict("snapshot_running", "VM '\(vm.id)' is already being saved") }
        if request.kind == .diff, base == nil {
            throw .conflict("no_parent", "VM '\(vm.id)' has no snapshot to build a diff on: none taken since it started or last migrated, nor (yet) the one it was restored from; take a full one first")
        }
        let options = SnapshotSaveOptions(live: request.live && !paused, resumeGuest: !paused,
                                          memoryFormat: request.format == .plain ? .plain : .compressed,
                                          compression: request.compression == .lz4 ? .lz4 : .zstd, overwrite: request.overwrite)
        let source = ConfiguredGuestSource(MicroVMGuestSource(machine: machine), configuration: vm.request)
        let saver = SnapshotSaver(source: source, path: request.path, base: base, options: options)
        saver.onProgress = { progress in
            job.update {
                $0.pagesDone = progress.pagesDone
                $0.pagesTotal = progress.pagesTotal
                $0.bytesWritten = progress.bytesOnWire
                $0.rateBytesPerSecond = progress.bandwidth
                $0.elapsedSeconds = progress.elapsed
            }
        }
        let id = vm.id
        startThread(named: "snapshot-save") { [self] in run(saver, job: job, vm: id) }
        logger.info("snapshot started", metadata: ["vm": "\(id)", "path": "\(request.path)", "kind": "\(request.kind)", "live": "\(request.live)"])
        return job.status
    }

    private func run(_ saver: SnapshotSaver, job: Job, vm id: String) {
        let started = Date()
        do {
            let report = try saver.run()
            let size = (try? FileManager.default.attributesOfItem(atPath: report.path)[.size] as? UInt64) ?? nil
            job.update {
                $0.state = .completed
                $0.pauseMs = report.pauseSeconds * 1000
                $0.snapshotId = "\(report.header.id)"
                $0.parentId = report.header.kind == .diff ? "\(report.header.parentID)" : nil
                $0.dataPages = report.header.dataPages
                $0.fileBytes = size
                $0.elapsedSeconds = report.totalSeconds
                $0.pagesDone = $0.pagesTotal
            }
            lock.withLock {
                bases[id] = report.base
                saved += 1
            }
            logger.info("snapshot saved", metadata: ["vm": "\(id)", "path": "\(report.path)", "id": "\(report.header.id)",
                                                    "pause_ms": "\(String(format: "%.1f", report.pauseSeconds * 1000))"])
        } catch {
            job.update {
                $0.state = .failed
                $0.error = "\(error)"
                $0.elapsedSeconds = Date().timeIntervalSince(started)
            }
            lock.withLock { failedSaves += 1 }
            logger.warning("snapshot failed; the VM runs on", metadata: ["vm": "\(id)", "error": "\(error)"])
        }
    }

    public func status(vm id: String) throws(ControlError) -> SnapshotStatus {
        guard let job = lock.withLock({ jobs[id] }) else { throw ControlError(404, "no_snapshot", "VM '\(id)' has not been saved") }
        return job.status
    }

    /// Builds a VM from a snapshot chain and starts it; `adopt` registers it with the daemon and returns its id.
    /// Blocks until the guest runs (an eager restore reads all of memory first).
    public func restore(_ request: RestoreRequest, vms: VMManager) throws(ControlError) -> RestoreResult {
        guard request.path.hasPrefix("/"), request.parents?.allSatisfy({ $0.hasPrefix("/") }) ?? true else {
            throw .badRequest("path and parents must be absolute paths on the daemon's host")
        }
        if let id = request.id {
            guard VMManager.isValidID(id) else { throw .badRequest("id '\(id)' must match [a-z0-9][a-z0-9_-]{0,62}") }
            if (try? vms.vm(id)) != nil { throw .conflict("vm_exists", "a VM named '\(id)' exists already") }
        }
        let started = Date()
        let chain: SnapshotChain
        do { chain = try SnapshotChain.open(request.path, parents: request.parents ?? []) } catch {
            throw .unprocessable("bad_snapshot", "\(error)")
        }
        try vms.checkFits(memory: chain.top.layout.totalBytes)
        let sink = ConfiguredGuestSink(MicroVMGuestSink(console: SerialConsole(output: nil)))
        var lazy: LazyRestore?
        do {
            if request.lazy {
                let restore = LazyRestore(chain, into: sink)
                try restore.prepare()
                lazy = restore
            } else {
                _ = try SnapshotRestore.restore(chain, into: sink)
            }
            // Every write from the guest's first instruction on is in the dirty log, so that the next snapshot of this
            // VM may be a diff on top of the chain it came from.
            try sink.base.machine?.dirtyTracker.start()
            try sink.start()
        } catch {
            sink.discard()
            throw .unprocessable("restore_failed", "\(error)")
        }
        let ready = Date().timeIntervalSince(started)
        guard let machine = sink.base.machine, var configuration = sink.configuration else {
            throw ControlError(500, "internal", "the restored guest has no machine or configuration")
        }
        if let id = request.id { configuration.id = id }
        let vm = try vms.adopt(machine, as: configuration)
        if let lazy { watch(lazy, vm: vm.id, vms: vms) }
        rememberBase(of: vm.id, restoredFrom: chain)
        lock.withLock { restored += 1 }
        logger.info("VM restored from a snapshot", metadata: ["vm": "\(vm.id)", "path": "\(request.path)", "lazy": "\(request.lazy)",
                                                            "ms_to_first_instruction": "\(String(format: "%.1f", ready * 1000))"])
        return RestoreResult(vm: vms.info(vm), lazy: request.lazy, dataPages: chain.dataPages, secondsToFirstInstruction: ready,
                             secondsToResident: request.lazy ? nil : ready)
    }

    /// Makes the chain a restored VM came from the base of its next diff: found from the files, so it holds after a
    /// daemon restart too. The chain is read on a thread of its own, while the guest runs; a diff asked for before
    /// it is done is refused (409 no_parent), and a full snapshot taken meanwhile takes precedence.
    private func rememberBase(of id: String, restoredFrom chain: SnapshotChain) {
        startThread(named: "snapshot-base") { [self] in
            do {
                let base = try SnapshotBase(restoredFrom: chain)
                lock.withLock { if bases[id] == nil { bases[id] = base } }
            } catch {
                logger.warning("the restored VM's next snapshot cannot be a diff of its chain", metadata: ["vm": "\(id)", "error": "\(error)"])
            }
        }
    }

    /// Keeps a lazy restore alive until all memory is in; a page that cannot be served stops the VM.
    private func watch(_ restore: LazyRestore, vm id: String, vms: VMManager) {
        let key = ObjectIdentifier(restore)
        lock.withLock { lazyRestores[key] = restore }
        restore.onFailure = { [logger] error in
            logger.error("lazy restore failed; stopping the VM", metadata: ["vm": "\(id)", "error": "\(error)"])
            _ = try? vms.stop(id, reason: .failed, because: "lazy restore: \(error)")
        }
        startThread(named: "snapshot-resident") { [self] in
            do {
                let report = try restore.waitUntilResident()
                logger.info("restored VM's memory is resident", metadata: ["vm": "\(id)", "faults_served": "\(report.faultsServed)",
                                                                         "seconds": "\(String(format: "%.3f", report.secondsToResident ?? 0))"])
            } catch {
                // Also covers a failure before `onFailure` was set.
                _ = try? vms.stop(id, reason: .failed, because: "lazy restore: \(error)")
            }
            _ = lock.withLock { lazyRestores.removeValue(forKey: key) }
        }
    }

    func counters() -> (saved: Int, failed: Int, restored: Int) { lock.withLock { (saved, failedSaves, restored) } }
}
