// swift-tools-version:6.0
// migrated: live migration and snapshots for virtual machines.
// Layering (lower rows never import higher ones) is described in ARCHITECTURE.md:
//   C shims -> LinuxSystem -> KVMBackend -> MicroVM -> executables
//   CZstd/CLZ4 -> PageCodec;  MigrationWire (no platform dependencies)
import PackageDescription

let package = Package(
    name: "migrated",
    products: [
        .library(name: "KVMBackend", targets: ["KVMBackend"]),
        .library(name: "MicroVM", targets: ["MicroVM"]),
        .library(name: "MigrationWire", targets: ["MigrationWire"]),
        .library(name: "PageCodec", targets: ["PageCodec"]),
        .library(name: "Transport", targets: ["Transport"]),
        .library(name: "MigrationEngine", targets: ["MigrationEngine"]),
        .library(name: "KVMMigration", targets: ["KVMMigration"]),
        .library(name: "Snapshots", targets: ["Snapshots"]),
        .executable(name: "vmsnap", targets: ["vmsnap"]),
        .executable(name: "snapshot-bench", targets: ["SnapshotBench"]),
        .executable(name: "microvm", targets: ["MicroVMCLI"]),
        .executable(name: "kvm-bench", targets: ["KVMBench"]),
        .executable(name: "migration-bench", targets: ["MigrationBench"]),
        .executable(name: "xen-bench", targets: ["XenBench"]),
        .executable(name: "migrated", targets: ["migrated"]),
        .executable(name: "migratectl", targets: ["migratectl"]),
        // The engine for VMMs written in C, C++ or Rust, through include/migrated.h: built as libmigrated-c.so (the
        // name libmigrated is the daemon's executable's here), installed as libmigrated.so.1 (its soname) by
        // scripts/install.
        .library(name: "migrated-c", type: .dynamic, targets: ["MigratedCABI"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        // The daemon's control API: HTTP/1.1 over a Unix socket, server and client, with no further dependencies.
        .package(url: "https://github.com/swhitty/FlyingFox", from: "0.27.1"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        // The daemon's lifecycle: signals become a graceful shutdown of its services.
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        // `swift package generate-documentation` (scripts/docs): API documentation of the library modules.
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
    ],
    targets: [
        // System libraries, from Debian's -dev packages.
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CLZ4", pkgConfig: "liblz4", providers: [.apt(["liblz4-dev"])]),
        .systemLibrary(name: "COpenSSL", pkgConfig: "openssl", providers: [.apt(["libssl-dev"])]),
        // Thin C wrappers for <linux/kvm.h> ioctls, whose request numbers are macros Swift cannot import.
        .target(name: "CKVM"),

        .target(name: "LinuxSystem", dependencies: ["CKVM", "Threads"]),
        .target(name: "KVMBackend", dependencies: ["CKVM", "LinuxSystem", "Threads"]),
        .target(name: "MicroVM", dependencies: ["KVMBackend", "LinuxSystem", "Threads"]),
        .executableTarget(name: "MicroVMCLI", dependencies: [
            "MicroVM", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        .target(name: "MigrationWire"),
        .target(name: "Threads"),
        .target(name: "CPageCodec"),
        .target(name: "PageCodec", dependencies: ["CZstd", "CLZ4", "CPageCodec"]),
        .executableTarget(name: "CodecBench", dependencies: ["PageCodec", "MigrationWire"], path: "bench/codec"),

        .executableTarget(name: "KVMBench", dependencies: ["MicroVM"], path: "bench/kvm"),
        .executableTarget(name: "MigrationBench", dependencies: ["KVMMigration", "MigrationNetwork", "Threads", "Transport"], path: "bench/migration",
                          exclude: ["postcopy_table.py", "results"]),

        .target(name: "MigrationEngine", dependencies: ["MigrationWire", "PageCodec", "LinuxSystem", "Threads"]),
        .target(name: "KVMMigration", dependencies: ["MigrationEngine", "MicroVM"]),
        .target(name: "Snapshots", dependencies: ["MigrationEngine", "MigrationWire", "PageCodec", "LinuxSystem", "Threads"]),
        .executableTarget(name: "vmsnap", dependencies: [
            "Snapshots", "KVMMigration", "MicroVM", "MigratedAPI", "XenAdapter", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .executableTarget(name: "SnapshotBench", dependencies: ["Snapshots", "KVMMigration", "MicroVM"], path: "bench/snapshot",
                          exclude: ["results", "side_by_side.py"]),
        .target(name: "MigrationNetwork", dependencies: ["MigrationEngine", "Transport"]),
        .target(name: "XenAdapter", dependencies: ["MigrationEngine", "MigrationWire", "KVMBackend", "Threads"]),
        .executableTarget(name: "XenBench", dependencies: ["XenAdapter", "KVMMigration", "MicroVM", "Snapshots"], path: "bench/xen"),

        .target(name: "TestSupport", dependencies: ["KVMBackend", "MicroVM", "Transport", "MigratedAPI", "Threads"], path: "Tests/TestSupport"),
        .testTarget(name: "KVMBackendTests", dependencies: ["KVMBackend", "MicroVM", "TestSupport"]),
        .testTarget(name: "MicroVMTests", dependencies: ["MicroVM", "MicroVMCLI", "TestSupport", "Threads"]),
        .testTarget(name: "MigrationEngineTests", dependencies: ["MigrationEngine", "KVMMigration", "MigrationNetwork", "TestSupport"]),
        .testTarget(name: "MigrationWireTests", dependencies: ["MigrationWire"]),
        .testTarget(name: "PageCodecTests", dependencies: ["PageCodec"]),
        .testTarget(name: "SnapshotTests", dependencies: ["Snapshots", "KVMMigration", "MicroVM", "MigrationWire", "PageCodec", "TestSupport"]),
        .testTarget(name: "XenAdapterTests", dependencies: ["XenAdapter", "KVMMigration", "MicroVM", "Snapshots", "TestSupport", "vmsnap"]),
        .target(name: "NetworkAddress"),
        .target(name: "Transport", dependencies: ["COpenSSL", "LinuxSystem", "NetworkAddress"]),
        .testTarget(name: "TransportTests", dependencies: ["Transport", "LinuxSystem", "TestSupport", "Threads"]),
        .executableTarget(name: "TransportBench", dependencies: ["Transport"], path: "bench/transport"),

        // The daemon and its client. MigratedAPI holds the control API's JSON types and the Unix-socket client,
        // so migratectl links neither KVM nor the engine.
        .target(name: "MigratedAPI", dependencies: ["NetworkAddress", .product(name: "FlyingFox", package: "FlyingFox")]),
        .target(name: "MigratedDaemon", dependencies: [
            "MigratedAPI", "MicroVM", "KVMBackend", "KVMMigration", "MigrationEngine", "MigrationNetwork", "MigrationWire", "Snapshots",
            "Threads", "Transport",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "migrated", dependencies: [
            "MigratedDaemon", "CKVM", .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        ]),
        .executableTarget(name: "migratectl", dependencies: [
            "MigratedAPI", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        // The C ABI: include/migrated.h (imported through CMigratedABI's module map) implemented over the seams.
        .systemLibrary(name: "CMigratedABI"),
        .target(name: "MigratedCABI", dependencies: [
            "CMigratedABI", "MigrationEngine", "MigrationNetwork", "MigrationWire", "Snapshots", "KVMBackend", "LinuxSystem",
            "Transport", "NetworkAddress", "Threads",
        ], exclude: ["exports.map"], linkerSettings: [.unsafeFlags([
            "-Xlinker", "-soname=libmigrated.so.1", "-Xlinker", "--version-script=Sources/MigratedCABI/exports.map", "-static-stdlib",
            // Foundation's own static dependencies, which -static-stdlib names for executables only.
            "-Xlinker", "--start-group", "-lFoundationInternationalization", "-lFoundationEssentials", "-lCoreFoundation",
            "-l_FoundationICU", "-l_FoundationCollections", "-l_FoundationCShims", "-Xlinker", "--end-group",
        ])]),
        // C programs built against the installed library (scripts/install), as a VMM builds: no Swift module of the
        // library is linked into these tests.
        .testTarget(name: "CABITests", dependencies: ["TestSupport", "MigratedDaemon", "MigratedAPI"]),
        // `migrated` is built beside the tests, which run it as a process of its own where a daemon must be killed.
        .testTarget(name: "MigratedDaemonTests", dependencies: ["MigratedDaemon", "MigratedAPI", "TestSupport", "migrated", "migratectl", "vmsnap"]),
    ],
    swiftLanguageModes: [.v6]
)
