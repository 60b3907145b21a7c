import Foundation
import XCTest
import MigrationWire

/// Checks protocol/vectors against the decoder. Set MIGRATED_WRITE_VECTORS=1 to regenerate them
/// from the encoder (then review the diff).
final class WireVectorTests: XCTestCase {
    let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../../protocol/vectors").standardized

    func testVectors() throws {
        let write = ProcessInfo.processInfo.environment["MIGRATED_WRITE_VECTORS"] == "1"
        for vector in allVectors() {
            let (events, error) = decodeAll(vector.bytes)
            XCTAssertEqual(error, vector.expectedError, vector.name)
            let expected = expectedJSON(events: events, error: error, description: vector.description)
            let bin = directory.appendingPathComponent(vector.name + ".bin")
            let jsonURL = directory.appendingPathComponent(vector.name + ".json")
            if write {
                try Data(vector.bytes).write(to: bin)
                try expected.write(to: jsonURL, atomically: true, encoding: .utf8)
                continue
            }
            // The stored stream decodes to the stored JSON, in any chunking...
            let stored = try [UInt8](Data(contentsOf: bin))
            let storedJSON = try String(contentsOf: jsonURL, encoding: .utf8)
            for chunks in [[Int.max], [1], [7, 3, 4096], [8]] {
                let (e, err) = decodeAll(stored, chunks: chunks)
                XCTAssertEqual(expectedJSON(events: e, error: err, description: vector.description), storedJSON,
                               "\(vector.name) chunks \(chunks)")
            }
            // ...and the encoder still produces exactly the stored bytes.
            XCTAssertEqual(stored, vector.bytes, "\(vector.name): encoder output changed")
        }
    }
}
