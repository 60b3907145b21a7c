// Loopback throughput of one Transport channel: plain TCP, Unix socket, and TLS 1.3 with each cipher suite.
// A sender thread and a receiver thread move `--gib` GiB per run; the median of `--runs` runs is printed.
// Usage: transport-bench [--gib N] [--runs N] [--streams N] [--buffer-kib N] [--socket-buffer-kib N] [--only TEXT]
import Foundation
import Glibc
import Transport

/// The command line; parsed once, before any thread starts.
struct Settings {
    var gib = 2.0, runs = 5, streams = 1, bufferSize = 1 << 20, socketBuffer: Int? = nil, only: String? = nil

    init(_ arguments: ArraySlice<String>) {
        var arguments = arguments.makeIterator()
        while let flag = arguments.next() {
            guard let value = arguments.next() else { fatalError("\(flag) needs a value") }
            if flag == "--only" { only = value; continue } // runs the cases whose name contains the text
            guard let number = Double(value) else { fatalError("\(flag) needs a number") }
            switch flag {
            case "--gib": gib = number
            case "--runs": runs = Int(number)
            case "--streams": streams = Int(number)
            case "--buffer-kib": bufferSize = Int(number) * 1024
            case "--socket-buffer-kib": socketBuffer = Int(number) * 1024
            default: fatalError("unknown flag \(flag)")
            }
        }
    }
}
let settings = Settings(CommandLine.arguments.dropFirst())
let (gib, runs, streams, bufferSize, socketBuffer, only) =
    (settings.gib, settings.runs, settings.streams, settings.bufferSize, settings.socketBuffer, settings.only)
let totalBytes = Int(gib * Double(1 << 30)) / bufferSize * bufferSize

/// A CA and two leaf certificates, made with the openssl CLI as an operator would.
let certificates: String = {
    let path = NSTemporaryDirectory() + "transport-bench-\(getpid())"
    let script = """
    set -e; mkdir -p '\(path)'; cd '\(path)'
    key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null; }
    key ca; openssl req -x509 -new -key ca.key -subj /CN=ca -days 2 -out ca.pem
    for name in sender receiver; do
        key $name; openssl req -new -key $name.key -subj /CN=$name -out $name.csr
        echo "subjectAltName=DNS:$name.bench" > $name.ext
        openssl x509 -req -in $name.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile $name.ext -out $name.pem 2>/dev/null
    done
    """
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/bin/sh")
    process.arguments = ["-c", script]
    try! process.run()
    process.waitUntilExit()
    precondition(process.terminationStatus == 0, "openssl failed")
    return path
}()

func tls(_ name: String, peer: String, suite: String) -> Security {
    var configuration = TLSConfiguration(caFile: "\(certificates)/ca.pem", certificateFile: "\(certificates)/\(name).pem",
                                         keyFile: "\(certificates)/\(name).key", allowedPeerNames: ["\(peer).bench"])
    configuration.cipherSuites = suite
    return .tls(configuration)
}

/// CPU seconds of the calling thread. The machine is shared, so wall-clock GB/s depends on what else runs;
/// CPU seconds per GB on each side do not, and give the rate each side could sustain with a core of its own.
func threadCPUSeconds() -> Double {
    var time = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &time)
    return Double(time.tv_sec) + Double(time.tv_nsec) / 1e9
}

/// One run: `streams` connections, each with a sender thread writing its share of `totalBytes` in
/// `bufferSize` sends and a receiver thread reading them with receive(exactly:). Timed from the first send to
/// the last byte received; CPU is summed over the threads of each side.
func run(endpoint: Endpoint, server: Security, client: Security, pages: Bool) throws -> (gbPerSecond: Double, sender: Double, receiver: Double) {
    var options = ChannelOptions()
    options.sendBufferSize = socketBuffer
    options.receiveBufferSize = socketBuffer
    let listener = try Listener(endpoint: endpoint, security: server, options: options)
    let receivers = Slot<[any Channel]>([])
    let accepted = DispatchSemaphore(value: 0)
    Thread.detachNewThread {
        receivers.value = (0 ..< streams).map { _ in try! listener.accept() }
        accepted.signal()
    }
    let senders = try (0 ..< streams).map { _ in try connect(to: listener.endpoint, security: client, options: options) }
    accepted.wait()

    let sendBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: 4096)
    defer { sendBuffer.deallocate() }
    var generator = SystemRandomNumberGenerator() // incompressible, as encrypted or random guest pages are
    for offset in stride(from: 0, to: bufferSize, by: 8) { sendBuffer.storeBytes(of: generator.next() as UInt64, toByteOffset: offset, as: UInt64.self) }
    // The engine's shape: a 32-byte header before each 4 KiB page, sent as one vectored batch per buffer.
    let header = UnsafeMutableRawBufferPointer.allocate(byteCount: 32, alignment: 8)
    defer { header.deallocate() }
    let batch = Slot(stride(from: 0, to: bufferSize, by: 4096).flatMap { offset in
        [UnsafeRawBufferPointer(header), UnsafeRawBufferPointer(rebasing: sendBuffer[offset ..< offset + 4096])]
    })
    let whole = Slot(UnsafeRawBufferPointer(sendBuffer))
    let sendsPerStream = totalBytes / bufferSize / streams
    let bytesPerSend = bufferSize + (pages ? 32 * (bufferSize / 4096) : 0)

    let senderCPU = Slot([Double](repeating: 0, count: streams)), receiverCPU = Slot([Double](repeating: 0, count: streams))
    let lock = NSLock()
    let finished = DispatchSemaphore(value: 0)
    let start = ContinuousClock.now
    for stream in 0 ..< streams {
        Thread.detachNewThread {
            let cpuStart = threadCPUSeconds()
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytesPerSend, alignment: 4096)
            for _ in 0 ..< sendsPerStream { try! receivers.value[stream].receive(exactly: buffer) }
            buffer.deallocate()
            lock.withLock { receiverCPU.value[stream] = threadCPUSeconds() - cpuStart }
            finished.signal()
        }
        Thread.detachNewThread {
            let cpuStart = threadCPUSeconds()
            for _ in 0 ..< sendsPerStream {
                if pages { try! senders[stream].send(batch.value) } else { try! senders[stream].send(whole.value) }
            }
            lock.withLock { senderCPU.value[stream] = threadCPUSeconds() - cpuStart }
            finished.signal()
        }
    }
    for _ in 0 ..< 2 * streams { finished.wait() }
    let (seconds, attoseconds) = (ContinuousClock.now - start).components
    let gigabytes = Double(sendsPerStream * streams * bufferSize) / 1e9
    let elapsed = Double(seconds) + Double(attoseconds) / 1e18
    return (gigabytes / elapsed, senderCPU.value.reduce(0, +) / gigabytes, receiverCPU.value.reduce(0, +) / gigabytes)
}

/// Hands a value from one thread to another; the semaphores around its use order the accesses.
final class Slot<T>: @unchecked Sendable {
    var value: T
    init(_ value: T) { self.value = value }
}

func median(_ values: [Double]) -> Double { values.sorted()[values.count / 2] }

let socketPath = NSTemporaryDirectory() + "transport-bench-\(getpid()).sock"
let loopback = Endpoint.tcp(host: "127.0.0.1", port: 0)
let aes128 = "TLS_AES_128_GCM_SHA256", aes256 = "TLS_AES_256_GCM_SHA384", chacha = "TLS_CHACHA20_POLY1305_SHA256"
let cases: [(String, Endpoint, Security, Security, Bool)] = [
    ("plain TCP", loopback, .plaintext, .plaintext, false),
    ("Unix socket", .unix(path: socketPath), .plaintext, .plaintext, false),
    ("TLS 1.3 AES-128-GCM, TCP", loopback, tls("receiver", peer: "sender", suite: aes128), tls("sender", peer: "receiver", suite: aes128), false),
    ("TLS 1.3 AES-256-GCM, TCP", loopback, tls("receiver", peer: "sender", suite: aes256), tls("sender", peer: "receiver", suite: aes256), false),
    ("TLS 1.3 ChaCha20-Poly1305, TCP", loopback, tls("receiver", peer: "sender", suite: chacha), tls("sender", peer: "receiver", suite: chacha), false),
    ("TLS 1.3 AES-128-GCM, Unix socket", .unix(path: socketPath), tls("receiver", peer: "sender", suite: aes128), tls("sender", peer: "receiver", suite: aes128), false),
    ("plain TCP, header+page batches", loopback, .plaintext, .plaintext, true),
    ("TLS 1.3 AES-128-GCM, TCP, header+page batches", loopback, tls("receiver", peer: "sender", suite: aes128), tls("sender", peer: "receiver", suite: aes128), true),
]

print("kernel TLS: \(KernelTLS.probe().map { "not available (\($0))" } ?? "available")")
print("\(streams) stream(s), \(gib) GiB per run, \(bufferSize / 1024) KiB sends, socket buffers \(socketBuffer.map { "\($0 / 1024) KiB" } ?? "auto"), median of \(runs) runs")
print("| transport | GB/s of payload | sender CPU s/GB | receiver CPU s/GB | GB/s with a core per side |")
print("|---|---|---|---|---|")
for (name, endpoint, server, client, pages) in cases where only.map(name.contains) ?? true {
    var rates: [Double] = [], senders: [Double] = [], receivers: [Double] = []
    for _ in 0 ..< runs {
        let (rate, sender, receiver) = try run(endpoint: endpoint, server: server, client: client, pages: pages)
        rates.append(rate)
        senders.append(sender)
        receivers.append(receiver)
    }
    let (sender, receiver) = (median(senders), median(receivers))
    func f(_ value: Double) -> String { String(format: "%.2f", value) }
    print("| \(name) | \(f(median(rates))) | \(f(sender)) | \(f(receiver)) | \(f(1 / max(sender, receiver))) |")
}
try? FileManager.default.removeItem(atPath: certificates)
