// swift-tools-version: 6.0
// MiniCPMKit: runs a minicpm-mobile export (manifest.json + graphs) on iPhone, iPad and Mac.
// MiniCPMKit is pure Swift (it builds and is tested on Linux); MiniCPMCoreML and minicpm-chat compile their Core ML
// code only where Core ML exists.
import PackageDescription

let package = Package(
    name: "MiniCPMKit",
    platforms: [.iOS(.v18), .macOS(.v15)],
    products: [
        .library(name: "MiniCPMKit", targets: ["MiniCPMKit"]),
        .library(name: "MiniCPMCoreML", targets: ["MiniCPMCoreML"]),
        .executable(name: "minicpm-chat", targets: ["minicpm-chat"]),
    ],
    targets: [
        .target(name: "MiniCPMKit"),
        .target(name: "MiniCPMCoreML", dependencies: ["MiniCPMKit"]),
        .executableTarget(name: "minicpm-chat", dependencies: ["MiniCPMKit", "MiniCPMCoreML"]),
        .testTarget(name: "MiniCPMKitTests", dependencies: ["MiniCPMKit"]),
    ]
)
