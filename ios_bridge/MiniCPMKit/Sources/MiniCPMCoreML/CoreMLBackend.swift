// The Core ML backend of MiniCPMKit (runtime/backends/coreml_backend.py CoreMLBackend, call for call): `vision.mlpackage` one slice
// per call (its `video` function one frame group per call), `llm.mlpackage`'s `prefill` / `decode` functions sharing
// one MLState per conversation. Thin on purpose: every testable decision lives in MiniCPMKit's Session.
#if canImport(CoreML)
import CoreML
import Foundation
import MiniCPMKit

/// Runs a Core ML export (iOS 18 / macOS 15). Packages are compiled on first use and cached by their sha256 in
/// the caches directory, so later launches load in milliseconds.
public final class CoreMLBackend: Backend, @unchecked Sendable {  // called by one Session actor, one call at a time
    public let name = "coreml"
    public let ownsCache = true
    private let vision: MLModel
    private let video: MLModel?
    private let functions: [Int: MLModel]  // tokens per call -> prefill (chunk) or decode (1)
    private let floatType: MLMultiArrayDataType
    private var state: MLState

    /// Loads the export `manifest` describes; `computeUnits` overrides the manifest's choice for every package.
    public init(manifest: Manifest, computeUnits: MLComputeUnits? = nil) async throws {
        guard manifest.format == "coreml" else {
            throw MiniCPMError.invalidExport("CoreMLBackend runs Core ML exports; this is a \(manifest.format) export")
        }
        let steps = manifest.schedule.steps
        func load(_ step: String) async throws -> MLModel {
            guard let spec = steps[step], let entry = manifest.artifacts[spec.artifact] else {
                throw MiniCPMError.invalidExport("manifest.json has no \(step) step")
            }
            let config = MLModelConfiguration()
            config.computeUnits = computeUnits ?? Self.units(manifest, artifact: spec.artifact)
            if let function = spec.function, function != "main" || step == "video" { config.functionName = function }
            let compiled = try await Self.compiled(manifest.url(of: spec.artifact), sha256: entry.sha256)
            do {
                return try MLModel(contentsOf: compiled, configuration: config)
            } catch {
                throw MiniCPMError.backend("Core ML cannot load \(entry.path) (\(spec.function ?? "main")): \(error.localizedDescription)")
            }
        }
        vision = try await load("vision")
        video = steps["video"] == nil ? nil : try await load("video")
        let prefill = try await load("prefill"), decode = try await load("decode")
        functions = [manifest.schedule.prefillChunk: prefill, 1: decode]
        floatType = manifest.model.dtype == "float16" ? .float16 : .float32
        state = decode.makeState()
    }

    public func reset() throws { state = functions[1]!.makeState() }  // zeroed state: a new conversation

    public func vision(_ inputs: VisionInputs) async throws -> Tensor<Float> { try await perItem(vision, inputs) }

    public func video(_ inputs: VisionInputs) async throws -> Tensor<Float> {
        guard let video else { throw MiniCPMError.invalidInput("this export has no video function") }
        return try await perItem(video, inputs)
    }

    public func llm(_ inputs: LLMInputs) async throws -> LLMOutputs {
        let tokens = inputs.inputsEmbeds.shape[1]
        guard let model = functions[tokens] else {
            throw MiniCPMError.backend("the Core ML LLM takes \(functions.keys.sorted()) tokens per call, got \(tokens)")
        }
        let features = try MLDictionaryFeatureProvider(dictionary: [
            "inputs_embeds": array(inputs.inputsEmbeds, floatType), "position_ids": array(inputs.positionIDs),
            "attention_mask": array(inputs.attentionMask, floatType), "last_index": array(inputs.lastIndex)])
        let out = try await model.prediction(from: features, using: state)
        return LLMOutputs(logits: try tensor(out, "logits"))
    }

    /// Vision-side packages take one row of the batch (a slice, or a frame group) per call.
    private func perItem(_ model: MLModel, _ inputs: VisionInputs) async throws -> Tensor<Float> {
        var parts: [Tensor<Float>] = []
        for item in inputs.items {
            let features = try MLDictionaryFeatureProvider(dictionary: [
                "pixel_values": array(item.pixelValues, floatType), "position_ids": array(item.positionIDs),
                "patch_mask": array(item.patchMask, floatType), "pos_embed": array(item.posEmbed, floatType)])
            parts.append(try tensor(try await model.prediction(from: features), "features"))
        }
        return .stacking(parts)
    }

    private func array(_ t: Tensor<Float>, _ type: MLMultiArrayDataType) throws -> MLMultiArray {
        let a = try MLMultiArray(shape: t.shape.map { NSNumber(value: $0) }, dataType: type)
        if type == .float16 {
            a.withUnsafeMutableBytes { p, _ in
                let bits = p.bindMemory(to: UInt16.self)
                for (i, x) in t.scalars.enumerated() { bits[i] = HalfFloat.bits(x) }
            }
        } else {
            a.withUnsafeMutableBufferPointer(ofType: Float.self) { p, _ in _ = p.initialize(from: t.scalars) }
        }
        return a
    }

    private func array(_ t: Tensor<Int64>) throws -> MLMultiArray {  // the packages take int32 ids
        let a = try MLMultiArray(shape: t.shape.map { NSNumber(value: $0) }, dataType: .int32)
        a.withUnsafeMutableBufferPointer(ofType: Int32.self) { p, _ in
            for (i, x) in t.scalars.enumerated() { p[i] = Int32(x) }
        }
        return a
    }

    private func tensor(_ out: MLFeatureProvider, _ name: String) throws -> Tensor<Float> {
        guard let a = out.featureValue(for: name)?.multiArrayValue else {
            throw MiniCPMError.backend("the Core ML package returned no \(name)")
        }
        var scalars = [Float](repeating: 0, count: a.count)
        if a.dataType == .float16 {
            a.withUnsafeBytes { p in
                let bits = p.bindMemory(to: UInt16.self)
                for i in 0..<a.count { scalars[i] = HalfFloat.float(bits[i]) }
            }
        } else {
            for i in 0..<a.count { scalars[i] = a[i].floatValue }
        }
        return Tensor(shape: a.shape.map(\.intValue), scalars: scalars)
    }

    private static func units(_ manifest: Manifest, artifact: String) -> MLComputeUnits {
        // schedule.coreml.compute_units: {"vision": "cpu_and_ne" | ..., "llm": "all" | ...}
        guard case .object(let coreml)? = manifest.schedule.coreml, case .object(let units)? = coreml["compute_units"],
              case .string(let choice)? = units[artifact] else { return .all }
        return ["cpu_only": .cpuOnly, "cpu_and_gpu": .cpuAndGPU, "cpu_and_ne": .cpuAndNeuralEngine][choice] ?? .all
    }

    /// `MLModel.compileModel` once per package content: the compiled `.mlmodelc` is kept under Caches by sha256.
    private static func compiled(_ package: URL, sha256: String) async throws -> URL {
        let caches = try FileManager.default.url(for: .cachesDirectory, in: .userDomainMask, appropriateFor: nil, create: true)
        let target = caches.appendingPathComponent("MiniCPMKit/\(sha256).mlmodelc")
        if FileManager.default.fileExists(atPath: target.path) { return target }
        let temporary = try await MLModel.compileModel(at: package)
        try FileManager.default.createDirectory(at: target.deletingLastPathComponent(), withIntermediateDirectories: true)
        try? FileManager.default.removeItem(at: target)
        try FileManager.default.moveItem(at: temporary, to: target)
        return target
    }
}
#endif
