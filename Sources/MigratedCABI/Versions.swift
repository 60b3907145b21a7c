import CMigratedABI

@_cdecl("migrated_abi_version")
public func migrated_abi_version() -> UInt32 { MIGRATED_ABI_VERSION }

@_cdecl("migrated_abi_check")
public func migrated_abi_check(_ headerVersion: UInt32) -> Int32 {
    boundary {
        guard headerVersion == MIGRATED_ABI_VERSION else {
            throw CABIError(MIGRATED_ERR_ABI_MISMATCH,
                            "the VMM was built against migrated.h ABI version \(headerVersion), but this libmigrated implements version \(MIGRATED_ABI_VERSION)")
        }
    }
}

@_cdecl("migrated_last_error")
public func migrated_last_error() -> UnsafePointer<CChar> { LastError.current }

@_cdecl("migrated_error_name")
public func migrated_error_name(_ code: Int32) -> UnsafePointer<CChar> {
    let names: [migrated_error: StaticString] = [
        MIGRATED_OK: "MIGRATED_OK", MIGRATED_ERR_INVALID_ARGUMENT: "MIGRATED_ERR_INVALID_ARGUMENT",
        MIGRATED_ERR_ABI_MISMATCH: "MIGRATED_ERR_ABI_MISMATCH", MIGRATED_ERR_SYSTEM: "MIGRATED_ERR_SYSTEM",
        MIGRATED_ERR_CALLBACK: "MIGRATED_ERR_CALLBACK", MIGRATED_ERR_TRANSPORT: "MIGRATED_ERR_TRANSPORT",
        MIGRATED_ERR_PROTOCOL: "MIGRATED_ERR_PROTOCOL", MIGRATED_ERR_VERIFY: "MIGRATED_ERR_VERIFY",
        MIGRATED_ERR_CANCELLED: "MIGRATED_ERR_CANCELLED", MIGRATED_ERR_NOT_CONVERGED: "MIGRATED_ERR_NOT_CONVERGED",
        MIGRATED_ERR_SNAPSHOT: "MIGRATED_ERR_SNAPSHOT", MIGRATED_ERR_STATE: "MIGRATED_ERR_STATE",
    ]
    let name: StaticString = code >= 0 ? names[migrated_error(rawValue: UInt32(code))] ?? "unknown" : "unknown"
    return UnsafeRawPointer(name.utf8Start).assumingMemoryBound(to: CChar.self)
}
