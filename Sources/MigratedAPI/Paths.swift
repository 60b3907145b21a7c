import Foundation

/// `path` as an absolute path: the daemon's working directory is no business of a client's, so every path a
/// client sends (images, logs, snapshot files) is made absolute against the client's own directory first.
public func absolutePath(_ path: String) -> String {
    path.hasPrefix("/") ? path : URL(fileURLWithPath: path, relativeTo: URL(fileURLWithPath: FileManager.default.currentDirectoryPath)).path
}
