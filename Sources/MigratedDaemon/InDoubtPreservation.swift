import Foundation
import KVMMigration
import Snapshots

extension ControlAPI {
    /// Saves every VM that a migration left in doubt (control-api.md §3.7) to a full snapshot in `directory`, before
    /// the daemon's shutdown stops it: its guest may run nowhere else, and an operator who finds that it does not run
    /// at the destination restores it from the file (`vmsnap restore FILE --into-daemon`). Blocks until every save
    /// has ended; a VM that cannot be saved is named in the log as lost unless it runs at its peer.
    func preserveVMsInDoubt(in directory: String) {
        for vm in vms.list() {
            guard let inDoubt = vms.info(vm).inDoubt, let machine = try? vms.runningMachine(vm.id) else { continue }
            let stamp = ISO8601DateFormatter().string(from: Date()).replacingOccurrences(of: ":", with: "")
            let path = "\(directory)/\(vm.id)-\(stamp).snap"
            do {
                try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
                let source = ConfiguredGuestSource(MicroVMGuestSource(machine: machine), configuration: vm.request)
                // Paused as it is: written once, in order, and left paused for the shutdown to stop.
                let options = SnapshotSaveOptions(live: false, keepTracking: false, resumeGuest: false)
                let report = try SnapshotSaver(source: source, path: path, options: options).run()
                logger.critical("saved a VM in doubt before stopping it: if it does not run at its peer, restore it from the file",
                                metadata: ["vm": "\(vm.id)", "peer": "\(inDoubt.peer)", "path": "\(report.path)"])
            } catch {
                logger.critical("could not save a VM in doubt before stopping it: if it does not run at its peer, it is lost",
                                metadata: ["vm": "\(vm.id)", "peer": "\(inDoubt.peer)", "error": "\(error)"])
            }
        }
    }
}
