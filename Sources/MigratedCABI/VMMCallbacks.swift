import CMigratedABI
import Synchronization

/// The VMM's callbacks (`struct migrated_vm_callbacks`), called as Swift functions that throw when the VMM says
/// no. Each failure is remembered, so that an error the engine wraps in its own can still be reported as the
/// VMM's (MIGRATED_ERR_CALLBACK).
final class VMMCallbacks: Sendable {
    // The structure holds function pointers and the VMM's opaque pointer, which the VMM promises to keep valid
    // as long as the handle; the engine calls them one at a time per handle.
    nonisolated(unsafe) let table: migrated_vm_callbacks
    private let failures = Atomic<Int>(0)

    init(_ table: migrated_vm_callbacks) { self.table = table }

    /// How many callbacks have failed so far; compare before and after an operation.
    var failureCount: Int { failures.load(ordering: .relaxed) }

    private func check(_ name: String, _ status: Int32) throws {
        guard status == 0 else {
            failures.add(1, ordering: .relaxed)
            throw CABIError.callback(name, status)
        }
    }

    private func function<F>(_ function: F?, _ name: String) throws -> F {
        guard let function else { throw CABIError.invalid("the \(name) callback is NULL, and this operation needs it") }
        return function
    }

    /// Fails with the names of the callbacks in `names` that are NULL.
    func require(_ names: [(String, Bool)]) throws {
        let missing = names.filter { !$0.1 }.map(\.0)
        guard missing.isEmpty else { throw CABIError.invalid("callbacks missing: \(missing.joined(separator: ", "))") }
    }

    func pause() throws { try check("pause", try function(table.pause, "pause")(table.opaque)) }
    func resume() throws { try check("resume", try function(table.resume, "resume")(table.opaque)) }

    func setThrottle(_ fraction: Double) throws {
        guard let setThrottle = table.set_throttle else { return }
        try check("set_throttle", setThrottle(table.opaque, fraction))
    }

    func saveDevices(into list: DeviceList) throws {
        guard let save = table.save_devices else { return }
        try withExtendedLifetime(list) {
            try check("save_devices", save(table.opaque, OpaquePointer(Unmanaged.passUnretained(list).toOpaque())))
        }
    }

    func dirtyStart() throws { try check("dirty_start", try function(table.dirty_start, "dirty_start")(table.opaque)) }
    func dirtyStop() throws { try check("dirty_stop", try function(table.dirty_stop, "dirty_stop")(table.opaque)) }

    func dirtyHarvest(region: Int, into words: UnsafeMutableBufferPointer<UInt64>) throws {
        let harvest = try function(table.dirty_harvest, "dirty_harvest")
        try check("dirty_harvest", harvest(table.opaque, UInt32(region), words.baseAddress, words.count))
    }

    func prepareMemory(_ regions: UnsafeMutableBufferPointer<migrated_region>) throws {
        let prepare = try function(table.prepare_memory, "prepare_memory")
        try check("prepare_memory", prepare(table.opaque, regions.baseAddress, UInt32(regions.count)))
    }

    func restoreDevices(_ blobs: UnsafeBufferPointer<migrated_device_blob>) throws {
        guard let restore = table.restore_devices else {
            guard blobs.isEmpty else {
                throw CABIError(MIGRATED_ERR_PROTOCOL, "the stream carries \(blobs.count) device blobs for the VMM, which has no restore_devices callback")
            }
            return
        }
        try check("restore_devices", restore(table.opaque, blobs.baseAddress, blobs.count))
    }

    func start() throws { try check("start", try function(table.start, "start")(table.opaque)) }

    func discard() { table.discard?(table.opaque) }
}
