import CPageCodec

/// Zero-page detection: wide vector ORs (AVX2 when the CPU has it), stopping at the first
/// non-zero 256-byte block.
public enum ZeroPage {
    @inlinable public static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard let base = bytes.baseAddress else { return true }
        return cpc_is_zero(base, bytes.count) != 0
    }
}

/// CRC32C with the SSE4.2 instruction (three interleaved lanes) when available, else a
/// table-driven path. Results equal MigrationWire's portable `CRC32C`, so either can check
/// the other's batches; pass `FastCRC32C.function` to a StreamEncoder/StreamDecoder.
public enum FastCRC32C {
    @inlinable public static func update(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        guard let base = bytes.baseAddress else { return crc }
        return cpc_crc32c(crc, base, bytes.count)
    }

    public static let function: @Sendable (UInt32, UnsafeRawBufferPointer) -> UInt32 = { update($0, $1) }

    public static func checksum(_ bytes: [UInt8]) -> UInt32 { bytes.withUnsafeBytes { update(0, $0) } }
}

/// Which accelerated paths the CPU offers (for benchmark reports).
public enum CPUPaths {
    public static var description: String {
        let f = cpc_cpu_features()
        return "crc32c=\(f & 1 != 0 ? "sse4.2" : "table")\(f & 4 != 0 ? "+pclmul" : "") scan/hash=\(f & 2 != 0 ? "avx2" : "portable")"
    }

    public enum Mode: Int32 { case best = 0, portable = 1, withoutCarrylessMultiply = 2 }

    /// Selects code paths, for tests that compare them; not for production use.
    public static func force(_ mode: Mode) { cpc_force_portable(mode.rawValue) }
    public static func forcePortable(_ on: Bool) { force(on ? .portable : .best) }
}
