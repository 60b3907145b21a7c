import XCTest
@testable import XenAdapter

/// The live backend loads Xen's libraries only at run time: on a host that is not a Xen control domain it
/// fails with a clear error, and nothing else in the adapter needs Xen.
final class XenHostTests: XCTestCase {
    func testOpeningOnAHostWithoutXenFailsClearly() throws {
        if FileManager.default.fileExists(atPath: "/dev/xen/privcmd") || FileManager.default.fileExists(atPath: "/proc/xen/privcmd") {
            throw XCTSkip("this host runs under Xen; the refusal cannot be shown here")
        }
        XCTAssertThrowsError(try XenHost.open()) { error in
            let text = "\(error)"
            XCTAssertTrue(text.contains("not a Xen host"), text)
            XCTAssertTrue(text.contains("privcmd"), text)
        }
    }

    func testLibrariesFailToLoadWithTheirNamesWhenAbsent() throws {
        do {
            _ = try XenLibraries.load()
            throw XCTSkip("Xen's libraries are installed here")
        } catch let error as XenHostError {
            XCTAssertTrue(error.reason.contains("libxenctrl.so.4.17"), error.reason)
        }
    }
}
