// Shared byte storage for zero-copy decoding: the decoder's buffer is a `ByteStorage`, and the
// payloads it yields are `ByteSlice`s that keep their storage alive. The decoder never writes
// into a storage that a yielded slice still references (it checks unique ownership first).

/// A fixed-capacity heap buffer. Internal to the decoder; exposed read-only through `ByteSlice`.
///
/// Sendable: the decoder writes a storage only while it holds the only reference (it checks unique ownership first);
/// once a slice of it is handed out, it is read only.
public final class ByteStorage: @unchecked Sendable {
    @usableFromInline let base: UnsafeMutableRawPointer
    @usableFromInline let capacity: Int

    init(capacity: Int) {
        self.capacity = max(capacity, 16)
        self.base = UnsafeMutableRawPointer.allocate(byteCount: self.capacity, alignment: 64)
    }

    /// Copies `bytes` into a new storage.
    convenience init(copying bytes: UnsafeRawBufferPointer) {
        self.init(capacity: bytes.count)
        if let src = bytes.baseAddress, bytes.count > 0 { base.copyMemory(from: src, byteCount: bytes.count) }
    }

    deinit { base.deallocate() }
}

/// An immutable view of bytes in a `ByteStorage`; copying it does not copy the bytes.
public struct ByteSlice: Sendable, Equatable, CustomStringConvertible {
    @usableFromInline let storage: ByteStorage
    @usableFromInline let start: Int
    public let count: Int

    init(storage: ByteStorage, start: Int, count: Int) {
        self.storage = storage
        self.start = start
        self.count = count
    }

    /// A slice holding a copy of `bytes` (for building records to encode).
    public init<C: Collection>(_ bytes: C) where C.Element == UInt8 {
        let array = Array(bytes)
        let storage = array.withUnsafeBytes { ByteStorage(copying: $0) }
        self.init(storage: storage, start: 0, count: array.count)
    }

    @inlinable public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeRawBufferPointer(start: storage.base + start, count: count))
    }

    /// A sub-slice sharing the same storage.
    public func slice(_ range: Range<Int>) -> ByteSlice {
        precondition(range.lowerBound >= 0 && range.upperBound <= count)
        return ByteSlice(storage: storage, start: start + range.lowerBound, count: range.count)
    }

    public var bytes: [UInt8] { withUnsafeBytes { Array($0) } }

    public static func == (a: ByteSlice, b: ByteSlice) -> Bool {
        a.count == b.count && a.withUnsafeBytes { pa in b.withUnsafeBytes { pb in pa.elementsEqual(pb) } }
    }

    public var description: String { "ByteSlice(\(count) bytes)" }
}

// MARK: little-endian access

extension UnsafeRawBufferPointer {
    @inlinable func le16(_ offset: Int) -> UInt16 { UInt16(littleEndian: loadUnaligned(fromByteOffset: offset, as: UInt16.self)) }
    @inlinable func le32(_ offset: Int) -> UInt32 { UInt32(littleEndian: loadUnaligned(fromByteOffset: offset, as: UInt32.self)) }
    @inlinable func le64(_ offset: Int) -> UInt64 { UInt64(littleEndian: loadUnaligned(fromByteOffset: offset, as: UInt64.self)) }
}

/// Writes little-endian fields into a caller's buffer, checking bounds.
public struct ByteWriter {
    public let buffer: UnsafeMutableRawBufferPointer
    public private(set) var position: Int = 0

    public init(_ buffer: UnsafeMutableRawBufferPointer) { self.buffer = buffer }

    @inlinable public var remaining: Int { buffer.count - position }

    public mutating func u8(_ v: UInt8) { precondition(remaining >= 1); buffer[position] = v; position += 1 }
    public mutating func u16(_ v: UInt16) { put(v.littleEndian) }
    public mutating func u32(_ v: UInt32) { put(v.littleEndian) }
    public mutating func u64(_ v: UInt64) { put(v.littleEndian) }
    public mutating func zeros(_ n: Int) {
        precondition(remaining >= n)
        if n > 0 { (buffer.baseAddress! + position).initializeMemory(as: UInt8.self, repeating: 0, count: n) }
        position += n
    }
    public mutating func bytes(_ src: UnsafeRawBufferPointer) {
        precondition(remaining >= src.count)
        if src.count > 0 { (buffer.baseAddress! + position).copyMemory(from: src.baseAddress!, byteCount: src.count) }
        position += src.count
    }
    @inline(__always) mutating func put<T: FixedWidthInteger>(_ v: T) {
        precondition(remaining >= MemoryLayout<T>.size)
        buffer.storeBytes(of: v, toByteOffset: position, as: T.self)
        position += MemoryLayout<T>.size
    }
}
