import CMigratedABI
import KVMBackend
import MigrationWire

/// The blobs a VMM adds in its save_devices callback (`migrated_device_list`).
final class DeviceList {
    private(set) var states: [DeviceState] = []
    /// Components the library writes itself, which the VMM may not add.
    let reserved: Set<UInt32>

    init(reserved: Set<UInt32>) { self.reserved = reserved }

    func add(component: UInt32, instance: UInt32, version: UInt32, bytes: UnsafeRawBufferPointer) throws {
        guard !reserved.contains(component) else {
            throw CABIError.invalid("component 0x\(String(component, radix: 16)) is written by the library in this mode")
        }
        guard bytes.count <= DeviceList.maximumBlobSize else {
            throw CABIError.invalid("a blob of \(bytes.count) bytes; at most \(DeviceList.maximumBlobSize)")
        }
        guard !states.contains(where: { $0.componentID == component && $0.instance == instance }) else {
            throw CABIError.invalid("component 0x\(String(component, radix: 16)) instance \(instance) was added already")
        }
        states.append(DeviceState(componentID: component, instance: instance, componentVersion: version, blob: ByteSlice(bytes)))
    }

    /// The stream's limit on one record (stream.md §8), less the device record's own header.
    static let maximumBlobSize = 16 << 20 - 64
}

/// The in-kernel machine state in the KVM modes: written by the library as the component MicroVM writes, so that
/// guests move between a VMM that links the library and the daemon's MicroVM.
enum KVMMachineComponent {
    static func capture(vm: KVMVirtualMachine, vcpus: [KVMVCPU]) throws -> DeviceState {
        let blob = MachineStateEncoding.encode(try MachineState.capture(vm: vm, vcpus: vcpus))
        return DeviceState(componentID: DeviceComponent.kvmVM, instance: 0, componentVersion: MachineStateEncoding.currentVersion,
                           blob: ByteSlice(blob))
    }

    /// Restores the one KVM machine state among `states` and returns the others.
    static func restore(_ states: [DeviceState], vm: KVMVirtualMachine, vcpus: [KVMVCPU]) throws -> [DeviceState] {
        let machines = states.filter { $0.componentID == DeviceComponent.kvmVM }
        guard machines.count == 1 else {
            throw CABIError(MIGRATED_ERR_PROTOCOL, "expected one KVM machine state in the device state, found \(machines.count)")
        }
        guard machines[0].componentVersion <= MachineStateEncoding.currentVersion else {
            throw CABIError(MIGRATED_ERR_PROTOCOL, "KVM machine state version \(machines[0].componentVersion) is newer than this library")
        }
        let state = try machines[0].blob.withUnsafeBytes { try MachineStateEncoding.decode($0) }
        try state.restore(vm: vm, vcpus: vcpus)
        return states.filter { $0.componentID != DeviceComponent.kvmVM }
    }
}

/// Hands blobs to the VMM's restore_devices as a C array: their bytes are copied into one buffer, which stays
/// valid during the call.
func withDeviceBlobs<R>(_ states: [DeviceState], _ body: (UnsafeBufferPointer<migrated_device_blob>) throws -> R) throws -> R {
    let storage = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, states.reduce(0) { $0 + $1.blob.count }), alignment: 16)
    defer { storage.deallocate() }
    var offset = 0
    let blobs = states.map { state in
        let start = storage.baseAddress! + offset
        state.blob.withUnsafeBytes { start.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        offset += state.blob.count
        return migrated_device_blob(component: state.componentID, instance: state.instance, version: state.componentVersion,
                                    reserved: 0, data: UnsafeRawPointer(start), size: state.blob.count)
    }
    return try blobs.withUnsafeBufferPointer(body)
}

@_cdecl("migrated_device_list_add")
public func migrated_device_list_add(_ list: OpaquePointer?, _ component: UInt32, _ instance: UInt32, _ version: UInt32,
                                     _ data: UnsafeRawPointer?, _ size: Int) -> Int32 {
    boundary {
        let list = try object(list, as: DeviceList.self, "list")
        guard data != nil || size == 0 else { throw CABIError.invalid("data is NULL but size is \(size)") }
        try list.add(component: component, instance: instance, version: version, bytes: UnsafeRawBufferPointer(start: data, count: size))
    }
}
