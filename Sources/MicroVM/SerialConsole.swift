import Foundation
import Glibc

/// The guest's serial console (transmit side of an 8250 UART at 0x3f8). Each complete line goes to an output
/// file descriptor (stdout, a log file, or nowhere) and is kept in memory so a controller can wait for it.
///
/// Sendable: `partial`, `lines` and `droppedLines` are guarded by `condition`.
public final class SerialConsole: @unchecked Sendable {
    private let output: Int32?
    private let condition = NSCondition()
    private var partial: [UInt8] = []
    private var lines: [String] = []
    /// Lines kept for `waitForLine`; older ones are dropped so a long-running guest cannot grow this unbounded.
    private let retainedLines = 10_000
    /// How many of the oldest lines were dropped: line numbers passed to `waitForLine` count them too.
    private var droppedLines = 0

    /// `output` is written to and not closed; nil keeps the lines in memory only.
    public init(output: Int32? = STDOUT_FILENO) {
        self.output = output
    }

    /// One byte from the guest, on a vCPU thread.
    func transmit(_ byte: UInt8) {
        guard byte != 0x0A else { return finishLine() }
        if byte != 0x0D { partial.append(byte) }
        if partial.count >= 4096 { finishLine() } // a guest that never sends a newline still gets its text out
    }

    private func finishLine() {
        let line = String(decoding: partial, as: UTF8.self)
        partial.removeAll(keepingCapacity: true)
        if let output {
            var bytes = Array(line.utf8) + [0x0A]
            _ = bytes.withUnsafeMutableBytes { write(output, $0.baseAddress, $0.count) }
        }
        condition.lock()
        lines.append(line)
        if lines.count > retainedLines {
            droppedLines += lines.count - retainedLines
            lines.removeFirst(lines.count - retainedLines)
        }
        condition.broadcast()
        condition.unlock()
    }

    /// Every line received so far (the most recent `retainedLines`).
    public var receivedLines: [String] {
        condition.lock()
        defer { condition.unlock() }
        return lines
    }

    /// Waits for a line, after the first `skipping` lines ever received, that satisfies `predicate`; nil on timeout.
    public func waitForLine(after skipping: Int = 0, timeout: TimeInterval, where predicate: (String) -> Bool) -> String? {
        let deadline = Date(timeIntervalSinceNow: timeout)
        condition.lock()
        defer { condition.unlock() }
        var next = skipping
        while true {
            next = max(next, droppedLines)
            while next < droppedLines + lines.count {
                if predicate(lines[next - droppedLines]) { return lines[next - droppedLines] }
                next += 1
            }
            if !condition.wait(until: deadline) { return nil }
        }
    }

    public var lineCount: Int {
        condition.lock()
        defer { condition.unlock() }
        return droppedLines + lines.count
    }
}
