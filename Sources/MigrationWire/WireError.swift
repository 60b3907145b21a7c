// Every rejection carries the stream offset of the offending bytes and a typed reason
// (stream.md §9 lists them).

public struct WireError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Offset in the stream of the first byte of the field (or record) that is wrong.
    public var offset: UInt64
    public var reason: Reason

    public init(offset: UInt64, reason: Reason) {
        self.offset = offset
        self.reason = reason
    }

    public enum Reason: Equatable, Sendable {
        case badMagic
        case unsupportedVersion(UInt16)
        case badHeaderLength(UInt16)
        case badPageSize(UInt32)
        case unsupportedMandatoryFeatures(UInt64)
        case badChannel(channel: UInt16, count: UInt16)
        case reservedNotZero
        case recordTooLarge(type: UInt32, length: UInt32)
        case unknownMandatoryRecord(UInt32)
        case nonZeroPadding
        case badRecordLength(type: UInt32, length: UInt32)
        case unexpectedRecord(UInt32)
        case tooManyRegions(UInt32)
        case badRegion(index: Int)
        case layoutTooLarge(bytes: UInt64)
        case tooManyPages(UInt32)
        case badPageEncoding(index: Int, value: UInt8)
        case badPageLength(index: Int, length: UInt32)
        case pageOutsideLayout(index: Int, frame: UInt64)
        case badBatchCompression(UInt8)
        case codecNotAgreed(UInt8)
        /// An `unchanged` page in a batch of pass 0, when the receiver holds no earlier version to keep.
        case unchangedInPassZero(index: Int)
        case payloadLengthMismatch(declared: UInt32, actual: UInt32)
        case checksumMismatch(stored: UInt32, computed: UInt32)
        case sequenceGap(expected: UInt64, found: UInt64)
        case passOutOfOrder(previous: UInt32, found: UInt32)
        case wrongChannel(UInt16)
        case textTooLong(UInt32)
        case badText
        case blobTooLarge(UInt32)
        case digestTooLong(UInt32)
        /// A MISSING_PAGES run that is empty, outside the layout, or not after the run before it.
        case badMissingRun(index: Int)
        /// POSTCOPY's page count is not the sum of the MISSING_PAGES runs before it.
        case missingPagesMismatch(declared: UInt64, listed: UInt64)
        /// A PAGE_REQUEST with no frames or more than `WireLimits.maxRequestedPages`.
        case badPageRequest(UInt32)
        /// PRECOPY_TICKET both resumes and discards.
        case badPreCopyTicket
        /// A HELD_PAGES run that is empty, too long, out of order or holds a zero hash.
        case badHeldRun
        /// PRECOPY_RESUMED declares another number of held pages than the HELD_PAGES before it list, or an outcome
        /// it does not know, or held pages with an outcome other than `resumed`.
        case badPreCopyResumed
        case dataAfterEnd
        case truncated

        /// Stable name used by the test vectors and logs.
        public var name: String {
            switch self {
            case .badMagic: "badMagic"
            case .unsupportedVersion: "unsupportedVersion"
            case .badHeaderLength: "badHeaderLength"
            case .badPageSize: "badPageSize"
            case .unsupportedMandatoryFeatures: "unsupportedMandatoryFeatures"
            case .badChannel: "badChannel"
            case .reservedNotZero: "reservedNotZero"
            case .recordTooLarge: "recordTooLarge"
            case .unknownMandatoryRecord: "unknownMandatoryRecord"
            case .nonZeroPadding: "nonZeroPadding"
            case .badRecordLength: "badRecordLength"
            case .unexpectedRecord: "unexpectedRecord"
            case .tooManyRegions: "tooManyRegions"
            case .badRegion: "badRegion"
            case .layoutTooLarge: "layoutTooLarge"
            case .tooManyPages: "tooManyPages"
            case .badPageEncoding: "badPageEncoding"
            case .badPageLength: "badPageLength"
            case .pageOutsideLayout: "pageOutsideLayout"
            case .badBatchCompression: "badBatchCompression"
            case .codecNotAgreed: "codecNotAgreed"
            case .unchangedInPassZero: "unchangedInPassZero"
            case .payloadLengthMismatch: "payloadLengthMismatch"
            case .checksumMismatch: "checksumMismatch"
            case .sequenceGap: "sequenceGap"
            case .passOutOfOrder: "passOutOfOrder"
            case .wrongChannel: "wrongChannel"
            case .textTooLong: "textTooLong"
            case .badText: "badText"
            case .blobTooLarge: "blobTooLarge"
            case .digestTooLong: "digestTooLong"
            case .badMissingRun: "badMissingRun"
            case .missingPagesMismatch: "missingPagesMismatch"
            case .badPageRequest: "badPageRequest"
            case .badPreCopyTicket: "badPreCopyTicket"
            case .badHeldRun: "badHeldRun"
            case .badPreCopyResumed: "badPreCopyResumed"
            case .dataAfterEnd: "dataAfterEnd"
            case .truncated: "truncated"
            }
        }
    }

    public var description: String { "stream rejected at byte \(offset): \(reason)" }
}
