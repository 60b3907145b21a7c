import Glibc

/// A field of /proc/meminfo as the number it shows (kB for sizes, a count for HugePages_*), or nil when the
/// file or the field cannot be read.
public func memoryInfo(_ field: String) -> UInt64? {
    guard let file = fopen("/proc/meminfo", "r") else { return nil }
    defer { fclose(file) }
    var line: UnsafeMutablePointer<CChar>?
    var capacity = 0
    defer { free(line) }
    while getline(&line, &capacity, file) > 0, let line {
        let words = String(cString: line).split { $0 == " " || $0 == "\n" }
        if words.count >= 2, words[0] == field + ":" { return UInt64(words[1]) }
    }
    return nil
}
