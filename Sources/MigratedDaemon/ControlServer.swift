import Dispatch
import Foundation
import Glibc
import Logging
import Threads
import Transport

/// The control socket's HTTP/1.1 server: one thread per connection, each reading requests under `ControlLimits`
/// and handing them to the ControlAPI. Every request it cannot take is answered with the API's error document
/// and the connection closed, so a client always learns why.
///
/// Sendable: `listener` and `stopped` are guarded by `lock`; the other properties are immutable or Sendable.
final class ControlServer: @unchecked Sendable {
    private let socketPath: String
    private let limits: ControlLimits
    private let api: ControlAPI
    private let logger: Logger
    private let lock = NSLock()
    private var listener: Listener?
    private var stopped = false
    private let connections: ConnectionDeadlines
    private let acceptFailures = RefusalLog()

    init(socketPath: String, limits: ControlLimits, api: ControlAPI, logger: Logger) {
        self.socketPath = socketPath
        self.limits = limits
        self.api = api
        self.logger = logger
        connections = ConnectionDeadlines(limit: limits.connections)
    }

    var isListening: Bool { lock.withLock { listener != nil } }

    /// Binds the socket and serves it until `stop()` or until the calling task is cancelled.
    func run() async throws {
        let listener = try Listener(endpoint: .unix(path: socketPath), security: .plaintext, backlog: 512)
        let startable = lock.withLock { () -> Bool in
            guard !stopped else { return false }
            self.listener = listener
            return true
        }
        guard startable else { throw CancellationError() }
        let watchdog = connections.startWatchdog(every: limits.idleTimeout / 8)
        defer { watchdog.cancel() }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                startThread(named: "control-accept") { [self] in
                    acceptLoop(listener)
                    done.resume()
                }
            }
        } onCancel: {
            stop()
        }
        try Task.checkCancellation()
    }

    /// Stops accepting, and breaks every open connection.
    func stop() {
        let listener = lock.withLock { () -> Listener? in
            stopped = true
            return self.listener
        }
        listener?.close()
        connections.closeAll()
    }

    private func acceptLoop(_ listener: Listener) {
        while !lock.withLock({ stopped }) {
            let channel: any Channel
            do {
                channel = try listener.acceptConnection().establish()
            } catch {
                if lock.withLock({ stopped }) { break }
                // Out of descriptors (EMFILE) or a connection reset before accept: wait a little, carry on, and say
                // so once a window rather than on every try.
                if case .log(let suppressed) = acceptFailures.verdict(for: "accept") {
                    logger.warning("control socket: accept failed", metadata: ["error": "\(error)", "failed_unlogged_before": "\(suppressed)"])
                }
                usleep(50_000)
                continue
            }
            guard connections.admit(channel, deadline: .now + limits.idleTimeout) else {
                logger.warning("control socket: \(limits.connections) connections are open; refusing one more")
                let refusal = ControlError(503, "too_many_connections", "\(limits.connections) connections are open; try again later")
                api.countRefusal(refusal)
                send(ControlAPI.error(refusal), keepAlive: false, on: channel)
                channel.close()
                continue
            }
            // The connection's own frames are small; 500 of them must fit easily.
            startThread(named: "control-connection", stackSize: 256 << 10) { [self] in
                serve(channel)
                connections.remove(channel)
                channel.close()
            }
        }
    }

    /// Requests one after the other on one connection, until the client closes it, asks to, or errs.
    private func serve(_ channel: any Channel) {
        var reader = RequestReader(channel: channel, limits: limits)
        while true {
            connections.arm(channel, deadline: .now + limits.idleTimeout)
            let request: (head: HTTPRequestHead, body: Data)?
            do {
                request = try reader.next()
            } catch .refused(let error) {
                logger.debug("control socket: refused a request: \(error)")
                api.countRefusal(error)
                send(ControlAPI.error(error), keepAlive: false, on: channel)
                return
            } catch {
                return // the client went away, or the watchdog closed the connection
            }
            guard let request else { return }
            connections.arm(channel, deadline: nil) // a VM's boot or a migration's start takes what it takes
            let response = handle(request.head, body: request.body)
            connections.arm(channel, deadline: .now + limits.idleTimeout)
            guard send(response, keepAlive: request.head.keepAlive, on: channel), request.head.keepAlive else { return }
        }
    }

    /// Runs the async ControlAPI from this connection's own thread, which has nothing else to do meanwhile.
    private func handle(_ head: HTTPRequestHead, body: Data) -> ControlAPI.Response {
        let outcome = ResponseBox()
        let done = DispatchSemaphore(value: 0)
        Task { [api] in
            outcome.response = await api.handle(method: head.method, path: head.path, body: body)
            done.signal()
        }
        done.wait()
        return outcome.response!
    }

    @discardableResult
    private func send(_ response: ControlAPI.Response, keepAlive: Bool, on channel: any Channel) -> Bool {
        var head = "HTTP/1.1 \(response.status) \(Self.phrase(response.status))\r\n"
        head += "Content-Type: \(response.contentType)\r\nContent-Length: \(response.body.count)\r\n"
        for (name, value) in response.headers.sorted(by: { $0.key < $1.key }) { head += "\(name): \(value)\r\n" }
        head += keepAlive ? "\r\n" : "Connection: close\r\n\r\n"
        let bytes = Data(head.utf8) + response.body
        return bytes.withUnsafeBytes { buffer in
            do throws(TransportError) { try channel.send(buffer); return true } catch { return false }
        }
    }

    static func phrase(_ status: Int) -> String {
        switch status {
        case 200: "OK"
        case 201: "Created"
        case 202: "Accepted"
        case 400: "Bad Request"
        case 404: "Not Found"
        case 405: "Method Not Allowed"
        case 409: "Conflict"
        case 411: "Length Required"
        case 413: "Content Too Large"
        case 414: "URI Too Long"
        case 422: "Unprocessable Content"
        case 431: "Request Header Fields Too Large"
        case 501: "Not Implemented"
        case 503: "Service Unavailable"
        default: status < 500 ? "Client Error" : "Server Error"
        }
    }
}

/// The API's answer, from the task that made it to the connection's thread. Sendable because the task writes it
/// before it signals the semaphore the thread waits for, and the thread reads it only after.
private final class ResponseBox: @unchecked Sendable {
    var response: ControlAPI.Response?
}

/// Reads one request at a time from a connection, keeping what arrived past it (a pipelined request) for the
/// next. It never holds more than a head's limits plus one body plus one read.
struct RequestReader {
    enum Failure: Error {
        /// The request breaks the protocol or a limit: answer with this, then close.
        case refused(ControlError)
        case transport(TransportError)
    }

    let channel: any Channel
    let limits: ControlLimits
    private var buffer: [UInt8] = []

    init(channel: any Channel, limits: ControlLimits) {
        self.channel = channel
        self.limits = limits
    }

    /// The next request, or nil when the client closed the connection between requests.
    mutating func next() throws(Failure) -> (head: HTTPRequestHead, body: Data)? {
        var changed = true // what is left of the previous read may be a whole pipelined request
        while true {
            if changed {
                let parse: HTTPRequestHead.Parse
                do { parse = try HTTPRequestHead.parse(buffer, limits: limits) } catch { throw .refused(error) }
                if case .complete(let head, let headBytes) = parse {
                    while buffer.count < headBytes + head.contentLength {
                        guard try receive() > 0 else { throw .transport(.connectionClosed(expectedBytes: nil, receivedBytes: buffer.count)) }
                    }
                    let body = Data(buffer[headBytes..<headBytes + head.contentLength])
                    buffer.removeFirst(headBytes + head.contentLength)
                    return (head, body)
                }
            }
            let received = try receive()
            guard received > 0 else {
                if buffer.isEmpty { return nil }
                throw .transport(.connectionClosed(expectedBytes: nil, receivedBytes: buffer.count))
            }
            // Parsing again only when a line may have ended (or the limits are passed) keeps a client that sends
            // its head a byte at a time from making each byte cost a scan of everything before it.
            // A request line past its limit with no end in sight is refused at once, not when the head's are passed.
            changed = buffer.suffix(received).contains(0x0A) || buffer.count > limits.requestLineBytes + limits.headerSectionBytes
                || (buffer.count > limits.requestLineBytes && !buffer.contains(0x0A))
        }
    }

    /// Appends what the socket has; returns how much, 0 when the client ended the stream.
    private mutating func receive() throws(Failure) -> Int {
        var chunk = [UInt8](repeating: 0, count: 16 << 10)
        let received: Result<Int, TransportError> = chunk.withUnsafeMutableBytes { bytes in
            do throws(TransportError) { return .success(try channel.receive(into: bytes)) } catch { return .failure(error) }
        }
        let count: Int
        switch received {
        case .success(let value): count = value
        case .failure(let error): throw .transport(error)
        }
        buffer.append(contentsOf: chunk[..<count])
        return count
    }
}

/// The open connections, each with the time by which its current request (or answer) must be through. A timer
/// closes the late ones, which wakes their threads: a client that sends half a request and waits, or a byte
/// every few seconds, holds a thread for `idleTimeout` at most.
///
/// Sendable: `open` is guarded by `lock`; the channels in it are closed, from the timer, only through their own
/// thread-safe `close`.
final class ConnectionDeadlines: @unchecked Sendable {
    private let limit: Int
    private let lock = NSLock()
    private var open: [ObjectIdentifier: (channel: any Channel, deadline: ContinuousClock.Instant?)] = [:]

    init(limit: Int) { self.limit = limit }

    /// Registers a connection unless `limit` are open already.
    func admit(_ channel: any Channel, deadline: ContinuousClock.Instant) -> Bool {
        lock.withLock {
            guard open.count < limit else { return false }
            open[ObjectIdentifier(channel)] = (channel, deadline)
            return true
        }
    }

    func arm(_ channel: any Channel, deadline: ContinuousClock.Instant?) {
        lock.withLock { open[ObjectIdentifier(channel)]?.deadline = deadline }
    }

    func remove(_ channel: any Channel) {
        lock.withLock { _ = open.removeValue(forKey: ObjectIdentifier(channel)) }
    }

    func closeAll() {
        for channel in lock.withLock({ open.values.map(\.channel) }) { channel.close() }
    }

    func startWatchdog(every interval: Duration) -> any DispatchSourceTimer {
        let timer = DispatchSource.makeTimerSource(queue: .global())
        let period = max(0.01, min(0.5, Double(interval.components.seconds) + Double(interval.components.attoseconds) * 1e-18))
        timer.schedule(deadline: .now() + period, repeating: period)
        timer.setEventHandler { [self] in
            let now = ContinuousClock.now
            let late = lock.withLock { open.values.filter { $0.deadline.map { $0 <= now } ?? false }.map(\.channel) }
            for channel in late { channel.close() }
        }
        timer.resume()
        return timer
    }
}
