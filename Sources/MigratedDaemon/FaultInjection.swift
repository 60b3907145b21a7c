import Glibc
import Logging

/// Test hooks of the receiving daemon: the daemon dies at an exact point of an incoming switchover, as a daemon
/// killed there would, so that tests and `bench/reliability` can reach the moments a random kill almost never
/// hits. Armed by the environment variable `MIGRATED_FAULT_INJECT`, read once when the daemon starts; unset, the
/// daemon has no fault. Not for production: the daemon logs a warning when one is armed. control-api.md §3.7.
public enum FaultInjection: String, Sendable, CaseIterable {
    /// Dies after the memory digest checked out and the device state was restored, before answering VERIFIED:
    /// a destination lost during the switchover, before the commit. The source must resume.
    case exitBeforeVerified = "exit-before-verified"
    /// Dies on reading COMMIT, before starting the guest and answering STARTED: the source cannot know whether the
    /// guest runs here, so it stays paused, in doubt.
    case exitAfterCommit = "exit-after-commit"
    /// Starts the guest on COMMIT, then closes the migration's connections instead of answering STARTED: the guest
    /// runs here while the source, never told, is left in doubt (the case where the operator deletes the source).
    case closeBeforeStarted = "close-before-started"

    public static let environmentVariable = "MIGRATED_FAULT_INJECT"

    /// The fault the environment arms; nil when the variable is unset or empty, an error naming the known faults
    /// when it names none of them.
    public static func fromEnvironment(_ environment: [String: String]) throws(ConfigurationError) -> FaultInjection? {
        guard let value = environment[environmentVariable], !value.isEmpty else { return nil }
        guard let fault = FaultInjection(rawValue: value) else {
            throw ConfigurationError("\(environmentVariable)=\(value) is not a fault; known: \(allCases.map(\.rawValue).joined(separator: ", "))")
        }
        return fault
    }

    /// Ends the process at once, as SIGKILL would: no cleanup, no shutdown of VMs, sockets closed by the kernel.
    func strike(_ logger: Logger) -> Never {
        logger.critical("fault injection: exiting now", metadata: ["fault": "\(rawValue)"])
        _exit(86)
    }
}
