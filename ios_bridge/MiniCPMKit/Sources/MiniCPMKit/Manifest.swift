// manifest.json of an export directory: decoded, validated and verified like runtime/manifest.py `read_manifest`.
import Foundation

/// Why an export directory was refused: one line, worded like the Python runtime's UserError.
public enum ManifestError: Error, CustomStringConvertible, Sendable, Equatable {
    case noManifest(directory: String)
    case invalidJSON(path: String, reason: String)
    case unsupportedVersion(String)
    case invalid(at: String, reason: String)
    case unknownArtifact(step: String, artifact: String)
    case absolutePath(String)
    case escapingPath(String)
    case missing(directory: String, artifact: String, path: String)
    case unreadable(directory: String, artifact: String, path: String, reason: String)
    case mismatch(directory: String, artifact: String, path: String)

    public var description: String {
        switch self {
        case .noManifest(let dir): return "\(dir): no manifest.json (not an export directory)"
        case .invalidJSON(let path, let reason): return "\(path): invalid JSON (\(reason))"
        case .unsupportedVersion(let v):
            return "manifest schema_version \(v) is not supported (this runtime reads \(Manifest.schemaVersion))"
        case .invalid(let at, let reason): return "manifest.json is invalid at \(at): \(reason)"
        case .unknownArtifact(let step, let artifact):
            return "manifest.json: schedule step '\(step)' names unknown artifact '\(artifact)'"
        case .absolutePath(let p):
            return "manifest path '\(p)' is absolute; artifact paths must stay inside the export directory"
        case .escapingPath(let p): return "manifest path '\(p)' escapes the export directory"
        case .missing(let dir, let name, let path): return "\(dir): artifact '\(name)' is missing (\(path))"
        case .unreadable(let dir, let name, let path, let reason):
            return "\(dir): artifact '\(name)' (\(path)) cannot be read (\(reason))"
        case .mismatch(let dir, let name, let path):
            return "\(dir): artifact '\(name)' (\(path)) does not match its sha256 in manifest.json (modified or corrupt)"
        }
    }
}

/// The export directory's contract (runtime/manifest.schema.json, schema_version 1).
public struct Manifest: Decodable, Sendable {
    public static let schemaVersion = 1

    public struct Model: Decodable, Sendable {
        public let name: String
        public let source: String?
        public let variant: String
        public let version: Double
        public let hiddenSize: Int
        public let vocabSize: Int
        public let numLayers: Int
        public let dtype: String
        enum CodingKeys: String, CodingKey {
            case name, source, variant, version, dtype
            case hiddenSize = "hidden_size", vocabSize = "vocab_size", numLayers = "num_layers"
        }
    }

    /// A tensor dimension: a fixed size or a symbolic name (ONNX dynamic axes).
    public enum Dimension: Decodable, Sendable, Equatable {
        case fixed(Int), symbolic(String)
        public init(from decoder: Decoder) throws {
            let c = try decoder.singleValueContainer()
            if let n = try? c.decode(Int.self) { self = .fixed(n) } else { self = .symbolic(try c.decode(String.self)) }
        }
    }

    public struct Tensor: Decodable, Sendable {
        public let name: String
        public let shape: [Dimension]
        public let dtype: String
    }

    public struct Artifact: Decodable, Sendable {
        public let path: String
        public let sha256: String
        public let size: Int?
        public let format: String
        public let inputs: [Tensor]?
        public let outputs: [Tensor]?
        public let dtype: String?
        public let shape: [Int]?
    }

    public struct File: Decodable, Sendable {
        public let path: String
        public let sha256: String
        public let size: Int?
    }

    public struct TokenizerInfo: Decodable, Sendable {
        public let files: [String]
        public let chatTemplate: String
        public let specialTokens: [String: Int]
        public let stopIDs: [Int]
        enum CodingKeys: String, CodingKey {
            case files, chatTemplate = "chat_template", specialTokens = "special_tokens", stopIDs = "stop_ids"
        }
    }

    public struct KVCache: Decodable, Sendable {
        public let layers: Int
        public let kvHeads: Int
        public let headDim: Int
        public let shape: [Int]
        public let dtype: String
        /// What `past_keys / past_values` carry: "all" max_context slots (absent: older exports) or only the
        /// "filled" ones (ONNX: the graph's cache axis is dynamic).
        public let slots: String?
        /// True when the host passes only the filled slots.
        public var filledSlots: Bool { slots == "filled" }
        enum CodingKeys: String, CodingKey {
            case layers, shape, dtype, slots, kvHeads = "kv_heads", headDim = "head_dim"
        }
    }

    public struct Step: Decodable, Sendable {
        public let artifact: String
        public let tokens: Int?
        public let function: String?
        /// The step takes any T from `minTokens` to `tokens` (absent: always `tokens`).
        public let minTokens: Int?
        enum CodingKeys: String, CodingKey { case artifact, tokens, function, minTokens = "min_tokens" }
    }

    public struct Schedule: Decodable, Sendable {
        public let prefillChunk: Int
        public let maxContext: Int
        public let onContextFull: String
        public let kvCache: KVCache
        public let promptEmbeddingScale: Double
        public let generatedEmbeddingScale: Double
        public let steps: [String: Step]
        public let defaultSampling: [String: JSONValue]
        /// `schedule.coreml` / `schedule.coreai` of Core ML / Core AI exports (compute units, the state layout).
        public let coreml: JSONValue?
        public let coreai: JSONValue?
        enum CodingKeys: String, CodingKey {
            case steps, coreml, coreai
            case prefillChunk = "prefill_chunk", maxContext = "max_context", onContextFull = "on_context_full"
            case kvCache = "kv_cache", promptEmbeddingScale = "prompt_embedding_scale"
            case generatedEmbeddingScale = "generated_embedding_scale", defaultSampling = "default_sampling"
        }
    }

    public struct Quantization: Decodable, Sendable {
        public let method: String
        public let bits: Int?
        public let groupSize: Int?
        public let symmetric: Bool?
        public let layers: Int?
        public let int8Layers: Int?
        public let lmHead: String?
        public let recordsFrom: String?
        public let format: String?
        public let accuracyLevel: Int?
        enum CodingKeys: String, CodingKey {
            case method, bits, symmetric, layers, format
            case groupSize = "group_size", int8Layers = "int8_layers", lmHead = "lm_head"
            case recordsFrom = "records_from", accuracyLevel = "accuracy_level"
        }
    }

    public let schemaVersion: Int
    public let generator: String?
    public let format: String
    public let model: Model
    public let artifacts: [String: Artifact]
    public let files: [File]
    public let tokenizer: TokenizerInfo
    /// Decoded by ImageProcessor's `Preprocessing` (it accepts the snake_case keys itself).
    public let preprocessing: Preprocessing
    public let schedule: Schedule
    public let quantization: Quantization
    public let parity: [String: Double]?
    /// The export directory this manifest was loaded from (symlinks resolved).
    public private(set) var directory = URL(fileURLWithPath: "/")

    enum CodingKeys: String, CodingKey {
        case schemaVersion = "schema_version"
        case generator, format, model, artifacts, files, tokenizer, preprocessing, schedule, quantization, parity
    }

    /// The location of artifact `name` inside the export directory.
    public func url(of artifact: String) -> URL {
        directory.appendingPathComponent(artifacts[artifact]?.path ?? artifact)
    }

    /// Reads `directory/manifest.json`, checks it (version, types, steps, paths) and, with `verify`, the sha256
    /// of every artifact and file. Throws one `ManifestError` for the first problem.
    public static func load(directory: URL, verify: Bool = true) throws -> Manifest {
        let root = directory.standardizedFileURL.resolvingSymlinksInPath()
        let path = root.appendingPathComponent("manifest.json")
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path.path, isDirectory: &isDir), !isDir.boolValue else {
            throw ManifestError.noManifest(directory: directory.path)
        }
        let data: Data
        let object: Any
        do {
            data = try Data(contentsOf: path)
            object = try JSONSerialization.jsonObject(with: data)
        } catch {
            throw ManifestError.invalidJSON(path: path.path, reason: String("\(error.localizedDescription)".prefix(200)))
        }
        guard let dict = object as? [String: Any] else {
            throw ManifestError.invalidJSON(path: path.path, reason: "the manifest must be a JSON object")
        }
        // Checked before the types: a future schema may change them, and its version is the real reason.
        struct VersionProbe: Decodable { let schema_version: Int? }  // swiftlint:disable:this identifier_name
        let probe = try? JSONDecoder().decode(VersionProbe.self, from: data)
        guard probe?.schema_version == schemaVersion else {
            throw ManifestError.unsupportedVersion(dict["schema_version"].map { "\($0)" } ?? "None")
        }
        var manifest: Manifest
        do {
            manifest = try JSONDecoder().decode(Manifest.self, from: data)
        } catch let error as DecodingError {
            throw describe(error)
        }
        manifest.directory = root
        for name in manifest.schedule.steps.keys.sorted() {
            let step = manifest.schedule.steps[name]!
            if manifest.artifacts[step.artifact] == nil {
                throw ManifestError.unknownArtifact(step: name, artifact: step.artifact)
            }
        }
        var entries = manifest.artifacts.keys.sorted().map { ($0, manifest.artifacts[$0]!.path, manifest.artifacts[$0]!.sha256) }
        entries += manifest.files.map { ($0.path, $0.path, $0.sha256) }
        let targets = try entries.map { try safeURL(root: root, relative: $0.1) }
        for ((name, relative, sha256), target) in zip(entries, targets) {
            guard FileManager.default.fileExists(atPath: target.path) else {
                throw ManifestError.missing(directory: directory.path, artifact: name, path: relative)
            }
            guard verify else { continue }
            let digest: String
            do { digest = try SHA256Hasher.path(target) } catch {
                throw ManifestError.unreadable(directory: directory.path, artifact: name, path: relative,
                                               reason: error.localizedDescription)
            }
            if digest != sha256 {
                throw ManifestError.mismatch(directory: directory.path, artifact: name, path: relative)
            }
        }
        return manifest
    }

    /// `root/relative`, refusing absolute paths, NUL bytes and anything that leaves `root` (`..`, symlinks).
    static func safeURL(root: URL, relative: String) throws -> URL {
        if relative.hasPrefix("/") || relative.hasPrefix("\\") { throw ManifestError.absolutePath(relative) }
        if relative.contains("\0") { throw ManifestError.escapingPath(relative) }
        let target = root.appendingPathComponent(relative).standardizedFileURL.resolvingSymlinksInPath()
        let inside = root.pathComponents
        guard target.pathComponents.count > inside.count, Array(target.pathComponents.prefix(inside.count)) == inside
        else { throw ManifestError.escapingPath(relative) }
        return target
    }

    private static func describe(_ error: DecodingError) -> ManifestError {
        func at(_ path: [CodingKey]) -> String {
            path.isEmpty ? "(top level)" : path.map { $0.intValue.map(String.init) ?? $0.stringValue }.joined(separator: "/")
        }
        switch error {
        case .typeMismatch(let type, let c): return .invalid(at: at(c.codingPath), reason: "expected \(type)")
        case .valueNotFound(let type, let c): return .invalid(at: at(c.codingPath), reason: "expected \(type), got null")
        case .keyNotFound(let key, let c):
            return .invalid(at: at(c.codingPath), reason: "'\(key.stringValue)' is a required property")
        case .dataCorrupted(let c): return .invalid(at: at(c.codingPath), reason: c.debugDescription)
        @unknown default: return .invalid(at: "(top level)", reason: "\(error)")
        }
    }
}
