import Foundation
import Glibc
import KVMBackend
import LinuxSystem

/// The file `microvm run --save-to` writes and `microvm restore` reads: a paused VM's machine state and RAM,
/// so that another process can carry it on. Layout (little-endian), specified in protocol/microvm-save.md:
///
///     0   8  magic "MVMSAVE1"
///     8   4  version (1)
///     12  4  vCPU count
///     16  8  memory size in bytes
///     24  8  offset of the machine state (protocol/kvm-state.md)
///     32  8  length of the machine state
///     40  8  offset of guest RAM, 4 KiB aligned; RAM is stored raw, as a sparse file region
///     48  8  FNV-1a 64 of bytes 0..<48 and of the machine state
///
/// It is written to a temporary name, synced, then renamed, so a crash never leaves a partial file under the
/// final name. Guest RAM carries no checksum here: that is the job of the snapshot format.
public enum MicroVMSaveFile {
    static let magic = Array("MVMSAVE1".utf8)
    static let version: UInt32 = 1
    static let headerSize = 56
    static let maximumStateLength = 64 << 20

    public static func write(_ machine: MicroVM, to path: String) throws {
        let state = MachineStateEncoding.encode(try machine.captureState())
        let stateOffset = UInt64(headerSize)
        let memoryOffset = (stateOffset + UInt64(state.count) + UInt64(pageSize) - 1) / UInt64(pageSize) * UInt64(pageSize)
        var header: [UInt8] = []
        header += magic
        appendLittleEndian(version, to: &header)
        appendLittleEndian(UInt32(machine.vcpus.count), to: &header)
        appendLittleEndian(machine.memory.size, to: &header)
        appendLittleEndian(stateOffset, to: &header)
        appendLittleEndian(UInt64(state.count), to: &header)
        appendLittleEndian(memoryOffset, to: &header)
        appendLittleEndian(fnv1a64(header + state), to: &header)

        let temporary = path + ".partial"
        let file = try OwnedFileDescriptor(opening: temporary, flags: O_WRONLY | O_CREAT | O_TRUNC)
        do {
            try header.withUnsafeBytes { try file.write(all: $0, at: 0) }
            try state.withUnsafeBytes { try file.write(all: $0, at: Int64(stateOffset)) }
            // Only the parts of RAM the guest ever touched are copied; the rest stays a hole in the file.
            for range in try machine.memory.dataRanges() {
                let bytes = UnsafeRawBufferPointer(start: machine.memory.mapping.base + Int(range.lowerBound), count: range.count)
                try file.write(all: bytes, at: Int64(memoryOffset) + range.lowerBound)
            }
            try file.truncate(to: Int64(memoryOffset + machine.memory.size))
            try file.sync()
            try systemCall("rename \(temporary) to \(path)") { rename(temporary, path) }
        } catch {
            unlink(temporary)
            throw error
        }
    }

    public static func restore(from path: String, console: SerialConsole,
                               dirtyTracking: DirtyTrackingMethod = .bitmap) throws -> MicroVM {
        let file = try OwnedFileDescriptor(opening: path, flags: O_RDONLY)
        let fileSize = try file.size()
        var header = [UInt8](repeating: 0, count: headerSize)
        guard fileSize >= Int64(headerSize) else { throw SaveFileError(path, "\(fileSize) bytes is too short for a header") }
        try header.withUnsafeMutableBytes { try file.read(all: $0, at: 0) }
        guard Array(header[0 ..< 8]) == magic else { throw SaveFileError(path, "not a MicroVM save file (bad magic)") }
        let fileVersion: UInt32 = littleEndian(header, 8)
        guard fileVersion == version else { throw SaveFileError(path, "version \(fileVersion) is not supported (this build reads \(version))") }
        let vcpuCount: UInt32 = littleEndian(header, 12)
        let memorySize: UInt64 = littleEndian(header, 16)
        let stateOffset: UInt64 = littleEndian(header, 24)
        let stateLength: UInt64 = littleEndian(header, 32)
        let memoryOffset: UInt64 = littleEndian(header, 40)
        let checksum: UInt64 = littleEndian(header, 48)
        guard stateLength <= UInt64(maximumStateLength), stateOffset >= UInt64(headerSize),
              stateOffset + stateLength <= memoryOffset, memoryOffset % UInt64(pageSize) == 0,
              memorySize <= GuestMemory.maximumSize, memoryOffset + memorySize == UInt64(fileSize) else {
            throw SaveFileError(path, "inconsistent layout (state \(stateOffset)+\(stateLength), memory \(memoryOffset)+\(memorySize), file \(fileSize) bytes)")
        }
        var state = [UInt8](repeating: 0, count: Int(stateLength))
        try state.withUnsafeMutableBytes { try file.read(all: $0, at: Int64(stateOffset)) }
        guard fnv1a64(Array(header[0 ..< 48]) + state) == checksum else { throw SaveFileError(path, "header or machine state checksum mismatch") }
        let machineState = try MachineStateEncoding.decode(state)

        guard machineState.vcpus.count == Int(vcpuCount) else {
            throw SaveFileError(path, "header says \(vcpuCount) vCPUs, the machine state holds \(machineState.vcpus.count)")
        }
        let memory = try GuestMemory(size: memorySize)
        // The file holds the memfd's image: each data range goes straight into the memfd, without faulting in and
        // zero-filling guest pages through the mapping first.
        for range in try file.dataRanges(from: Int64(memoryOffset), below: fileSize) {
            try memory.file.copy(Int(range.count), from: file, at: range.lowerBound, to: range.lowerBound - Int64(memoryOffset))
        }
        return try MicroVM(restoring: machineState, memory: memory,
                           configuration: MicroVMConfiguration(memorySize: memorySize, dirtyTracking: dirtyTracking, console: console))
    }
}

public struct SaveFileError: Error, CustomStringConvertible {
    public let path: String
    public let reason: String
    init(_ path: String, _ reason: String) {
        self.path = path
        self.reason = reason
    }
    public var description: String { "\(path): \(reason)" }
}

func littleEndian<T: FixedWidthInteger>(_ bytes: [UInt8], _ offset: Int) -> T {
    bytes[offset ..< offset + MemoryLayout<T>.size].reversed().reduce(T(0)) { $0 << 8 | T($1) }
}

/// FNV-1a, 64 bits: enough to catch a damaged header or state blob; not a defence against tampering.
func fnv1a64(_ bytes: [UInt8]) -> UInt64 {
    bytes.reduce(0xCBF2_9CE4_8422_2325) { ($0 ^ UInt64($1)) &* 0x100_0000_01B3 }
}
