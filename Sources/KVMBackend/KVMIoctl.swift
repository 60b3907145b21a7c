import CKVM
import Glibc
import LinuxSystem

/// The one place where KVM ioctls are issued. Each kernel object (system, VM, vCPU) owns its descriptor and
/// names itself in `subject`, so an error says what was attempted on what: "KVM_GET_REGS on vCPU 1 failed: ...".
struct KVMHandle {
    let fd: OwnedFileDescriptor
    let subject: String

    @discardableResult
    func call(_ name: StaticString, _ request: UInt, _ argument: UnsafeMutableRawPointer?) throws -> Int32 {
        try systemCall("\(name) on \(subject)") { ckvm_ioctl_ptr(fd.rawValue, request, argument) }
    }

    @discardableResult
    func call(_ name: StaticString, _ request: UInt, value: UInt = 0) throws -> Int32 {
        try systemCall("\(name) on \(subject)") { ckvm_ioctl_val(fd.rawValue, request, value) }
    }

    /// Reads a fixed-size kernel structure.
    func get<T>(_ name: StaticString, _ request: UInt, as type: T.Type = T.self) throws -> T {
        try withZeroedStorage(of: T.self) { pointer in
            try call(name, request, pointer)
            return pointer.load(as: T.self)
        }
    }

    /// Writes a fixed-size kernel structure.
    func set<T>(_ name: StaticString, _ request: UInt, _ value: T) throws {
        var copy = value
        _ = try withUnsafeMutableBytes(of: &copy) { try call(name, request, $0.baseAddress) }
    }
}

/// Runs `body` with zero-filled, suitably aligned scratch memory for one `T` (kernel structures must be zeroed:
/// padding and reserved fields are checked by some ioctls).
func withZeroedStorage<T, R>(of type: T.Type, byteCount: Int = MemoryLayout<T>.size,
                             _ body: (UnsafeMutableRawPointer) throws -> R) rethrows -> R {
    let storage = UnsafeMutableRawPointer.allocate(byteCount: byteCount, alignment: max(MemoryLayout<T>.alignment, 16))
    defer { storage.deallocate() }
    storage.initializeMemory(as: UInt8.self, repeating: 0, count: byteCount)
    return try body(storage)
}

/// A zero-initialised value of an imported C structure.
func zeroed<T>(_ type: T.Type) -> T {
    withZeroedStorage(of: T.self) { $0.load(as: T.self) }
}
