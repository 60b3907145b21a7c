import KVMBackend
import XCTest

final class GuestPageBitmapTests: XCTestCase {
    let host = UnsafeMutableRawPointer(bitPattern: 0x1000)!

    func layout() -> GuestPageBitmap {
        GuestPageBitmap(slots: [
            MemorySlot(id: 0, guestPhysicalAddress: 0, size: 1 << 20, hostAddress: host),
            MemorySlot(id: 1, guestPhysicalAddress: 4 << 30, size: 100 * 4096, hostAddress: host),
        ])
    }

    func testInsertAcrossPagesAndSlots() {
        var pages = layout()
        pages.insert(guestPhysicalAddress: 4095, length: 2)              // pages 0 and 1
        pages.insert(guestPhysicalAddress: (4 << 30) + 99 * 4096, length: 1) // last page of slot 1
        pages.insert(guestPhysicalAddress: 3 << 30, length: 4096)          // a hole: ignored
        XCTAssertEqual(pages.guestPhysicalAddresses, [0, 4096, (4 << 30) + 99 * 4096])
        XCTAssertEqual(pages.count, 3)
        XCTAssertTrue(pages.contains(guestPhysicalAddress: 4096 + 17))
        XCTAssertFalse(pages.contains(guestPhysicalAddress: 8192))
    }

    func testUnionAndRemoveAll() {
        var a = layout(), b = layout()
        a.insert(slotIndex: 0, page: 5)
        b.insert(slotIndex: 1, page: 63)
        b.insert(slotIndex: 1, page: 64)
        a.formUnion(b)
        XCTAssertEqual(a.count, 3)
        a.removeAll()
        XCTAssertTrue(a.isEmpty)
    }
}
