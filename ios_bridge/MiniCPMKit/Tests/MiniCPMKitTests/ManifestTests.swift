import Foundation
import Testing
@testable import MiniCPMKit

@Suite("Manifest SHA-256")
struct ManifestSHA256Tests {
    @Test("known vectors (FIPS 180-4 / NIST)")
    func knownVectors() {
        #expect(SHA256Hasher.hex(Data()) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(SHA256Hasher.hex(Data("abc".utf8)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(SHA256Hasher.hex(Data("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8))
                == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        #expect(SHA256Hasher.hex(Data(repeating: UInt8(ascii: "a"), count: 1_000_000))
                == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
    }

    @Test("streamed file digest equals the in-memory one across 1 MiB blocks")
    func fileDigest() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let bytes = Data((0..<(3 << 20) + 17).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) })
        let url = dir.appendingPathComponent("blob")
        try bytes.write(to: url)
        #expect(try SHA256Hasher.file(url) == SHA256Hasher.hex(bytes))
    }

    @Test("directory digest equals runtime.manifest.sha256_tree for the same files")
    func treeDigest() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        // Same bytes as the Python fixture; "a.b" sorts before "a/b" ('.' < '/'), "Data" before "a".
        var model = Data()
        for _ in 0..<5 { model.append(Data((0...255).map { UInt8($0) })) }
        let files: [(String, Data)] = [
            ("a.b", Data("dot".utf8)), ("a/b", Data("slash".utf8)), ("Data/model.mlmodel", model),
            ("Manifest.json", Data("{}".utf8)), ("empty", Data()),
            ("z/y/x.bin", Data(repeating: UInt8(ascii: "a"), count: 3_000_000)),
        ]
        for (name, data) in files { try write(data, to: dir.appendingPathComponent(name)) }
        // .venv/bin/python: runtime.manifest.sha256_tree over exactly these files.
        #expect(try SHA256Hasher.tree(dir) == "739040a0941cb7f7dd8f0779f7c99fdaab86a3b0aa9c44f12b2ee2cd8c8f5985")
        #expect(try SHA256Hasher.path(dir) == SHA256Hasher.tree(dir))
        try write(Data("dot!".utf8), to: dir.appendingPathComponent("a.b"))
        #expect(try SHA256Hasher.tree(dir) != "739040a0941cb7f7dd8f0779f7c99fdaab86a3b0aa9c44f12b2ee2cd8c8f5985")
    }
}

@Suite("Manifest load")
struct ManifestLoadTests {
    static var export: URL { Vectors.root.appendingPathComponent("manifest/export") }

    @Test("the real tiny-minicpm-v-4 ONNX export loads and verifies, as the Python reader saw it")
    func realExport() throws {
        let caseURL = try #require(try Vectors.cases("manifest").first)
        let expected = try Vectors.load(caseURL)
        let manifest = try Manifest.load(directory: Self.export)
        #expect(manifest.schemaVersion == 1)
        #expect(manifest.format == expected["format"] as? String)
        #expect(manifest.artifacts.keys.sorted() == expected["artifacts"] as? [String])
        #expect(manifest.schedule.steps.mapValues(\.artifact) == expected["steps"] as? [String: String])
        #expect(manifest.schedule.maxContext == expected["max_context"] as? Int)
        #expect(manifest.tokenizer.stopIDs == expected["stop_ids"] as? [Int])
        #expect(manifest.model.name == expected["model"] as? String)
        #expect(manifest.preprocessing.patchSize > 0 && manifest.preprocessing.mean.count == 3)
        #expect(manifest.schedule.kvCache.layers == manifest.model.numLayers)
        let llm = manifest.url(of: "llm")
        #expect(llm.lastPathComponent == manifest.artifacts["llm"]?.path)
        #expect(FileManager.default.fileExists(atPath: llm.path))
        #expect(try SHA256Hasher.file(llm) == manifest.artifacts["llm"]?.sha256)
    }

    @Test("a changed artifact byte is refused")
    func tampered() throws {
        let dir = try copyExport()
        defer { try? FileManager.default.removeItem(at: dir) }
        let url = dir.appendingPathComponent("token_embedding.bin")
        var bytes = try Data(contentsOf: url)
        bytes[bytes.count / 2] ^= 0x01
        try bytes.write(to: url)
        #expect(refusal(dir) == "\(dir.path): artifact 'token_embedding' (token_embedding.bin) does not match its "
                + "sha256 in manifest.json (modified or corrupt)")
        #expect(throws: Never.self) { try Manifest.load(directory: dir, verify: false) }
    }

    @Test("a missing artifact is refused, with or without verification")
    func missing() throws {
        let dir = try copyExport()
        defer { try? FileManager.default.removeItem(at: dir) }
        try FileManager.default.removeItem(at: dir.appendingPathComponent("vision.onnx"))
        #expect(refusal(dir) == "\(dir.path): artifact 'vision' is missing (vision.onnx)")
        #expect(refusal(dir, verify: false) == "\(dir.path): artifact 'vision' is missing (vision.onnx)")
    }

    @Test("paths leaving the export directory are refused", arguments: [
        ("../x", "manifest path '../x' escapes the export directory"),
        ("a/../../x", "manifest path 'a/../../x' escapes the export directory"),
        ("/etc/passwd", "manifest path '/etc/passwd' is absolute; artifact paths must stay inside the export directory"),
        ("outside/passwd", "manifest path 'outside/passwd' escapes the export directory"),
    ])
    func escaping(path: String, message: String) throws {
        let dir = try copyExport()
        defer { try? FileManager.default.removeItem(at: dir) }
        // A symlink inside the directory that points out of it: resolved before the check.
        try FileManager.default.createSymbolicLink(atPath: dir.appendingPathComponent("outside").path,
                                                   withDestinationPath: "/etc")
        try edit(dir) { m in
            var artifacts = m["artifacts"] as! [String: Any]
            var llm = artifacts["llm"] as! [String: Any]
            llm["path"] = path
            artifacts["llm"] = llm
            m["artifacts"] = artifacts
        }
        #expect(refusal(dir) == message)
    }

    @Test("schema_version 99 is refused")
    func unknownVersion() throws {
        let dir = try copyExport()
        defer { try? FileManager.default.removeItem(at: dir) }
        try edit(dir) { $0["schema_version"] = 99 }
        #expect(refusal(dir) == "manifest schema_version 99 is not supported (this runtime reads 1)")
    }

    @Test("no manifest, broken JSON, wrong types and unknown step artifacts are refused")
    func malformed() throws {
        let dir = try copyExport()
        defer { try? FileManager.default.removeItem(at: dir) }
        let empty = dir.appendingPathComponent("empty")
        try FileManager.default.createDirectory(at: empty, withIntermediateDirectories: true)
        #expect(refusal(empty) == "\(empty.path): no manifest.json (not an export directory)")

        let original = try Data(contentsOf: dir.appendingPathComponent("manifest.json"))
        try Data("{\"schema_version\": 1,".utf8).write(to: dir.appendingPathComponent("manifest.json"))
        #expect(refusal(dir)?.hasPrefix("\(dir.path)/manifest.json: invalid JSON (") == true)

        try original.write(to: dir.appendingPathComponent("manifest.json"))
        try edit(dir) { m in
            var schedule = m["schedule"] as! [String: Any]
            schedule["max_context"] = "256"
            m["schedule"] = schedule
        }
        #expect(refusal(dir) == "manifest.json is invalid at schedule/max_context: expected Int")

        try original.write(to: dir.appendingPathComponent("manifest.json"))
        try edit(dir) { m in
            var schedule = m["schedule"] as! [String: Any]
            var steps = schedule["steps"] as! [String: Any]
            steps["decode"] = ["artifact": "nope"]
            schedule["steps"] = steps
            m["schedule"] = schedule
        }
        #expect(refusal(dir) == "manifest.json: schedule step 'decode' names unknown artifact 'nope'")
    }

    @Test("a directory artifact is verified with the tree digest")
    func directoryArtifact() throws {
        let dir = try copyExport()
        defer { try? FileManager.default.removeItem(at: dir) }
        let package = dir.appendingPathComponent("llm.mlpackage")
        try write(Data("spec".utf8), to: package.appendingPathComponent("Data/model.mlmodel"))
        try write(Data("weights".utf8), to: package.appendingPathComponent("Data/weights/weight.bin"))
        let digest = try SHA256Hasher.tree(package)
        try edit(dir) { m in
            var artifacts = m["artifacts"] as! [String: Any]
            artifacts["package"] = ["path": "llm.mlpackage", "sha256": digest, "format": "mlpackage"]
            m["artifacts"] = artifacts
        }
        #expect(throws: Never.self) { try Manifest.load(directory: dir) }
        try write(Data("weights?".utf8), to: package.appendingPathComponent("Data/weights/weight.bin"))
        #expect(refusal(dir) == "\(dir.path): artifact 'package' (llm.mlpackage) does not match its sha256 in "
                + "manifest.json (modified or corrupt)")
    }

    private func copyExport() throws -> URL {
        let dir = try temporaryDirectory().appendingPathComponent("export")
        try FileManager.default.copyItem(at: Self.export, to: dir)
        return dir.resolvingSymlinksInPath()
    }

    private func edit(_ dir: URL, _ change: (inout [String: Any]) -> Void) throws {
        let url = dir.appendingPathComponent("manifest.json")
        var object = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
        change(&object)
        try JSONSerialization.data(withJSONObject: object).write(to: url)
    }

    private func refusal(_ dir: URL, verify: Bool = true) -> String? {
        do {
            _ = try Manifest.load(directory: dir, verify: verify)
            return nil
        } catch {
            return "\(error)"
        }
    }
}

private func temporaryDirectory() throws -> URL {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("manifest-test-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    return dir
}

private func write(_ data: Data, to url: URL) throws {
    try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
    try data.write(to: url)
}
