// swift-tools-version: 6.0
// MiniCPMKit: runs a minicpm-mobile export (manifest.json + graphs) on iPhone, iPad and Mac.
// MiniCPMKit is pure Swift (it builds and is tested on Linux); MiniCPMCoreML, MiniCPMCoreAI and minicpm-chat compile
// their Core ML / Core AI code only where those frameworks exist.
import PackageDescription

let package = Package(
    name: "MiniCPMKit",
    platforms: [.iOS(.v18), .macOS(.v15)],
    products: [
        .library(name: "MiniCPMKit", targets: ["MiniCPMKit"]),
        .library(name: "MiniCPMCoreML", targets: ["MiniCPMCoreML"]),
        .library(name: "MiniCPMCoreAI", targets: ["MiniCPMCoreAI"]),
        .executable(name: "minicpm-chat", targets: ["minicpm-chat"]),
    ],
    targets: [
        .target(name: "MiniCPMKit"),
        .target(name: "MiniCPMCoreML", dependencies: ["MiniCPMKit"]),
        .target(name: "MiniCPMCoreAI", dependencies: ["MiniCPMKit"]),
        .executableTarget(name: "minicpm-chat", dependencies: ["MiniCPMKit", "MiniCPMCoreML", "MiniCPMCoreAI"]),
        .testTarget(name: "MiniCPMKitTests", dependencies: ["MiniCPMKit"]),
    ]
)
