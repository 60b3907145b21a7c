/// The I/O ports MicroVM emulates itself; everything else in the platform (PIC, IOAPIC, LAPIC, PIT) is KVM's.
public enum Ports {
    /// 8250 UART, COM1: transmit holding register and the registers a driver pokes around it.
    public static let serial: ClosedRange<UInt16> = 0x3F8 ... 0x3FF
    /// One-byte writes end the guest with that byte as its exit code (QEMU's isa-debug-exit at iobase 0xf4).
    public static let debugExit: UInt16 = 0xF4
    /// 32-bit writes hand a value to the VMM and wait for it to return: tests synchronise with the guest here.
    public static let sync: UInt16 = 0x600
}

/// The guest's own verdict, as the guest kit's exit codes define it (guest/README.md).
public enum GuestExitCode: UInt8, CustomStringConvertible, Sendable {
    case pass = 0x10
    case verificationFailed = 0x11
    case cpuFault = 0x12
    case badCommandLine = 0x13

    public var description: String {
        switch self {
        case .pass: "pass"
        case .verificationFailed: "memory verification failed"
        case .cpuFault: "CPU fault in the guest"
        case .badCommandLine: "bad command line or workload does not fit"
        }
    }
}

/// The parts of an 8250 UART that a transmit-only driver needs: the divisor latch must not be mistaken for
/// data, and the line status must say the transmitter is empty.
struct SerialPort {
    private var lineControl: UInt8 = 0
    private var scratch: [UInt8] = Array(repeating: 0, count: 8)
    private var divisorLatchAccess: Bool { lineControl & 0x80 != 0 }

    /// Returns the byte to transmit, if the write was one.
    mutating func write(offset: UInt16, value: UInt8) -> UInt8? {
        switch offset {
        case 0 where !divisorLatchAccess: return value
        case 3: lineControl = value
        default: scratch[Int(offset)] = value
        }
        return nil
    }

    func read(offset: UInt16) -> UInt8 {
        switch offset {
        case 2: 0x01           // interrupt identification: none pending
        case 3: lineControl
        case 5: 0x60           // line status: transmitter holding register and shift register empty
        case 6: 0xB0           // modem status: CTS, DSR, DCD
        default: scratch[Int(offset)]
        }
    }
}
