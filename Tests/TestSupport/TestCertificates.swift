import Foundation
import Transport

/// Certificates for tests, made with the openssl CLI once per test run, in a temporary directory:
/// a CA and the certificates it signs (server, client, an expired client, a client whose name is not allowed,
/// a client with a CN and no subjectAltName), and a second CA nobody trusts with a client certificate of its own.
public enum TestCertificates {
    /// The directory holding the certificates; made on first use, and again if something removed it.
    public static var directory: String {
        lock.lock()
        defer { lock.unlock() }
        if !FileManager.default.fileExists(atPath: path + "/rogue.pem") { generate() }
        return path
    }

    private static let lock = NSLock()
    private static let path: String = {
        let path = NSTemporaryDirectory() + "migrated-test-certificates-\(getpid())"
        // Remove them when the test process ends: a C function pointer, so it captures nothing.
        atexit { try? FileManager.default.removeItem(atPath: NSTemporaryDirectory() + "migrated-test-certificates-\(getpid())") }
        return path
    }()

    private static func generate() {
        let script = """
        set -e
        mkdir -p '\(path)' && cd '\(path)'
        key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null; }
        ca() { key "$1"; openssl req -x509 -new -key "$1.key" -subj "/CN=$1" -days 30 -out "$1.pem"; }
        # leaf NAME CA DAYS CN [SAN]: DAYS -1 gives a notAfter one day before now, an expired certificate
        leaf() {
            key "$1"
            openssl req -new -key "$1.key" -subj "/CN=$4" -out "$1.csr"
            if [ -n "$5" ]; then echo "subjectAltName=$5" > "$1.ext"; else : > "$1.ext"; fi
            openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial -days "$3" -extfile "$1.ext" -out "$1.pem" 2>/dev/null
        }
        ca ca
        ca rogue-ca
        leaf server ca 30 server DNS:server.migrated.test,DNS:localhost
        leaf client ca 30 client DNS:client.migrated.test
        leaf expired ca -1 expired DNS:client.migrated.test
        leaf stranger ca 30 stranger DNS:stranger.migrated.test,DNS:other.migrated.test
        leaf cn-only ca 30 cnonly.migrated.test
        leaf rogue rogue-ca 30 rogue DNS:client.migrated.test
        """
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", script]
        try! process.run()
        process.waitUntilExit()
        precondition(process.terminationStatus == 0, "openssl failed to make the test certificates")
    }

    public static let serverNames = ["server.migrated.test"]
    public static let clientNames = ["client.migrated.test", "cnonly.migrated.test"]

    /// TLS settings for `name`'s certificate, trusting `ca`, accepting `allowed` peers.
    public static func tls(_ name: String, ca: String = "ca", allowed: [String]) -> Security {
        .tls(TLSConfiguration(caFile: "\(directory)/\(ca).pem", certificateFile: "\(directory)/\(name).pem",
                              keyFile: "\(directory)/\(name).key", allowedPeerNames: allowed))
    }

    public static var server: Security { tls("server", allowed: clientNames) }
    public static func client(_ name: String = "client") -> Security { tls(name, allowed: serverNames) }
}
