import CMigratedABI
import MigrationEngine
import Snapshots

/// Saves a VMM's guest to a snapshot file (`migrated_snapshot_save`).
func saveSnapshot(_ vm: EmbeddedVM, path: String, options: migrated_snapshot_options) throws -> migrated_report {
    try requireABIVersion(options.abi_version, in: "migrated_snapshot_options")
    let known = MIGRATED_SNAPSHOT_PAUSED | MIGRATED_SNAPSHOT_COMPRESSED | MIGRATED_SNAPSHOT_DIFF | MIGRATED_SNAPSHOT_OVERWRITE | MIGRATED_SNAPSHOT_LEAVE_PAUSED
    guard options.flags & ~known == 0, options.reserved == 0 else { throw CABIError.invalid("unknown flags 0x\(String(options.flags, radix: 16)) or reserved field set") }
    func flag(_ bit: UInt32) -> Bool { options.flags & bit != 0 }
    return try vm.exclusively("a snapshot save") {
        let base = vm.snapshotBase
        if flag(MIGRATED_SNAPSHOT_DIFF), base == nil {
            throw CABIError.state("a diff snapshot needs a base: save a snapshot through this handle first")
        }
        var settings = SnapshotSaveOptions(live: !flag(MIGRATED_SNAPSHOT_PAUSED), keepTracking: true, resumeGuest: !flag(MIGRATED_SNAPSHOT_LEAVE_PAUSED),
                                           memoryFormat: flag(MIGRATED_SNAPSHOT_COMPRESSED) ? .compressed : .plain,
                                           overwrite: flag(MIGRATED_SNAPSHOT_OVERWRITE))
        if options.downtime_limit_ms != 0 { settings.precopy.downtimeLimit = Double(options.downtime_limit_ms) / 1000 }
        let saver = SnapshotSaver(source: try VMMGuestSource(vm), path: path, base: flag(MIGRATED_SNAPSHOT_DIFF) ? base : nil, options: settings)
        let progress = ProgressReporter(options.progress, options.progress_opaque)
        saver.onProgress = { progress.report($0) }
        let failuresBefore = vm.callbacks.failureCount
        do {
            let report = try saver.run()
            // The tracking kept on makes this file the base of the next diff.
            vm.snapshotBase = report.base
            let pages = report.passes.reduce(0) { $0 + $1.pagesSent }
            return migrated_report(error: nil, total: report.totalSeconds, setup: 0, downtime: report.pauseSeconds, wireBytes: 0,
                                   pages: pages, passes: report.passes.count, channels: 0, digest: hex(report.header.memoryDigest))
        } catch {
            throw CABIError(classifying: error, callbackFailed: vm.callbacks.failureCount > failuresBefore)
        }
    }
}

/// Restores a snapshot chain eagerly into a VMM's guest and starts it (`migrated_snapshot_restore`).
func restoreSnapshot(_ vm: EmbeddedVM, path: String) throws -> migrated_report {
    try vm.exclusively("a snapshot restore") {
        if (try? vm.memory()) != nil { throw CABIError.state("the handle holds a guest already; restore into a handle made without regions") }
        let sink = try VMMGuestSink(vm)
        let failuresBefore = vm.callbacks.failureCount
        do {
            let chain = try SnapshotChain.open(path)
            let report: RestoreReport
            do {
                report = try SnapshotRestore.restore(chain, into: sink)
                try sink.start()
            } catch {
                sink.discard()
                throw error
            }
            return migrated_report(error: nil, total: report.secondsToReady, setup: 0, downtime: nil, wireBytes: 0, pages: report.dataPages,
                                   passes: 0, channels: 0, digest: hex(chain.top.header.memoryDigest))
        } catch {
            throw CABIError(classifying: error, callbackFailed: vm.callbacks.failureCount > failuresBefore)
        }
    }
}

/// Runs a blocking call that produces a report: the report goes to `out` (when given) whether it succeeded or not.
private func reporting(_ out: UnsafeMutablePointer<migrated_report>?, _ body: () throws -> migrated_report) -> Int32 {
    var failure: CABIError?
    let status = boundary {
        do { out?.pointee = try body() } catch {
            failure = CABIError(classifying: error)
            throw error
        }
    }
    if let out, let failure {
        out.pointee = migrated_report(error: failure, total: 0, setup: 0, downtime: nil, wireBytes: 0, pages: 0, passes: 0, channels: 0, digest: "")
    }
    return status
}

@_cdecl("migrated_snapshot_save")
public func migrated_snapshot_save(_ vm: OpaquePointer?, _ path: UnsafePointer<CChar>?, _ options: UnsafePointer<migrated_snapshot_options>?,
                                   _ report: UnsafeMutablePointer<migrated_report>?) -> Int32 {
    reporting(report) {
        try saveSnapshot(try object(vm, as: EmbeddedVM.self, "vm"), path: try string(path, "path"), options: try required(options, "options").pointee)
    }
}

@_cdecl("migrated_snapshot_restore")
public func migrated_snapshot_restore(_ vm: OpaquePointer?, _ path: UnsafePointer<CChar>?, _ report: UnsafeMutablePointer<migrated_report>?) -> Int32 {
    reporting(report) {
        try restoreSnapshot(try object(vm, as: EmbeddedVM.self, "vm"), path: try string(path, "path"))
    }
}
