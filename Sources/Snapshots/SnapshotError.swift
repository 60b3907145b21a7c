/// Why a snapshot could not be written, read or restored. Each case names what was wrong and, for a bad
/// file, which part of it: an operator must be able to tell a truncated copy from a flipped bit.
public enum SnapshotError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Not a snapshot file at all (wrong magic).
    case notASnapshot(String)
    /// A version, page size or feature this build does not read.
    case unsupported(String)
    /// The file ends before a part it lists.
    case truncated(String)
    /// A part's bytes do not match its checksum: `part` names it ("page checksums", "memory page 0x1234", ...).
    case checksumMismatch(part: String, detail: String)
    /// A part decodes to something impossible.
    case corrupt(part: String, String)
    /// A diff snapshot whose parent is missing, or is not the snapshot it was taken on top of.
    case chain(String)
    /// The memory a restore produced does not have the digest the snapshot records.
    case digestMismatch(expected: String, actual: String)
    /// Reading or writing the file failed (disk full, permissions, ...).
    case io(String)
    /// Taking the snapshot failed in the guest (pause, dirty log, device state) or was refused.
    case guest(String)
    /// A live save gave up: the guest dirtied memory faster than it could be written.
    case didNotConverge(String)

    public var description: String {
        switch self {
        case .notASnapshot(let why): "not a snapshot file: \(why)"
        case .unsupported(let what): "unsupported snapshot: \(what)"
        case .truncated(let why): "snapshot file is truncated: \(why)"
        case .checksumMismatch(let part, let detail): "snapshot checksum mismatch in \(part): \(detail)"
        case .corrupt(let part, let why): "snapshot \(part) is corrupt: \(why)"
        case .chain(let why): "snapshot chain is broken: \(why)"
        case .digestMismatch(let expected, let actual): "restored memory has digest \(actual), the snapshot records \(expected)"
        case .io(let why): why
        case .guest(let why): "snapshot of the guest failed: \(why)"
        case .didNotConverge(let why): "the guest dirties memory faster than it can be saved: \(why)"
        }
    }
}

/// Runs a file operation, turning any error into `SnapshotError.io` that names the file and the action.
func fileOperation<R>(_ what: @autoclosure () -> String, _ body: () throws -> R) throws(SnapshotError) -> R {
    do { return try body() } catch let error as SnapshotError { throw error } catch {
        throw .io("\(what()): \(error)")
    }
}
