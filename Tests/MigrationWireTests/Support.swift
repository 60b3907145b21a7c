import Foundation
import MigrationWire

/// Decodes a whole stream, feeding it in chunks of the given sizes (cycled), and returns the
/// events, plus the error that stopped it (if any).
func decodeAll(_ bytes: [UInt8], chunks: [Int] = [Int.max], options: StreamDecoder.Options = .init(), decoder given: StreamDecoder? = nil)
    -> (events: [StreamEvent], error: WireError?) {
    let decoder = given ?? StreamDecoder(options: options)
    var events: [StreamEvent] = []
    var position = 0
    var chunkIndex = 0
    do {
        while position < bytes.count {
            let n = min(chunks[chunkIndex % chunks.count], bytes.count - position)
            chunkIndex += 1
            bytes[position ..< position + n].withUnsafeBytes { decoder.feed($0) }
            position += n
            while let e = try decoder.next() { events.append(e) }
        }
        try decoder.finish()
    } catch let e as WireError {
        return (events, e)
    } catch {
        fatalError("unexpected error type \(error)")
    }
    return (events, nil)
}

/// A socket that hands out at most `sizes[i % sizes.count]` bytes on its i-th read, 0 at the end.
final class ChunkedSource {
    let bytes: [UInt8]
    let sizes: [Int]
    var position = 0, reads = 0
    init(_ bytes: [UInt8], sizes: [Int]) { self.bytes = bytes; self.sizes = sizes }
    func read(into buffer: UnsafeMutableRawBufferPointer) -> Int {
        let n = min(buffer.count, sizes[reads % sizes.count], bytes.count - position)
        reads += 1
        bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[position ..< position + n])) }
        position += n
        return n
    }
}

/// The JSON form of events used by protocol/vectors (documented in protocol/vectors/README.md).
func json(_ event: StreamEvent) -> [String: Any] {
    func caps(_ c: Capabilities) -> [String: Any] {
        ["codecs": Int(c.codecs.rawValue), "max_channels": Int(c.maxChannels), "flags": Int(c.flags.rawValue)]
    }
    switch event {
    case .header(let h):
        return ["record": "header", "version": Int(h.version), "page_size": Int(h.pageSize),
                "features": String(h.features.rawValue, radix: 16), "channel": Int(h.channel),
                "channel_count": Int(h.channelCount), "migration_id": String(h.migrationID, radix: 16)]
    case .capabilitiesOffer(let c): return ["record": "capabilities_offer"].merging(caps(c)) { a, _ in a }
    case .capabilitiesAgreed(let c): return ["record": "capabilities_agreed"].merging(caps(c)) { a, _ in a }
    case .layout(let l):
        return ["record": "memory_layout",
                "regions": l.regions.map { ["gpa": String($0.guestPhysicalAddress, radix: 16),
                                            "size": String($0.size, radix: 16), "flags": Int($0.flags.rawValue)] }]
    case .pageBatch(let b):
        return ["record": "page_batch", "pass": Int(b.pass), "channel": Int(b.channel), "sequence": Int(b.sequence),
                "compression": b.compression.description, "payload_length": b.payload.count,
                "uncompressed_length": b.uncompressedPayloadLength,
                "checksum": String(b.checksum, radix: 16),
                "pages": b.pages.map { d -> [String: Any] in
                    var page: [String: Any] = ["frame": String(d.frame, radix: 16), "encoding": d.encoding.description,
                                               "length": d.length]
                    if b.compression == .none && d.length > 0 {
                        page["data_crc32c"] = String(b.payload.withUnsafeBytes {
                            CRC32C.update(0, UnsafeRawBufferPointer(rebasing: $0[d.offset ..< d.offset + d.length]))
                        }, radix: 16)
                    }
                    return page
                }]
    case .pageBatchAwaitingPayload:
        preconditionFailure("the vectors are decoded with payloads buffered")
    case .deviceState(let d):
        return ["record": "device_state", "component": Int(d.componentID), "instance": Int(d.instance),
                "component_version": Int(d.componentVersion), "blob_hex": hex(d.blob.bytes)]
    case .passBoundary(let p):
        return ["record": "pass_boundary", "pass": Int(p.pass), "dirty_pages": Int(p.dirtyPages),
                "pages_sent": Int(p.pagesSent), "zero_pages": Int(p.zeroPages), "wire_bytes": Int(p.wireBytes),
                "duration_ns": Int(p.durationNanoseconds)]
    case .switchover(let s): return ["record": "switchover", "final_pass": Int(s.finalPass)]
    case .end(let e): return ["record": "end", "digest_algorithm": Int(e.digestAlgorithm), "digest_hex": hex(e.digest)]
    case .abort(let a): return ["record": "abort", "reason": Int(a.reason.rawValue), "message": a.message]
    case .note(let t): return ["record": "note", "text": t]
    case .verify(let d): return ["record": "verify", "digest_algorithm": Int(d.algorithm), "digest_hex": hex(d.digest)]
    case .verified(let d): return ["record": "verified", "digest_algorithm": Int(d.algorithm), "digest_hex": hex(d.digest)]
    case .commit: return ["record": "commit"]
    case .started: return ["record": "started"]
    case .passApplied(let pass): return ["record": "pass_applied", "pass": Int(pass)]
    case .missingPages(let runs):
        return ["record": "missing_pages", "runs": runs.map { ["first": String($0.first, radix: 16), "count": Int($0.count)] }]
    case .postCopy(let p): return ["record": "postcopy", "final_pass": Int(p.finalPass), "missing_pages": Int(p.missingPages)]
    case .postCopyReady: return ["record": "postcopy_ready"]
    case .pageRequest(let frames): return ["record": "page_request", "frames": frames.map { String($0, radix: 16) }]
    case .postCopyResume(let pass): return ["record": "postcopy_resume", "final_pass": Int(pass)]
    case .preCopyTicket(let t): return ["record": "precopy_ticket", "ticket": t.ticket.description, "resume": t.resume, "discard": t.discard]
    case .heldPages(let run):
        return ["record": "held_pages", "first": String(run.first, radix: 16),
                "hashes": run.hashes.map { String($0.high, radix: 16) + ":" + String($0.low, radix: 16) }]
    case .preCopyResumed(let r): return ["record": "precopy_resumed", "outcome": Int(r.outcome.rawValue), "held_pages": Int(r.heldPages)]
    case .channelLost(let channel, let pass): return ["record": "channel_lost", "channel": Int(channel), "pass": Int(pass)]
    case .skippedOptional(let type, let length):
        return ["record": "skipped_optional", "type": String(type, radix: 16), "length": length]
    }
}

func hex(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined() }

func jsonText(_ object: Any) -> String {
    let data = try! JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
    return String(decoding: data, as: UTF8.self) + "\n"
}

func expectedJSON(events: [StreamEvent], error: WireError?, description: String) -> String {
    var object: [String: Any] = ["description": description, "events": events.map(json)]
    if let error { object["error"] = ["offset": Int(error.offset), "reason": error.reason.name] }
    return jsonText(object)
}
