import CMigratedABI
import Glibc
import LinuxSystem
import MigrationEngine
import Snapshots
import Transport

// The boundary between C callers and the Swift engine. Every exported function runs its body through
// `boundary`, which turns whatever the body throws into an error code and a thread-local message: no Swift error
// crosses into C. Preconditions that would trap in Swift (a NULL pointer, a size that does not fit) are checked
// here first and become MIGRATED_ERR_INVALID_ARGUMENT.

/// An error with the code it has in the C API.
struct CABIError: Error, CustomStringConvertible {
    let code: migrated_error
    let description: String

    init(_ code: migrated_error, _ description: String) {
        self.code = code
        self.description = description
    }

    static func invalid(_ description: String) -> CABIError { CABIError(MIGRATED_ERR_INVALID_ARGUMENT, description) }
    static func state(_ description: String) -> CABIError { CABIError(MIGRATED_ERR_STATE, description) }

    /// A callback of the VMM returned `status`.
    static func callback(_ name: String, _ status: Int32) -> CABIError {
        CABIError(MIGRATED_ERR_CALLBACK, "the VMM's \(name) callback returned \(status)")
    }

    /// The code and words for anything the engine throws. The engine wraps what the guest seams throw in its own
    /// errors (`MigrationError.guestFailed`, `SnapshotError.guest`); `callbackFailed` says whether one of the
    /// VMM's callbacks was the cause, so the code can say so.
    init(classifying error: Error, callbackFailed: Bool = false) {
        switch error {
        case let error as CABIError:
            self = error
        case let error as MigrationError:
            self.init(Self.code(of: error, callbackFailed: callbackFailed), "\(error)")
        case let error as TransportError:
            self.init(MIGRATED_ERR_TRANSPORT, "\(error)")
        case let error as SnapshotError:
            self.init(Self.code(of: error, callbackFailed: callbackFailed), "\(error)")
        case let error as SystemError:
            self.init(MIGRATED_ERR_SYSTEM, "\(error)")
        default:
            self.init(MIGRATED_ERR_SYSTEM, "\(error)")
        }
    }

    private static func code(of error: MigrationError, callbackFailed: Bool) -> migrated_error {
        switch error {
        case .channel: MIGRATED_ERR_TRANSPORT
        case .malformedStream, .protocolViolation, .peerAborted: MIGRATED_ERR_PROTOCOL
        case .cancelled: MIGRATED_ERR_CANCELLED
        case .didNotConverge: MIGRATED_ERR_NOT_CONVERGED
        case .digestMismatch: MIGRATED_ERR_VERIFY
        case .guestFailed: callbackFailed ? MIGRATED_ERR_CALLBACK : MIGRATED_ERR_SYSTEM
        }
    }

    private static func code(of error: SnapshotError, callbackFailed: Bool) -> migrated_error {
        switch error {
        case .notASnapshot, .unsupported, .truncated, .checksumMismatch, .corrupt, .chain, .digestMismatch: MIGRATED_ERR_SNAPSHOT
        case .io: MIGRATED_ERR_SYSTEM
        case .didNotConverge: MIGRATED_ERR_NOT_CONVERGED
        case .guest: callbackFailed ? MIGRATED_ERR_CALLBACK : MIGRATED_ERR_SYSTEM
        }
    }
}

/// The message of the last failing call on each thread, as a C string the thread owns until its next call.
enum LastError {
    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key) { free($0) }
        return key
    }()

    static func set(_ message: String) {
        let old = pthread_getspecific(key)
        pthread_setspecific(key, strdup(message))
        free(old)
    }

    static var current: UnsafePointer<CChar> {
        if let message = pthread_getspecific(key) { return UnsafePointer(message.assumingMemoryBound(to: CChar.self)) }
        return emptyMessage
    }

    /// Never written through nor freed: the same empty C string for every thread.
    nonisolated(unsafe) private static let emptyMessage: UnsafePointer<CChar> = UnsafePointer(strdup("")!)
}

/// Runs an exported function's body: MIGRATED_OK and an empty message when it returns, the error's code and
/// message when it throws.
func boundary(_ body: () throws -> Void) -> Int32 {
    do {
        try body()
        LastError.set("")
        return Int32(MIGRATED_OK.rawValue)
    } catch {
        let failure = CABIError(classifying: error)
        LastError.set(failure.description)
        return Int32(failure.code.rawValue)
    }
}

/// Checks the `abi_version` a caller put in a structure.
func requireABIVersion(_ version: UInt32, in structure: String) throws {
    guard version == MIGRATED_ABI_VERSION else {
        throw CABIError(MIGRATED_ERR_ABI_MISMATCH,
                        "\(structure).abi_version is \(version), but this libmigrated implements ABI version \(MIGRATED_ABI_VERSION): rebuild the VMM against this library's migrated.h")
    }
}

/// A required pointer argument, or an invalid-argument error naming it.
func required<T>(_ pointer: UnsafePointer<T>?, _ name: String) throws -> UnsafePointer<T> {
    guard let pointer else { throw CABIError.invalid("\(name) is NULL") }
    return pointer
}

func required<T>(_ pointer: UnsafeMutablePointer<T>?, _ name: String) throws -> UnsafeMutablePointer<T> {
    guard let pointer else { throw CABIError.invalid("\(name) is NULL") }
    return pointer
}

/// A C string argument, which must be NUL terminated UTF-8.
func string(_ pointer: UnsafePointer<CChar>?, _ name: String) throws -> String {
    guard let text = String(validatingCString: try required(pointer, name)) else { throw CABIError.invalid("\(name) is not UTF-8") }
    return text
}

/// Handles are Swift objects retained for C: `handle(of:)` hands one out, `object(_:)` finds it again.
func handle<T: AnyObject>(of object: T) -> OpaquePointer { OpaquePointer(Unmanaged.passRetained(object).toOpaque()) }

func object<T: AnyObject>(_ handle: OpaquePointer?, as type: T.Type, _ name: String) throws -> T {
    guard let handle else { throw CABIError.invalid("\(name) is NULL") }
    return Unmanaged<T>.fromOpaque(UnsafeRawPointer(handle)).takeUnretainedValue()
}

func release<T: AnyObject>(_ handle: OpaquePointer, as type: T.Type) {
    Unmanaged<T>.fromOpaque(UnsafeRawPointer(handle)).release()
}
