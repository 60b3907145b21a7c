import Glibc

/// A failed system call: what was attempted, and the errno it returned.
public struct SystemError: Error, CustomStringConvertible, Equatable, Sendable {
    public let operation: String
    public let errno: Int32

    public init(_ operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String {
        "\(operation) failed: \(String(cString: strerror(errno))) (errno \(errno))"
    }
}

/// Runs a system call that returns -1 and sets errno on failure, retrying it when a signal interrupted it.
/// Every system call of the project goes through here or through `systemCallOnce`, so EINTR is handled in one place.
@inline(__always) @discardableResult
public func systemCall<R: BinaryInteger>(_ operation: @autoclosure () -> String, _ call: () -> R) throws -> R {
    while true {
        let result = call()
        if result != -1 { return result }
        let code = Glibc.errno
        if code == EINTR { continue }
        throw SystemError(operation(), errno: code)
    }
}

/// Runs a system call once. An interruption is reported as `SystemError` with errno EINTR, for the few
/// callers to whom it means something (a vCPU's KVM_RUN is interrupted on purpose to pause it).
@inline(__always) @discardableResult
public func systemCallOnce<R: BinaryInteger>(_ operation: @autoclosure () -> String, _ call: () -> R) throws -> R {
    let result = call()
    if result == -1 { throw SystemError(operation(), errno: Glibc.errno) }
    return result
}
