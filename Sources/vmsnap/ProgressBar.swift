import Foundation
import Glibc
import MigratedAPI

/// Progress of a long operation on standard error: a bar redrawn in place on a terminal, and a plain line
/// every few seconds otherwise (logs and pipes get no control characters).
final class ProgressBar {
    private let label: String
    private let terminal = isatty(STDERR_FILENO) == 1
    private let started = Date()
    private var lastDraw = Date.distantPast
    private var drawn = false
    private var lastFraction = -1.0
    private let quiet: Bool

    init(_ label: String, quiet: Bool = false) {
        self.label = label
        self.quiet = quiet
    }

    /// `done` of `total` pages; `bytesPerSecond` when the caller knows better than pages over time.
    func update(done: Int, total: Int, bytesPerSecond: Double? = nil) {
        guard !quiet else { return }
        let now = Date()
        let fraction = total > 0 ? min(Double(done) / Double(total), 1) : 0
        // A terminal redraws often; a log gets a line every few seconds, and one when a part completes.
        let due = now.timeIntervalSince(lastDraw) >= (terminal ? 0.1 : 5) || (fraction == 1 && lastFraction != 1)
        guard due, fraction != lastFraction || terminal else { return }
        lastDraw = now
        lastFraction = fraction
        let elapsed = now.timeIntervalSince(started)
        let rate = bytesPerSecond ?? (elapsed > 0 ? Double(done) * 4096 / elapsed : 0)
        let eta = fraction > 0 && fraction < 1 ? " ETA \(Formatting.seconds(elapsed * (1 - fraction) / fraction))" : ""
        let numbers = String(format: "%5.1f%%", fraction * 100) + "  \(Formatting.bytes(rate))/s\(eta)"
        if terminal {
            let width = 30
            let filled = Int(fraction * Double(width))
            let bar = String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled)
            FileHandle.standardError.write(Data("\r\(label) [\(bar)] \(numbers)\u{1B}[K".utf8))
            drawn = true
        } else {
            FileHandle.standardError.write(Data("\(label): \(numbers)\n".utf8))
        }
    }

    /// Ends the bar's line on a terminal.
    func finish() {
        if drawn { FileHandle.standardError.write(Data("\n".utf8)) }
        drawn = false
    }
}
