import Foundation

/// The words migratectl shows people; here, beside the documents, so that tests can hold them to their shape.
public enum Formatting {
    /// Bytes in binary units: `512 B`, `1.5 KiB`, `128.0 MiB`, `2.00 GiB`.
    public static func bytes(_ value: Double) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var scaled = value
        var unit = 0
        while scaled >= 1024, unit < units.count - 1 {
            scaled /= 1024
            unit += 1
        }
        if unit == 0 { return "\(Int(scaled)) B" }
        return String(format: scaled >= 100 ? "%.0f %@" : scaled >= 10 ? "%.1f %@" : "%.2f %@", scaled, units[unit])
    }

    public static func seconds(_ value: Double) -> String {
        if value < 1 { return String(format: "%.0f ms", value * 1000) }
        if value < 120 { return String(format: "%.1f s", value) }
        return String(format: "%dm%02ds", Int(value) / 60, Int(value) % 60)
    }

    /// One line of live progress: `precopy  pass 2  63.4%  rate 1.21 GiB/s  dirty 95.3 MiB/s  downtime ~12 ms  ETA 3.1 s`.
    public static func progressLine(_ status: MigrationStatus) -> String {
        var parts = [
            status.phase.rawValue,
            "pass \(status.pass)",
            String(format: "%5.1f%%", status.percent),
            "rate \(bytes(status.rateBytesPerSecond))/s",
            "dirty \(bytes(status.dirtyRateBytesPerSecond))/s",
            "downtime ~\(seconds(status.expectedDowntimeMs / 1000))",
            "ETA \(status.etaSeconds.map(seconds) ?? "?")",
        ]
        if status.throttle > 0 { parts.append(String(format: "throttle %.0f%%", status.throttle * 100)) }
        // In post-copy the source is paused and the guest runs at the destination: the dirty rate and the expected
        // downtime are still the last pre-copy pass's, and would mislead.
        if status.phase == .postcopy || status.phase == .postcopyPaused { parts.removeAll { $0.hasPrefix("dirty ") || $0.hasPrefix("downtime ~") } }
        if let pause = status.postcopyPause {
            parts.removeAll { $0.hasPrefix("rate ") || $0.hasPrefix("ETA ") }
            parts.append("link broken: waits \(seconds(pause.waitSecondsLeft)) more for `migratectl migrate \(status.vm) --resume`")
        }
        return parts.joined(separator: "  ")
    }

    /// A dry run's prediction, for people; `--json` prints the document itself.
    public static func prediction(_ p: MigrationPrediction) -> String {
        let windows = p.dirtyWindows.map { "\(seconds($0.seconds)) \(bytes(Double($0.bytes)))" }.joined(separator: ", ")
        var lines = [
            "dry run of \(p.vm) to \(p.peer): nothing was migrated, the guest ran throughout",
            "  guest: \(bytes(Double(p.dataBytes))) with data; dirtied \(bytes(p.dirtyRateBytesPerSecond))/s over a sample of "
                + "\(seconds(p.sampleSeconds)) (distinct: \(windows))",
            "  link: \(bytes(p.rateBytesPerSecond))/s of guest pages end to end, \(Int(p.wireBytesPerPage.rounded())) wire bytes per page; \(p.link)",
        ]
        if p.converges {
            lines.append("  prediction: converges in \(p.passes.count) pass\(p.passes.count == 1 ? "" : "es") and the switchover: total "
                + "\(seconds(p.totalSeconds)), downtime \(p.downtimeMs.map { seconds($0 / 1000) } ?? "-") (of which \(seconds(p.assumedSwitchoverMs / 1000)) "
                + "assumed for the switchover itself)" + (p.throttle > 0 ? String(format: ", with auto-converge throttling the guest to %.0f%%", p.throttle * 100) : ""))
        } else {
            lines.append("  prediction: will NOT converge under these options: \(p.reason ?? "no reason given"); it would give up after \(seconds(p.totalSeconds))")
        }
        for pass in p.passes {
            lines.append("    pass \(pass.pass): \(pass.pages) pages in \(seconds(pass.seconds)), \(pass.dirtyPages) dirtied meanwhile"
                + (pass.throttle > 0 ? String(format: ", throttle %.0f%%", pass.throttle * 100) : ""))
        }
        if p.converges { lines.append("    switchover: \(p.finalPages) pages with the guest paused") }
        return lines.joined(separator: "\n")
    }

    /// The final report, for people; `--json` prints the document itself.
    public static func report(_ report: MigrationReportDocument, vm: String, peer: String) -> String {
        var lines = [
            report.succeeded ? "migrated \(vm) to \(peer)" : "migration of \(vm) to \(peer) did not complete: \(report.error ?? "no reason given")",
            "  total \(seconds(report.totalSeconds)), setup \(seconds(report.setupSeconds)), downtime \(report.downtimeMs.map { seconds($0 / 1000) } ?? "-")",
            "  \(bytes(Double(report.wireBytes))) on the wire, \(report.pagesSent) pages, \(report.compression.rawValue), \(report.channels) channel\(report.channels == 1 ? "" : "s")",
        ]
        for pass in report.passes {
            let unchanged = pass.unchangedPages.map { ", \($0) unchanged" } ?? ""
            lines.append("  pass \(pass.pass): \(pass.pagesSent) pages (\(pass.zeroPages) zero, \(pass.compressedPages) compressed\(unchanged)), "
                + "\(bytes(Double(pass.wireBytes))) in \(seconds(pass.seconds)), rate \(bytes(pass.rateBytesPerSecond))/s, "
                + "dirty \(bytes(pass.dirtyRateBytesPerSecond))/s, expected downtime \(seconds(pass.expectedDowntimeMs / 1000))"
                + (pass.throttle > 0 ? String(format: ", throttle %.0f%%", pass.throttle * 100) : ""))
        }
        for lost in report.lostChannels ?? [] {
            lines.append("  channel \(lost.channel) lost in pass \(lost.pass), its pages taken over by the others: \(lost.reason)")
        }
        if let postCopy = report.postCopy { lines.append("  " + Self.postCopy(postCopy)) }
        if let resumed = report.resumedPrecopy {
            lines.append(resumed.resumed ? "  resumed: the destination held \(resumed.heldPages) pages of the broken migration"
                                         : "  not resumed: \(resumed.reason ?? "the destination kept nothing")")
        }
        if report.resumable == true {
            lines.append("  the destination may keep what it received for a while: migrate --resume sends only the rest")
        }
        return lines.joined(separator: "\n")
    }

    /// `post-copy: 5210 pages missing at the start, 312 asked for by the destination in 312 requests, 20.4 MiB in 85 ms`.
    public static func postCopy(_ postCopy: MigrationReportDocument.PostCopy) -> String {
        "post-copy: \(postCopy.missingPages) pages missing at the start, \(postCopy.requestedPages) asked for by the destination in "
            + "\(postCopy.requests) requests, \(bytes(Double(postCopy.wireBytes))) in \(seconds(postCopy.seconds))"
    }

    /// `post-copy: 5210 pages missing at the start, 312 asked for by the guest here, 85 ms`.
    public static func postCopy(_ postCopy: IncomingPostCopy) -> String {
        "post-copy: \(postCopy.missingPages) pages missing at the start, \(postCopy.requestedPages) asked for by the guest here, "
            + seconds(postCopy.seconds)
    }
}
