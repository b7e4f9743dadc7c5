// The backend call contract of runtime/backends/__init__.py: a backend runs the graphs of the split (vision, video, llm);
// everything else (the schedule) is host code in `Session`.
import Foundation

/// A dense row-major array with its shape: what crosses the host / graph boundary.
public struct Tensor<Scalar: Sendable>: Sendable {
    public var shape: [Int]
    public var scalars: [Scalar]

    /// `scalars.count` must equal the product of `shape` (a programming error otherwise).
    public init(shape: [Int], scalars: [Scalar]) {
        precondition(shape.reduce(1, *) == scalars.count,
                     "Tensor: shape \(shape) needs \(shape.reduce(1, *)) scalars, got \(scalars.count)")
        self.shape = shape
        self.scalars = scalars
    }

    /// The number of scalars (the product of the shape).
    public var count: Int { scalars.count }
}

extension Tensor: Equatable where Scalar: Equatable {}

/// The vision (or video) graph's inputs for one batch, named as in the manifest:
/// `pixel_values [B,3,p,P*p]`, `position_ids [B,P]`, `patch_mask [B,P]`, `pos_embed [B,P,H]`
/// (video: a frame-slot axis after the first, `[G,F,...]`).
public struct VisionInputs: Sendable {
    public var pixelValues: Tensor<Float>
    public var positionIDs: Tensor<Int64>
    public var patchMask: Tensor<Float>
    public var posEmbed: Tensor<Float>

    public init(pixelValues: Tensor<Float>, positionIDs: Tensor<Int64>, patchMask: Tensor<Float>,
                posEmbed: Tensor<Float>) {
        self.pixelValues = pixelValues
        self.positionIDs = positionIDs
        self.patchMask = patchMask
        self.posEmbed = posEmbed
    }

    /// The shaped inputs of an `ImageProcessor.visionBatch` (rows padded to `max_patches`).
    public init(_ batch: VisionBatch, preprocessing: Preprocessing, hiddenSize: Int) {
        let b = batch.batch, p = preprocessing.patchSize, n = preprocessing.maxPatches
        self.init(pixelValues: Tensor(shape: [b, 3, p, n * p], scalars: batch.pixelValues),
                  positionIDs: Tensor(shape: [b, n], scalars: batch.positionIDs),
                  patchMask: Tensor(shape: [b, n], scalars: batch.patchMask),
                  posEmbed: Tensor(shape: [b, n, hiddenSize], scalars: batch.posEmbed))
    }

    /// Images (or frame groups) in this batch: the first dimension.
    public var batch: Int { positionIDs.shape.first ?? 0 }
}

/// One LLM call (prefill chunk or decode step), named as in the manifest: `inputs_embeds [1,T,H]`,
/// `position_ids [1,T]`, `attention_mask [1,1,T,C+T]` (additive; the C cache slots, then the T new tokens),
/// `last_index [1]` and the host KV cache `past_keys / past_values [L,kv,C,d]` (shape `[0]` when the backend
/// owns its cache; C = the filled slots when the manifest says `kv_cache.slots = "filled"`, else max_context).
public struct LLMInputs: Sendable {
    public var inputsEmbeds: Tensor<Float>
    public var positionIDs: Tensor<Int64>
    public var attentionMask: Tensor<Float>
    public var lastIndex: Tensor<Int64>
    public var pastKeys: Tensor<Float>
    public var pastValues: Tensor<Float>

    public init(inputsEmbeds: Tensor<Float>, positionIDs: Tensor<Int64>, attentionMask: Tensor<Float>,
                lastIndex: Tensor<Int64>, pastKeys: Tensor<Float>, pastValues: Tensor<Float>) {
        self.inputsEmbeds = inputsEmbeds
        self.positionIDs = positionIDs
        self.attentionMask = attentionMask
        self.lastIndex = lastIndex
        self.pastKeys = pastKeys
        self.pastValues = pastValues
    }
}

/// What an LLM call returns: `logits [1,V]` of the last real token and, unless the backend owns the cache,
/// the K/V of every new row `new_keys / new_values [L,kv,T,d]` (the host writes the first `last_index + 1`).
public struct LLMOutputs: Sendable {
    public var logits: Tensor<Float>
    public var newKeys: Tensor<Float>?
    public var newValues: Tensor<Float>?

    public init(logits: Tensor<Float>, newKeys: Tensor<Float>? = nil, newValues: Tensor<Float>? = nil) {
        self.logits = logits
        self.newKeys = newKeys
        self.newValues = newValues
    }
}

/// Runs the exported graphs (runtime/backends/__init__.py). Float inputs arrive as `Float`; a backend of a float16
/// export converts them (the session has already rounded them to float16 values). The graph calls are async, as
/// Core ML's and Core AI's predictions are; a backend is a reference type the session calls from its actor, one
/// call at a time.
///
/// A backend whose graph keeps the KV cache as state (Core ML, ExecuTorch, Core AI) sets `ownsCache`: it gets
/// empty `pastKeys / pastValues`, writes the new K/V itself, returns no `newKeys / newValues`, and starts a new
/// state in `reset()`.
public protocol Backend: AnyObject, Sendable {
    /// The backend's name, as the stats report it ("onnxruntime", "coreml", ...).
    var name: String { get }
    /// True when the graph keeps the KV cache as its own state.
    var ownsCache: Bool { get }
    /// Image slices -> features `[B, query_num, H]`.
    func vision(_ inputs: VisionInputs) async throws -> Tensor<Float>
    /// Video frame groups (MiniCPM-V 4.5 exports) -> one feature block per group `[G, query_num, H]`.
    func video(_ inputs: VisionInputs) async throws -> Tensor<Float>
    /// One prefill chunk or decode step.
    func llm(_ inputs: LLMInputs) async throws -> LLMOutputs
    /// A new conversation: a backend that owns its cache starts a fresh (zeroed) state.
    func reset() throws
}

extension Backend {
    public var ownsCache: Bool { false }

    public func video(_ inputs: VisionInputs) async throws -> Tensor<Float> {
        throw MiniCPMError.invalidInput("backend \(name) has no video step (video needs a MiniCPM-V 4.5 export)")
    }

    public func reset() throws {}
}

extension Tensor {
    /// Row `i` of the first axis, as a batch of one.
    public func row(_ i: Int) -> Tensor {
        let size = count / shape[0]
        return Tensor(shape: [1] + shape.dropFirst(), scalars: Array(scalars[i * size..<(i + 1) * size]))
    }

    /// Batch-of-one results stacked along the first axis (all of one shape).
    public static func stacking(_ parts: [Tensor]) -> Tensor {
        guard let first = parts.first else { return Tensor(shape: [0], scalars: []) }
        return Tensor(shape: [parts.count] + first.shape.dropFirst(), scalars: parts.flatMap(\.scalars))
    }
}

extension VisionInputs {
    /// Each row of the batch as a batch of one: graphs with a static batch of 1 (the Core ML and Core AI vision
    /// functions) take slices and frame groups one call at a time.
    public var items: [VisionInputs] {
        (0..<batch).map { i in
            VisionInputs(pixelValues: pixelValues.row(i), positionIDs: positionIDs.row(i), patchMask: patchMask.row(i),
                         posEmbed: posEmbed.row(i))
        }
    }
}
