/// A secondary channel that a migration lost during pre-copy and went on without (stream.md §6.16).
public struct LostChannel: Sendable, Codable, Equatable {
    /// Its index, 1 or more: channel 0 cannot be lost.
    public var channel: Int
    /// The pass during which it was lost; the next pass sent its pages again on the channels left.
    public var pass: Int
    /// What failed, as the side that reports it saw it.
    public var reason: String

    public init(channel: Int, pass: Int, reason: String) {
        self.channel = channel
        self.pass = pass
        self.reason = reason
    }
}

/// Which channel carries each frame (stream.md §11): `channelIndex`'s, until a channel is lost.
///
/// When a channel is lost (§6.16), its chunks go round robin over the channels left, and every other frame stays where
/// it is: a frame leaves a channel only when that channel is gone, after the receiver has said that nothing more comes
/// from it. A frame the lost channel had taken over from one lost before moves on in the same way.
struct ChannelMap {
    /// The channels of the migration, lost ones included.
    let count: Int
    /// Each channel lost, in order, with the channels left after it.
    private var losses: [(channel: Int, left: [Int])] = []

    init(channels: Int) { count = channels }

    /// The channels still in use, in ascending order; channel 0 always.
    var live: [Int] { losses.last?.left ?? Array(0 ..< count) }

    func channel(of frame: UInt64) -> Int {
        let chunk = frame / framesPerChannelRun
        var channel = channelIndex(of: frame, channels: count)
        // In the order of the losses, so that a frame follows each move of its own.
        for loss in losses where loss.channel == channel {
            // The lost channel's own chunks are every `count`th: their rank among them spreads them evenly.
            channel = loss.left[Int(chunk / UInt64(count) % UInt64(loss.left.count))]
        }
        return channel
    }

    /// Takes `channel`, a secondary one still in use, out of the map.
    mutating func lose(_ channel: Int) {
        precondition(channel > 0 && live.contains(channel), "only a secondary channel in use can be lost")
        losses.append((channel, live.filter { $0 != channel }))
    }
}
