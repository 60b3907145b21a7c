import Glibc

/// A value shared between threads, reachable only while its lock is held: the contract of Synchronization's
/// `Mutex`, over a pthread mutex. ThreadSanitizer intercepts pthread mutexes, while `Mutex`'s futex-based lock on
/// Linux is invisible to it and makes every access under it look like a race, which would hide real ones in
/// the noise.
public final class Locked<Value>: @unchecked Sendable { // Sendable: `value` is touched only under `mutex`.
    private var value: Value
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)

    public init(_ value: sending Value) {
        self.value = value
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Runs `body` with the value, holding the lock. As with `Mutex`, what goes in and out must not let the value
    /// escape the lock (`sending`).
    public func withLock<Result, Failure: Error>(_ body: (inout sending Value) throws(Failure) -> sending Result) throws(Failure) -> sending Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}
