import Foundation
import Testing
@testable import MiniCPMKit

@Suite("EmbeddingTable")
struct EmbeddingTableTests {
    static var export: URL { Vectors.root.appendingPathComponent("traces/export") }

    /// A copy of the trace export whose manifest and table `edit` may change (loaded without hashing).
    static func copy(_ edit: (URL, inout [String: Any]) throws -> Void) throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("embedding-\(UUID().uuidString)")
        try FileManager.default.copyItem(at: export, to: dir)
        let url = dir.appendingPathComponent("manifest.json")
        var manifest = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
        try edit(dir, &manifest)
        try JSONSerialization.data(withJSONObject: manifest).write(to: url)
        return dir
    }

    @Test("rows are the file's float32 values times the scale")
    func lookup() throws {
        let manifest = try Manifest.load(directory: Self.export, verify: false)
        let table = try EmbeddingTable(manifest: manifest)
        #expect(table.vocabSize == manifest.model.vocabSize && table.hiddenSize == manifest.model.hiddenSize)
        let raw = try Data(contentsOf: manifest.url(of: "token_embedding"))
        let floats = raw.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
        let h = table.hiddenSize
        #expect(try table.embed([5, 0, 5], scale: 1) == Array(floats[5 * h..<6 * h] + floats[0..<h] + floats[5 * h..<6 * h]))
        #expect(try table.embed([7], scale: 12) == floats[7 * h..<8 * h].map { $0 * 12 })
        #expect(throws: MiniCPMError.invalidInput("token id \(table.vocabSize) is outside the \(table.vocabSize)-token embedding table")) {
            try table.embed([table.vocabSize], scale: 1)
        }
    }

    @Test("a table of the wrong size is refused as the Python runtime refuses it")
    func sizeCheck() throws {
        let dir = try Self.copy { dir, _ in
            let url = dir.appendingPathComponent("token_embedding.bin")
            try Data(try Data(contentsOf: url).dropLast(4)).write(to: url)
        }
        defer { try? FileManager.default.removeItem(at: dir) }
        let manifest = try Manifest.load(directory: dir, verify: false)
        let shape = manifest.artifacts["token_embedding"]!.shape!
        #expect(throws: MiniCPMError.invalidExport("\(manifest.directory.path): token_embedding (token_embedding.bin) does "
                                                   + "not hold the [\(shape[0]), \(shape[1])] float32 table the manifest describes")) {
            try EmbeddingTable(manifest: manifest)
        }
    }

    @Test("a float16 table reads the half values exactly")
    func float16() throws {
        let dir = try Self.copy { dir, manifest in
            let url = dir.appendingPathComponent("token_embedding.bin")
            let floats = try Data(contentsOf: url).withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
            let halves = floats.map { HalfFloat.bits($0).littleEndian }
            try halves.withUnsafeBytes { Data($0) }.write(to: url)
            var artifacts = manifest["artifacts"] as! [String: Any]
            var entry = artifacts["token_embedding"] as! [String: Any]
            entry["dtype"] = "float16"
            artifacts["token_embedding"] = entry
            manifest["artifacts"] = artifacts
        }
        defer { try? FileManager.default.removeItem(at: dir) }
        let half = try EmbeddingTable(manifest: try Manifest.load(directory: dir, verify: false))
        let full = try EmbeddingTable(manifest: try Manifest.load(directory: Self.export, verify: false))
        #expect(half.dtype == "float16")
        #expect(try half.embed([3, 9], scale: 2) == (try full.embed([3, 9], scale: 1)).map { HalfFloat.round($0) * 2 })
    }

    @Test("a bfloat16 table reads the upper halves of the float32 values exactly")
    func bfloat16() throws {
        let dir = try Self.copy { dir, manifest in
            let url = dir.appendingPathComponent("token_embedding.bin")
            let floats = try Data(contentsOf: url).withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
            let upper = floats.map { UInt16($0.bitPattern >> 16).littleEndian }  // truncation: exact bfloat16 values
            try upper.withUnsafeBytes { Data($0) }.write(to: url)
            var artifacts = manifest["artifacts"] as! [String: Any]
            var entry = artifacts["token_embedding"] as! [String: Any]
            entry["dtype"] = "bfloat16"
            artifacts["token_embedding"] = entry
            manifest["artifacts"] = artifacts
        }
        defer { try? FileManager.default.removeItem(at: dir) }
        let brain = try EmbeddingTable(manifest: try Manifest.load(directory: dir, verify: false))
        let full = try EmbeddingTable(manifest: try Manifest.load(directory: Self.export, verify: false))
        #expect(brain.dtype == "bfloat16")
        let truncated = (try full.embed([3, 9], scale: 1)).map { Float(bitPattern: $0.bitPattern & 0xffff_0000) * 2 }
        #expect(try brain.embed([3, 9], scale: 2) == truncated)
    }

    @Test("float16 conversion: every half value round-trips, floats round to nearest even")
    func halfConversion() {
        for bits in UInt16.min...UInt16.max where (bits & 0x7c00) != 0x7c00 || (bits & 0x3ff) == 0 {
            #expect(HalfFloat.bits(HalfFloat.float(bits)) == bits)
        }
        #expect(HalfFloat.float(0x3c00) == 1 && HalfFloat.float(0xc000) == -2 && HalfFloat.float(0x0001) == 0x1p-24)
        #expect(HalfFloat.round(1 + 0x1p-11) == 1)  // a tie rounds to even
        #expect(HalfFloat.round(1 + 0x1p-11 + 0x1p-20) == 1 + 0x1p-10)
        #expect(HalfFloat.round(65520) == .infinity && HalfFloat.round(65519) == 65504)
        #expect(HalfFloat.round(0x1p-25) == 0 && HalfFloat.round(0x1.8p-25) == 0x1p-24)
        #expect(HalfFloat.float(HalfFloat.bits(-1e30)) == -.infinity)
    }
}
