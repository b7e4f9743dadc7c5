import Foundation
import Testing
@testable import MiniCPMKit

@Suite("Sampler")
struct SamplerTests {
    @Test("repetition penalty and greedy choice equal minicpm.generation.Sampler bit for bit")
    func penaltyVectors() throws {
        let cases = try Vectors.cases("traces/sampler")
        #expect(cases.count >= 5)
        for url in cases {
            let c = try Vectors.load(url)
            let logits = (c["logits"] as! [Double]).map { Float($0) }
            let previous = c["previous"] as! [Int]
            var sampler = Sampler(try SamplingConfig(repetitionPenalty: c["repetition_penalty"] as! Double))
            let bits = sampler.penalized(logits, previous: previous).map(\.bitPattern)
            #expect(bits == (c["processed_bits"] as! [Int]).map { UInt32($0) }, "\(url.lastPathComponent)")
            #expect(sampler(logits, previous: previous) == c["greedy"] as! Int, "\(url.lastPathComponent)")
        }
    }

    @Test("argmax takes the first maximum, and a NaN as torch does")
    func argmax() {
        #expect(Sampler.argmax([1, 3, 3, 2]) == 1)
        #expect(Sampler.argmax([-.infinity, -.infinity]) == 0)
        #expect(Sampler.argmax([1, .nan, 5]) == 1)
    }

    static let flat: [Float] = (0..<16).map { Float($0 % 4) * 0.1 }

    static func draws(_ config: SamplingConfig, _ n: Int = 300, logits: [Float] = flat) -> [Int] {
        var sampler = Sampler(config)
        return (0..<n).map { _ in sampler(logits, previous: []) }
    }

    @Test("a seed reproduces the draws; another seed gives others")
    func seeded() throws {
        let a = Self.draws(try SamplingConfig(greedy: false, seed: 7))
        #expect(a == Self.draws(try SamplingConfig(greedy: false, seed: 7)))
        #expect(a != Self.draws(try SamplingConfig(greedy: false, seed: 8)))
        #expect(Set(a).count == 16)  // temperature 1 on near-flat logits reaches every token
    }

    @Test("top-k keeps the k largest (ties at the k-th kept), top-p the smallest nucleus")
    func truncation() throws {
        #expect(Set(Self.draws(try SamplingConfig(greedy: false, topK: 1, seed: 1))) == [3, 7, 11, 15])
        let logits: [Float] = [0, 5, 1, 4, 2, 3]
        #expect(Set(Self.draws(try SamplingConfig(greedy: false, topK: 3, seed: 2), logits: logits)) == [1, 3, 5])
        #expect(Set(Self.draws(try SamplingConfig(greedy: false, topP: 0.01, seed: 3), logits: logits)) == [1])
        // softmax of [0..5]: p(5) = 0.636, p(4) = 0.234: a 0.8 nucleus needs both
        #expect(Set(Self.draws(try SamplingConfig(greedy: false, topP: 0.8, seed: 4), logits: logits)) == [1, 3])
        // a low temperature sharpens towards the maximum; a high one flattens
        let cold = Self.draws(try SamplingConfig(greedy: false, temperature: 0.05, seed: 5), logits: logits)
        #expect(Set(cold) == [1])
        #expect(Set(Self.draws(try SamplingConfig(greedy: false, temperature: 50, seed: 6), logits: logits)).count == 6)
    }

    @Test("invalid settings are refused with the Python messages")
    func validation() {
        func message(_ body: () throws -> SamplingConfig) -> String? {
            do { _ = try body(); return nil } catch { return "\(error)" }
        }
        #expect(message { try SamplingConfig(maxNewTokens: 0) } == "max_new_tokens must be >= 1, got 0")
        #expect(message { try SamplingConfig(greedy: false, temperature: 0) } == "temperature must be > 0, got 0.0")
        #expect(message { try SamplingConfig(topP: 1.5) } == "top_p must be in (0, 1], got 1.5")
        #expect(message { try SamplingConfig(topK: -1) } == "top_k must be >= 0, got -1")
        #expect(message { try SamplingConfig(repetitionPenalty: 0) } == "repetition_penalty must be > 0, got 0.0")
        #expect(message { try SamplingConfig(greedy: true, temperature: 0) } == nil)  // greedy ignores temperature
    }

    @Test("SplitMix64 matches the reference sequence for seed 0")
    func splitMix() {
        var g = SplitMix64(seed: 0)
        // Reference values of SplitMix64 from seed 0 (Vigna's splitmix64.c).
        #expect(g.next() == 0xE220_A839_7B1D_CDAF)
        #expect(g.next() == 0x6E78_9E6A_A1B9_65F4)
        #expect(g.next() == 0x06C4_5D18_8009_454F)
    }
}
