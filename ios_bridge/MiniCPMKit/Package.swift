// swift-tools-version: 6.0
// MiniCPMKit: runs a minicpm-mobile export (manifest.json + graphs) on iPhone, iPad and Mac.
// Pure Swift: it builds and tests on Linux too. The Core ML backend, the Session and the chat tool come next.
import PackageDescription

let package = Package(
    name: "MiniCPMKit",
    platforms: [.iOS(.v18), .macOS(.v15)],
    products: [
        .library(name: "MiniCPMKit", targets: ["MiniCPMKit"]),
    ],
    targets: [
        .target(name: "MiniCPMKit"),
        .testTarget(name: "MiniCPMKitTests", dependencies: ["MiniCPMKit"]),
    ]
)
