// What one conversation turn brings to `Session` (token ids, placeholder spans, vision batches) and what it
// returns (tokens, text, finish reason, stats), plus the text-decoding hook the tokenizer plugs into.
import Foundation

/// A built turn (what `PromptBuilder.build` / `build_turn` return, without the session's pending token):
/// token ids, the placeholder spans `[start, end)` in prompt order, and the vision graph inputs behind them.
public struct TurnInput: Sendable {
    /// Which graph fills a placeholder span.
    public enum SpanKind: Sendable, Equatable { case image, video }

    public var inputIDs: [Int]
    public var imageBounds: [Range<Int>]
    /// Image slices in batches, in prompt order: each batch row fills the next `.image` span.
    public var imageBatches: [VisionInputs]
    /// Video frame groups in batches: each group fills the next `.video` span.
    public var videoBatches: [VisionInputs]
    /// The kind of each span of `imageBounds` (all `.image` unless given).
    public var spanKinds: [SpanKind]
    /// Images (and video groups) in the turn, for the stats.
    public var images: Int
    /// Slices (and video frames) in the turn, for the stats.
    public var slices: Int

    public init(inputIDs: [Int], imageBounds: [Range<Int>] = [], imageBatches: [VisionInputs] = [],
                videoBatches: [VisionInputs] = [], spanKinds: [SpanKind]? = nil, images: Int = 0, slices: Int = 0) {
        self.inputIDs = inputIDs
        self.imageBounds = imageBounds
        self.imageBatches = imageBatches
        self.videoBatches = videoBatches
        self.spanKinds = spanKinds ?? Array(repeating: .image, count: imageBounds.count)
        self.images = images
        self.slices = slices
    }

    /// A turn built by `ChatPrompt.build` / `buildTurn` whose images (in prompt order) `processor` has processed.
    public init(_ prompt: PromptTokens, images: [ProcessedImage], processor: ImageProcessor) throws {
        try self.init(inputIDs: prompt.inputIDs, imageBounds: prompt.imageBounds, images: images, processor: processor)
    }

    /// A turn whose images are processed by `processor`: their slices go to the vision graph in batches of
    /// `Session.visionBatch`, padded to `max_patches` (as `Session._vision`). Throws for a slice larger than that.
    public init(inputIDs: [Int], imageBounds: [Range<Int>], images: [ProcessedImage], processor: ImageProcessor)
        throws {
        let rows = images.flatMap(\.rows)
        let limit = processor.preprocessing.maxPatches
        if let biggest = rows.map(\.patches).max(), biggest > limit {
            throw MiniCPMError.invalidInput("a slice has \(biggest) patches but this export's vision graph takes "
                + "\(limit) (re-export with --max-patches \(biggest) or use fewer slices for such extreme aspect ratios)")
        }
        let batches = stride(from: 0, to: rows.count, by: Session.visionBatch).map { start in
            VisionInputs(processor.visionBatch(rows[start..<min(start + Session.visionBatch, rows.count)]),
                         preprocessing: processor.preprocessing, hiddenSize: processor.hiddenSize)
        }
        self.init(inputIDs: inputIDs, imageBounds: imageBounds, imageBatches: batches, images: images.count,
                  slices: rows.count)
    }
}

/// Why an answer ended (the stats' `finish_reason`).
public enum FinishReason: String, Sendable, Equatable {
    /// A stop token (never fed: the next turn closes the answer with `<|im_end|>`).
    case stop
    /// `maxNewTokens` reached: the last token is pending and feeds the next turn.
    case length
    /// The KV cache filled under the `stop` policy (the last token is pending).
    case contextFull = "context_full"
    /// The consumer of `Session.ask` stopped listening (the last token is pending).
    case cancelled
}

/// What to do when the next decode step would not fit in `max_context` (`--on-context-full`).
public enum ContextFullPolicy: String, Sendable {
    /// Throw `MiniCPMError.contextFull` (the default).
    case error
    /// End the answer with `FinishReason.contextFull`.
    case stop
}

/// The timings and counts every runner reports (`minicpm.generation.timing_stats` plus the session's own).
public struct SessionStats: Sendable, Equatable {
    public var promptTokens = 0
    public var newTokens = 0
    public var images = 0
    public var slices = 0
    public var visionMs = 0.0
    public var visionMsPerSlice = 0.0
    public var prefillMs = 0.0
    public var timeToFirstTokenMs = 0.0
    public var prefillTokS = 0.0
    public var decodeMs = 0.0
    public var decodeTokS = 0.0
    public var contextTokens = 0
    public var finishReason = FinishReason.stop
    public var peakRSSMB = 0.0
    public var backend = ""

    /// The stats as the Python runtime's `--json` prints them (same keys).
    public var dictionary: [String: JSONValue] {
        [
            "prompt_tokens": .number(Double(promptTokens)), "new_tokens": .number(Double(newTokens)),
            "images": .number(Double(images)), "slices": .number(Double(slices)), "vision_ms": .number(visionMs),
            "vision_ms_per_slice": .number(visionMsPerSlice), "prefill_ms": .number(prefillMs),
            "time_to_first_token_ms": .number(timeToFirstTokenMs), "prefill_tok_s": .number(prefillTokS),
            "decode_ms": .number(decodeMs), "decode_tok_s": .number(decodeTokS),
            "context_tokens": .number(Double(contextTokens)), "finish_reason": .string(finishReason.rawValue),
            "peak_rss_mb": .number(peakRSSMB), "backend": .string(backend),
        ]
    }
}

/// One answer: the generated token ids (stop token excluded), its text, why it ended and the stats.
public struct TurnResult: Sendable, Equatable {
    public var tokenIDs: [Int]
    public var text: String
    public var finishReason: FinishReason
    public var stats: SessionStats
}

/// Turns generated token ids into text pieces as they arrive (the tokenizer's streaming decoder plugs in here).
public protocol TextDecoding {
    /// The new text after `token` ("" while an incomplete character is held back).
    mutating func put(_ token: Int) -> String
    /// Whatever is still held back when the answer ends.
    mutating func end() -> String
}

/// The tokenizer's streaming decoder is a `TextDecoding` as it is.
extension StreamingDecoder: TextDecoding {}

/// `minicpm.generation.TextStreamer` over a whole-sequence decode function: decodes every id so far, holds back
/// text ending in U+FFFD (an incomplete UTF-8 sequence) and emits what is new (counted in Unicode scalars, as
/// Python counts characters).
public struct TextStreamer: TextDecoding, Sendable {
    private let decode: @Sendable ([Int]) -> String
    private var ids: [Int] = []
    private var emitted = 0

    public init(decode: @escaping @Sendable ([Int]) -> String) { self.decode = decode }

    public mutating func put(_ token: Int) -> String {
        ids.append(token)
        let text = decode(ids)
        return text.unicodeScalars.last == "\u{FFFD}" ? "" : emit(text)
    }

    public mutating func end() -> String { emit(decode(ids)) }

    private mutating func emit(_ text: String) -> String {
        let scalars = text.unicodeScalars
        guard scalars.count > emitted else { return "" }
        var piece = String.UnicodeScalarView()
        piece.append(contentsOf: scalars.dropFirst(emitted))
        emitted = scalars.count
        return String(piece)
    }
}

/// No text: for callers that only want token ids.
public struct NoTextDecoding: TextDecoding, Sendable {
    public init() {}
    public mutating func put(_ token: Int) -> String { "" }
    public mutating func end() -> String { "" }
}
