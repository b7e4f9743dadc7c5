// Next-token choice (minicpm/generation.py `SamplingConfig` and `Sampler`): greedy by default; otherwise the
// HF order repetition penalty -> temperature -> top-k -> top-p, then a draw from a seeded generator.
import Foundation

/// How the next token is chosen. Greedy (argmax) by default; the checks and their messages are Python's.
public struct SamplingConfig: Sendable, Equatable {
    public let greedy: Bool
    public let temperature: Double
    public let topP: Double
    public let topK: Int
    public let repetitionPenalty: Double
    public let seed: UInt64?
    public let maxNewTokens: Int

    /// Throws `MiniCPMError.invalidInput` for values `SamplingConfig.__post_init__` refuses.
    public init(greedy: Bool = true, temperature: Double = 1.0, topP: Double = 1.0, topK: Int = 0,
                repetitionPenalty: Double = 1.0, seed: UInt64? = nil, maxNewTokens: Int = 256) throws {
        if maxNewTokens < 1 { throw MiniCPMError.invalidInput("max_new_tokens must be >= 1, got \(maxNewTokens)") }
        if !greedy && !(temperature > 0) {
            throw MiniCPMError.invalidInput("temperature must be > 0, got \(temperature)")
        }
        if !(topP > 0 && topP <= 1) { throw MiniCPMError.invalidInput("top_p must be in (0, 1], got \(topP)") }
        if topK < 0 { throw MiniCPMError.invalidInput("top_k must be >= 0, got \(topK)") }
        if !(repetitionPenalty > 0) {
            throw MiniCPMError.invalidInput("repetition_penalty must be > 0, got \(repetitionPenalty)")
        }
        self.greedy = greedy
        self.temperature = temperature
        self.topP = topP
        self.topK = topK
        self.repetitionPenalty = repetitionPenalty
        self.seed = seed
        self.maxNewTokens = maxNewTokens
    }

    /// The export's `schedule.default_sampling` (greedy, temperature, top_p, top_k), with `maxNewTokens`.
    public init(defaultsOf manifest: Manifest, maxNewTokens: Int = 256) throws {
        let d = manifest.schedule.defaultSampling
        try self.init(greedy: d["greedy"]?.bool ?? true, temperature: d["temperature"]?.double ?? 1.0,
                      topP: d["top_p"]?.double ?? 1.0, topK: Int(d["top_k"]?.double ?? 0),
                      repetitionPenalty: d["repetition_penalty"]?.double ?? 1.0, maxNewTokens: maxNewTokens)
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a small, fast, seedable generator; the same seed gives the same draws
/// on every platform.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64

    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// A uniform double in [0, 1) from the top 53 bits.
    public mutating func unit() -> Double { Double(next() >> 11) * 0x1p-53 }
}

/// Picks the next token from a logits vector. Greedy decoding and the repetition penalty are bit-for-bit
/// `minicpm.generation.Sampler`; stochastic draws are seeded (reproducible here, not equal to torch's).
public struct Sampler: Sendable {
    public let config: SamplingConfig
    private var generator: SplitMix64

    public init(_ config: SamplingConfig) {
        self.config = config
        generator = SplitMix64(seed: config.seed ?? 0)
    }

    /// The HF repetition penalty on the distinct `previous` ids: negative scores times the penalty, others
    /// divided by it, in float32 (as torch's `where(scores < 0, scores * p, scores / p)`).
    public func penalized(_ logits: [Float], previous: [Int]) -> [Float] {
        var out = logits
        guard config.repetitionPenalty != 1.0, !previous.isEmpty else { return out }
        let p = Float(config.repetitionPenalty)
        for id in Set(previous) where id >= 0 && id < out.count {
            let score = out[id]
            out[id] = score < 0 ? score * p : score / p
        }
        return out
    }

    /// The next token given the logits and the tokens generated so far in this answer.
    public mutating func callAsFunction(_ logits: [Float], previous: [Int]) -> Int {
        var scores = penalized(logits, previous: previous)
        if config.greedy { return Self.argmax(scores) }
        let t = Float(config.temperature)
        for i in scores.indices { scores[i] /= t }
        if config.topK > 0 {
            let k = min(config.topK, scores.count)
            let kth = scores.sorted(by: >)[k - 1]
            for i in scores.indices where scores[i] < kth { scores[i] = -.infinity }
        }
        if config.topP < 1.0 { Self.nucleus(&scores, topP: config.topP) }
        return draw(Self.softmax(scores))
    }

    /// The index of the first maximum (a NaN counts as the maximum, as `torch.argmax`).
    static func argmax(_ values: [Float]) -> Int {
        var best = 0
        for (i, v) in values.enumerated() {
            if v.isNaN { return i }
            if v > values[best] { best = i }
        }
        return best
    }

    /// Keeps the smallest set of most likely tokens whose probability exceeds `topP` (the most likely always).
    static func nucleus(_ scores: inout [Float], topP: Double) {
        let order = scores.indices.sorted { scores[$0] < scores[$1] }  // ascending, as the Python side
        let probs = softmax(order.map { scores[$0] })
        var cumulative = 0.0
        for (rank, index) in order.enumerated() where rank < order.count - 1 {
            cumulative += probs[rank]
            if cumulative <= 1 - topP { scores[index] = -.infinity }
        }
    }

    static func softmax(_ scores: [Float]) -> [Double] {
        let top = Double(scores.max() ?? 0)
        let e = scores.map { $0 == -.infinity ? 0 : exp(Double($0) - top) }
        let total = e.reduce(0, +)
        return e.map { $0 / total }
    }

    private mutating func draw(_ probs: [Double]) -> Int {
        let u = generator.unit()
        var cumulative = 0.0
        var last = 0
        for (i, p) in probs.enumerated() where p > 0 {
            cumulative += p
            last = i
            if u < cumulative { return i }
        }
        return last  // rounding left u above the total: the last possible token
    }
}
