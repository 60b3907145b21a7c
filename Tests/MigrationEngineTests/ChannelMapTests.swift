@testable import MigrationEngine
import XCTest

/// Which channel carries each frame, before and after channels are lost (stream.md §11, §6.16).
final class ChannelMapTests: XCTestCase {
    /// Frames of 64 MiB: 32 chunks of 2 MiB.
    let frames = UInt64(0) ..< UInt64(16384)

    func testFramesGoRoundRobinInChunksOfTwoMiB() {
        let map = ChannelMap(channels: 4)
        XCTAssertEqual(map.live, [0, 1, 2, 3])
        for frame in frames { XCTAssertEqual(map.channel(of: frame), Int((frame >> 9) % 4)) }
    }

    /// A lost channel's chunks spread evenly over the channels left; no other frame moves.
    func testALostChannelsFramesSpreadOverTheOthersAndNoOtherFrameMoves() {
        let before = ChannelMap(channels: 4)
        var after = before
        after.lose(2)
        XCTAssertEqual(after.live, [0, 1, 3])
        var taken = [0, 0, 0, 0]
        for frame in frames {
            if before.channel(of: frame) == 2 {
                taken[after.channel(of: frame)] += 1
            } else {
                XCTAssertEqual(after.channel(of: frame), before.channel(of: frame))
            }
        }
        XCTAssertEqual(taken[2], 0)
        // Channel 2's 8 chunks, 3 + 3 + 2 of them, whole.
        XCTAssertEqual(taken.sorted(), [0, 1024, 1536, 1536])
    }

    /// A second loss moves the frames of that channel only, those it had taken over from the first included.
    func testASecondLossMovesOnlyTheFramesOfThatChannel() {
        var first = ChannelMap(channels: 4)
        first.lose(2)
        var second = first
        second.lose(1)
        XCTAssertEqual(second.live, [0, 3])
        for frame in frames {
            let was = first.channel(of: frame), now = second.channel(of: frame)
            if was == 1 { XCTAssertTrue(now == 0 || now == 3) } else { XCTAssertEqual(now, was) }
        }
    }
}
