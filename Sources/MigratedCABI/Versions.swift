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
    let name: StaticString = switch code {
    case Int32(MIGRATED_OK.rawValue): "MIGRATED_OK"
    case Int32(MIGRATED_ERR_INVALID_ARGUMENT.rawValue): "MIGRATED_ERR_INVALID_ARGUMENT"
    case Int32(MIGRATED_ERR_ABI_MISMATCH.rawValue): "MIGRATED_ERR_ABI_MISMATCH"
    case Int32(MIGRATED_ERR_SYSTEM.rawValue): "MIGRATED_ERR_SYSTEM"
    case Int32(MIGRATED_ERR_CALLBACK.rawValue): "MIGRATED_ERR_CALLBACK"
    case Int32(MIGRATED_ERR_TRANSPORT.rawValue): "MIGRATED_ERR_TRANSPORT"
    case Int32(MIGRATED_ERR_PROTOCOL.rawValue): "MIGRATED_ERR_PROTOCOL"
    case Int32(MIGRATED_ERR_VERIFY.rawValue): "MIGRATED_ERR_VERIFY"
    case Int32(MIGRATED_ERR_CANCELLED.rawValue): "MIGRATED_ERR_CANCELLED"
    case Int32(MIGRATED_ERR_NOT_CONVERGED.rawValue): "MIGRATED_ERR_NOT_CONVERGED"
    case Int32(MIGRATED_ERR_SNAPSHOT.rawValue): "MIGRATED_ERR_SNAPSHOT"
    case Int32(MIGRATED_ERR_STATE.rawValue): "MIGRATED_ERR_STATE"
    case Int32(MIGRATED_ERR_IN_DOUBT.rawValue): "MIGRATED_ERR_IN_DOUBT"
    default: "unknown"
    }
    return UnsafeRawPointer(name.utf8Start).assumingMemoryBound(to: CChar.self)
}
