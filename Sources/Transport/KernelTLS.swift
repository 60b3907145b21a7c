import Glibc
import LinuxSystem

/// Whether the kernel can take over TLS record encryption (kTLS) on a TCP socket.
public enum KernelTLS {
    /// Attaches the "tls" upper-layer protocol to a connected loopback TCP socket, which is the first thing
    /// OpenSSL does when it turns kTLS on. Returns nil when that works, or the kernel's refusal.
    /// ENOENT means the kernel has no TLS module (CONFIG_TLS off, or the module not loadable).
    public static func probe() -> SystemError? {
        do {
            let listener = try Listener(endpoint: .tcp(host: "127.0.0.1", port: 0), security: .plaintext)
            let client = try connect(to: listener.endpoint, security: .plaintext) as! SocketChannel
            _ = try listener.accept()
            let name = "tls"
            let fd = client.socket.rawValue
            try systemCall("setsockopt TCP_ULP tls") { setsockopt(fd, Int32(IPPROTO_TCP), TCP_ULP, name, socklen_t(name.utf8.count)) }
            return nil
        } catch let error as SystemError {
            return error
        } catch {
            return SystemError("kTLS probe: \(error)", errno: EIO)
        }
    }
}
