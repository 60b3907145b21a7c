import CKVM
import Glibc

/// A file descriptor that this object owns and closes when it goes away.
public final class OwnedFileDescriptor: Sendable {
    public let rawValue: Int32

    public init(taking rawValue: Int32) {
        precondition(rawValue >= 0, "not a file descriptor: \(rawValue)")
        self.rawValue = rawValue
    }

    /// Opens a path; `flags` always gains O_CLOEXEC, so no descriptor leaks into child processes by accident.
    public convenience init(opening path: String, flags: Int32, mode: mode_t = 0o600) throws {
        let fd = try systemCall("open \(path)") { open(path, flags | O_CLOEXEC, mode) }
        self.init(taking: fd)
    }

    deinit { close(rawValue) }

    /// Writes all of `buffer` at `offset`, whatever the kernel's short writes.
    public func write(all buffer: UnsafeRawBufferPointer, at offset: Int64) throws {
        var done = 0
        while done < buffer.count {
            let n = try systemCall("pwrite") {
                pwrite(rawValue, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            }
            done += n
        }
    }

    /// Writes `pages.count` whole pages of `pageSize` bytes to consecutive pages of the file from `offset`,
    /// page i from `pages[i]`: one pwritev per IOV_MAX pages, resumed after a short write.
    public func write(pages: UnsafeBufferPointer<UnsafeRawPointer>, pageSize: Int, at offset: Int64) throws {
        let groupSize = 1024 // IOV_MAX on Linux
        var index = 0
        while index < pages.count {
            let group = min(groupSize, pages.count - index)
            let written = try withUnsafeTemporaryAllocation(of: iovec.self, capacity: group) { vectors in
                for i in 0 ..< group {
                    vectors[i] = iovec(iov_base: UnsafeMutableRawPointer(mutating: pages[index + i]), iov_len: pageSize)
                }
                return try systemCall("pwritev") {
                    pwritev(rawValue, vectors.baseAddress, Int32(group), off_t(offset) + off_t(index * pageSize))
                }
            }
            if written == 0 { throw SystemError("pwritev wrote nothing at \(offset + Int64(index * pageSize))", errno: EIO) }
            // A short write (rare: a signal, or memory pressure) ends inside some page; finish that page alone.
            let whole = written / pageSize, partial = written % pageSize
            index += whole
            if partial > 0 {
                try write(all: UnsafeRawBufferPointer(start: pages[index] + partial, count: pageSize - partial),
                          at: offset + Int64(index * pageSize + partial))
                index += 1
            }
        }
    }

    /// Copies `count` bytes at `sourceOffset` of `source` to `offset` of this file inside the kernel (sendfile):
    /// one copy from the source's page cache, and pages of this file that did not exist are not zero-filled first.
    /// Moves this file's position; reaching the end of `source` first is an error.
    public func copy(_ count: Int, from source: OwnedFileDescriptor, at sourceOffset: Int64, to offset: Int64) throws {
        _ = try systemCall("lseek") { lseek(rawValue, off_t(offset), SEEK_SET) }
        var position = off_t(sourceOffset)
        var done = 0
        while done < count {
            let n = try systemCall("sendfile") { sendfile(rawValue, source.rawValue, &position, count - done) }
            if n == 0 { throw SystemError("sendfile: source ends \(count - done) bytes early", errno: EIO) }
            done += n
        }
    }

    /// Deallocates `length` bytes from `offset`, keeping the file's size: they read as zeros afterwards, and
    /// hold no memory (a memfd) or blocks (a file).
    /// Allocates the file's blocks for `length` bytes from `offset` ahead of writing them; the size is unchanged.
    public func allocate(at offset: Int64, length: Int64) throws {
        _ = try systemCall("fallocate of \(length) bytes at \(offset)") { ckvm_allocate(rawValue, offset, length) }
    }

    public func punchHole(at offset: Int64, length: Int64) throws {
        _ = try systemCall("fallocate PUNCH_HOLE of \(length) bytes at \(offset)") { ckvm_punch_hole(rawValue, offset, length) }
    }

    /// Fills all of `buffer` from `offset`; reaching the end of the file first is an error.
    public func read(all buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws {
        var done = 0
        while done < buffer.count {
            let n = try systemCall("pread") {
                pread(rawValue, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            }
            if n == 0 { throw SystemError("pread: file ends \(buffer.count - done) bytes early", errno: EIO) }
            done += n
        }
    }

    public func size() throws -> Int64 {
        var info = stat()
        _ = try systemCall("fstat") { fstat(rawValue, &info) }
        return Int64(info.st_size)
    }

    public func truncate(to size: Int64) throws {
        _ = try systemCall("ftruncate to \(size) bytes") { ftruncate(rawValue, off_t(size)) }
    }

    public func sync() throws {
        _ = try systemCall("fsync") { fsync(rawValue) }
    }

    /// Starts writing the file's dirty pages to disk and returns without waiting: a large file written this way
    /// as it grows leaves little for the final `sync`.
    public func startWriteback() throws {
        _ = try systemCall("sync_file_range") { ckvm_start_writeback(rawValue) }
    }

    /// The byte ranges below `limit` that hold data; the rest are holes, which read as zeros.
    /// Found with SEEK_DATA and SEEK_HOLE, so a sparse file of tens of GiB is walked in a few calls.
    public func dataRanges(from start: Int64 = 0, below limit: Int64) throws -> [Range<Int64>] {
        var ranges: [Range<Int64>] = []
        var position = start
        while position < limit {
            let dataStart = lseek(rawValue, off_t(position), CKVM_SEEK_DATA)
            if dataStart < 0 {
                if errno == ENXIO { break } // no data after `position`
                throw SystemError("lseek SEEK_DATA", errno: errno)
            }
            guard dataStart < limit else { break }
            let holeStart = try systemCall("lseek SEEK_HOLE") { lseek(rawValue, dataStart, CKVM_SEEK_HOLE) }
            let end = min(Int64(holeStart), limit)
            ranges.append(Int64(dataStart) ..< end)
            position = end
        }
        return ranges
    }
}
