import MicroVM
import TestSupport
import XCTest

/// Bad guest images are refused with an error that says why; none of this needs KVM.
final class PVHImageTests: XCTestCase {
    func testTheGuestKitImageHasAPVHEntry() throws {
        let image = try PVHImage(elf: try TestGuest.image())
        XCTAssertGreaterThanOrEqual(image.entryPoint, 0x100000, "PVH guests are linked at 1 MiB")
        XCTAssertFalse(image.segments.isEmpty)
    }

    func testRefusesAnELFWithoutThePVHNote() throws {
        var elf = try TestGuest.image()
        // Turn every "Xen" note of type 18 into type 19: the file stays a valid ELF, just not a PVH one.
        let name = Array("Xen\0".utf8)
        var patched = 0
        for offset in 12 ..< elf.count - 4 where elf[offset ..< offset + 4].elementsEqual(name) {
            if elf[offset - 12] == 4, elf[offset - 4] == 18 {
                elf[offset - 4] = 19
                patched += 1
            }
        }
        XCTAssertGreaterThan(patched, 0, "the guest's PVH note was not found to patch")
        XCTAssertThrowsError(try PVHImage(elf: elf)) { error in
            XCTAssertEqual(error as? PVHLoadError, .noPVHNote)
            XCTAssertTrue("\(error)".contains("no PVH entry point"), "\(error)")
        }
    }

    func testRefusesWhatIsNotAnELF() {
        XCTAssertThrowsError(try PVHImage(elf: Array("#!/bin/sh\necho not a kernel\n".utf8) + [UInt8](repeating: 0, count: 64))) { error in
            XCTAssertEqual(error as? PVHLoadError, .notELF)
        }
    }

    func testRefusesATruncatedELF() throws {
        let elf = try TestGuest.image()
        XCTAssertThrowsError(try PVHImage(elf: Array(elf.prefix(200)))) { error in
            XCTAssertTrue("\(error)".contains("malformed"), "\(error)")
        }
    }

    func testRefusesAnImageThatDoesNotFitInRAM() throws {
        // A segment placed at 1 GiB cannot load into 64 MiB of RAM.
        var elf = try TestGuest.image()
        let headerOffset = Int(elf[32]) | Int(elf[33]) << 8
        elf[headerOffset + 24 + 3] = 0x40 // p_paddr |= 1 GiB
        let image = try PVHImage(elf: elf)
        let memory = try GuestMemory(size: 64 << 20)
        XCTAssertThrowsError(try image.load(into: memory, commandLine: "")) { error in
            XCTAssertTrue("\(error)".contains("outside guest RAM"), "\(error)")
        }
    }
}
