import Foundation

/// Reads the conformance vectors written by `python -m ios_bridge.vectors` (see ios_bridge/vectors/common.py):
/// from `MINICPM_VECTORS` when set, else `<repo>/out/vectors`.
enum Vectors {
    static var root: URL {
        if let dir = ProcessInfo.processInfo.environment["MINICPM_VECTORS"], !dir.isEmpty {
            return URL(fileURLWithPath: dir)
        }
        // Tests/MiniCPMKitTests/Vectors.swift -> the repository root is four levels up.
        return URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("out/vectors")
    }

    struct Missing: Error, CustomStringConvertible {
        let path: String
        var description: String {
            "no conformance vectors at \(path): run `python -m ios_bridge.vectors --out DIR` and set MINICPM_VECTORS=DIR"
        }
    }

    /// The case files (`*.json`) of one family, sorted by name.
    static func cases(_ family: String) throws -> [URL] {
        let dir = root.appendingPathComponent(family)
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: dir.path) else {
            throw Missing(path: dir.path)
        }
        let cases = names.filter { $0.hasSuffix(".json") }.sorted().map { dir.appendingPathComponent($0) }
        if cases.isEmpty { throw Missing(path: dir.path) }
        return cases
    }

    /// A case file as a JSON object.
    static func load(_ url: URL) throws -> [String: Any] {
        let data = try Data(contentsOf: url)
        guard let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw Missing(path: url.path)
        }
        return object
    }

    /// An array reference `{"array", "dtype", "shape"}` beside `caseURL`, as Float / Int64 / UInt8 values.
    static func floats(_ ref: Any?, near caseURL: URL) throws -> [Float] {
        let (data, dtype) = try raw(ref, near: caseURL)
        switch dtype {
        case "float32": return data.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
        case "float16": return data.withUnsafeBytes { $0.bindMemory(to: UInt16.self).map { Float(Float16(bitPattern: $0)) } }
        default: throw Missing(path: "float array of dtype \(dtype)")
        }
    }

    static func int64s(_ ref: Any?, near caseURL: URL) throws -> [Int64] {
        let (data, dtype) = try raw(ref, near: caseURL)
        switch dtype {
        case "int64": return data.withUnsafeBytes { Array($0.bindMemory(to: Int64.self)) }
        case "int32": return data.withUnsafeBytes { $0.bindMemory(to: Int32.self).map { Int64($0) } }
        default: throw Missing(path: "integer array of dtype \(dtype)")
        }
    }

    static func bytes(_ ref: Any?, near caseURL: URL) throws -> [UInt8] {
        let (data, _) = try raw(ref, near: caseURL)
        return [UInt8](data)
    }

    static func shape(_ ref: Any?) -> [Int] {
        ((ref as? [String: Any])?["shape"] as? [Int]) ?? []
    }

    private static func raw(_ ref: Any?, near caseURL: URL) throws -> (Data, String) {
        guard let ref = ref as? [String: Any], let file = ref["array"] as? String, let dtype = ref["dtype"] as? String
        else { throw Missing(path: "array reference in \(caseURL.lastPathComponent)") }
        let url = caseURL.deletingLastPathComponent().appendingPathComponent(file)
        return (try Data(contentsOf: url), dtype)
    }
}
