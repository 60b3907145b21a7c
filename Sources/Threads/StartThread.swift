import Foundation

/// Starts a named thread that runs `body` once, with a stack of `stackSize` bytes if given (Foundation's default
/// otherwise).
///
/// `body` is `sending`: the compiler proves that the caller keeps no reference to anything the closure captures
/// that is not `Sendable`, so values made for the thread (an encoder's buffers, a channel's writer) move to it
/// without a lock and without being declared thread-safe. Shared objects still have to be `Sendable` to be
/// captured.
public func startThread(named name: String, stackSize: Int? = nil, _ body: sending @escaping () -> Void) {
    let handed = Handed(body: body)
    let thread = Thread { handed.body() }
    thread.name = name
    if let stackSize { thread.stackSize = stackSize }
    thread.start()
}

/// Carries the closure into `Thread`'s `@Sendable` block. Safe because `startThread` took the closure as
/// `sending`: no other reference to its non-Sendable captures survives in the caller.
private struct Handed: @unchecked Sendable {
    let body: () -> Void
}
