// The Core AI backend of MiniCPMKit (runtime/backends/coreai_backend.py CoreAIBackend, call for call): `vision.aimodel`'s `main`
// one slice per call (its `video` function one frame group per call), `llm.aimodel`'s `prefill` / `decode` with
// the KV cache as the functions' states, one set of state arrays per conversation shared by both functions.
// Thin on purpose: every testable decision lives in MiniCPMKit's Session. Core AI exists on iOS / macOS 27+ only;
// this file is written against the SDK documentation and is not compiled on the project's Linux machines (the
// same chain is proven there through the coreai-core Python runtime).
#if canImport(CoreAI)
import CoreAI
import Foundation
import MiniCPMKit

/// Runs a Core AI export (`python -m export.coreai`).
public final class CoreAIBackend: Backend, @unchecked Sendable {  // called by one Session actor, one call at a time
    public let name = "coreai"
    public let ownsCache = true
    private let vision: InferenceFunction
    private let video: InferenceFunction?
    private let functions: [Int: InferenceFunction]  // tokens per call -> prefill (chunk) or decode (1)
    private let stateNames: [String]
    private let stateShape: [Int]
    private let half: Bool
    private var states: [NDArray] = []

    /// Loads the assets the manifest's steps name (AIModel specialises each for this device on first load).
    public init(manifest: Manifest) async throws {
        guard manifest.format == "coreai" else {
            throw MiniCPMError.invalidExport("CoreAIBackend runs Core AI exports; this is a \(manifest.format) export")
        }
        let steps = manifest.schedule.steps
        var models: [String: AIModel] = [:]
        func function(_ step: String) async throws -> InferenceFunction {
            guard let spec = steps[step] else { throw MiniCPMError.invalidExport("manifest.json has no \(step) step") }
            if models[spec.artifact] == nil {
                models[spec.artifact] = try await AIModel(contentsOf: manifest.url(of: spec.artifact))
            }
            let name = spec.function ?? "main"
            guard let loaded = try models[spec.artifact]?.loadFunction(named: name) else {
                throw MiniCPMError.invalidExport("\(spec.artifact) has no function \(name)")
            }
            return loaded
        }
        vision = try await function("vision")
        video = steps["video"] == nil ? nil : try await function("video")
        functions = [manifest.schedule.prefillChunk: try await function("prefill"), 1: try await function("decode")]
        // schedule.coreai.state: {"names": [...], "shape": [...], "dtype": "float32" | "float16"}
        guard let state = manifest.schedule.coreai?.decodeState() else {
            throw MiniCPMError.invalidExport("manifest.json: schedule.coreai.state is missing")
        }
        (stateNames, stateShape, half) = (state.names, state.shape, state.dtype == "float16")
        try reset()
    }

    /// Fresh zeroed state arrays: a new conversation (masked slots contribute exact zeros; zeros keep them finite).
    public func reset() throws {
        let count = stateShape.reduce(1, *)
        states = stateNames.map { _ in
            half ? Self.halfArray([Float](repeating: 0, count: count), shape: stateShape)
                : NDArray(scalars: [Float](repeating: 0, count: count), shape: stateShape)
        }
    }

    public func vision(_ inputs: VisionInputs) async throws -> Tensor<Float> { try await perItem(vision, inputs) }

    public func video(_ inputs: VisionInputs) async throws -> Tensor<Float> {
        guard let video else { throw MiniCPMError.invalidInput("this export has no video function") }
        return try await perItem(video, inputs)
    }

    public func llm(_ inputs: LLMInputs) async throws -> LLMOutputs {
        let tokens = inputs.inputsEmbeds.shape[1]
        guard let function = functions[tokens] else {
            throw MiniCPMError.backend("the Core AI LLM takes \(functions.keys.sorted()) tokens per call, got \(tokens)")
        }
        let arrays = ["inputs_embeds": float(inputs.inputsEmbeds), "position_ids": int32(inputs.positionIDs),
                      "attention_mask": float(inputs.attentionMask), "last_index": int32(inputs.lastIndex)]
        var views = InferenceFunction.MutableViews()
        for i in states.indices {
            if half { views.insert(states[i].mutableView(as: Float16.self), for: stateNames[i]) }
            else { views.insert(states[i].mutableView(as: Float.self), for: stateNames[i]) }
        }
        var outputs = try await function.run(inputs: arrays, states: views)
        return LLMOutputs(logits: try tensor(&outputs, "logits"))
    }

    /// Vision-side functions take one row of the batch (a slice, or a frame group) per call.
    private func perItem(_ function: InferenceFunction, _ inputs: VisionInputs) async throws -> Tensor<Float> {
        var parts: [Tensor<Float>] = []
        for item in inputs.items {
            let arrays = ["pixel_values": float(item.pixelValues), "position_ids": int32(item.positionIDs),
                          "patch_mask": float(item.patchMask), "pos_embed": float(item.posEmbed)]
            var outputs = try await function.run(inputs: arrays)
            parts.append(try tensor(&outputs, "features"))
        }
        return .stacking(parts)
    }

    private func float(_ t: Tensor<Float>) -> NDArray {
        half ? Self.halfArray(t.scalars, shape: t.shape) : NDArray(scalars: t.scalars, shape: t.shape)
    }

    private func int32(_ t: Tensor<Int64>) -> NDArray {  // the assets take int32 ids
        NDArray(scalars: t.scalars.map { Int32($0) }, shape: t.shape)
    }

    private static func halfArray(_ scalars: [Float], shape: [Int]) -> NDArray {
        NDArray(scalars: scalars.map { Float16($0) }, shape: shape)
    }

    private func tensor(_ outputs: inout InferenceFunction.Outputs, _ name: String) throws -> Tensor<Float> {
        guard let value = outputs.remove(name) else { throw MiniCPMError.backend("the Core AI asset returned no \(name)") }
        let array = value.ndArray
        let shape = array.shape
        let scalars: [Float] = array.scalarType == .float16
            ? array.view(as: Float16.self).withUnsafePointer { p, _, _ in (0..<shape.reduce(1, *)).map { Float(p[$0]) } }
            : array.view(as: Float.self).withUnsafePointer { p, _, _ in Array(UnsafeBufferPointer(start: p, count: shape.reduce(1, *))) }
        return Tensor(shape: shape, scalars: scalars)
    }
}

private struct StateLayout: Decodable {
    let names: [String]
    let shape: [Int]
    let dtype: String
}

private extension JSONValue {
    /// `{"state": {...}}` of schedule.coreai.
    func decodeState() -> StateLayout? {
        guard case .object(let object) = self, let state = object["state"] else { return nil }
        return try? state.decode(StateLayout.self)
    }
}
#endif
