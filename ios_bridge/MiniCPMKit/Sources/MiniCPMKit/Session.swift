// The device schedule, run by the host (mirrors runtime/session.py): one conversation = one KV cache of
// `max_context` slots; a turn runs vision per batch, looks up and scales embeddings, scatters the vision features
// over the placeholder spans, prefills the new tokens in chunks, then decodes token by token. Follow-up turns
// reuse the cache.
import Foundation
#if canImport(Darwin)
import Darwin
#elseif canImport(Glibc)
import Glibc
#endif

/// A conversation on an export: the schedule of `runtime.session.Session`, step for step.
public actor Session {
    /// Slices per vision call: bounds activation memory, amortises graph overhead.
    public static let visionBatch = 8
    /// The additive mask value; finite so fully masked pad rows never produce NaN.
    public static let negInf = Float(-1e30)

    public let manifest: Manifest
    /// New tokens per prefill call (`schedule.prefill_chunk`); the last chunk is padded to this width.
    public let prefillChunk: Int
    public let maxContext: Int
    public let onContextFull: ContextFullPolicy
    private let backend: any Backend
    private let table: EmbeddingTable
    private let halfPrecision: Bool  // a float16 export: graph inputs rounded to float16 values
    private let kvShape: [Int]
    private let filledSlots: Bool  // past_keys / past_values carry the filled slots only (ONNX exports)
    private let minPrefill: Int?  // the prefill step's shortest T (nil: every chunk padded to prefillChunk)
    private var keys: [Float] = []
    private var values: [Float] = []

    /// Filled KV slots.
    public private(set) var cacheLength = 0
    /// The tokens in those slots.
    public private(set) var historyIDs: [Int] = []
    /// The placeholder spans of `historyIDs`.
    public private(set) var historyBounds: [Range<Int>] = []
    /// Images (and video groups) so far: a follow-up turn's image ids continue from here.
    public private(set) var historyImages = 0
    /// A generated token not fed yet (an answer cut by max new tokens or a full context).
    public private(set) var pending: [Int] = []
    /// The last answer `ask` streamed.
    public private(set) var lastResult: TurnResult?

    /// Opens a conversation on `backend` for the export `manifest` describes (load it with `Manifest.load`,
    /// which verifies every hash). `onContextFull` and `prefillChunk` override the manifest's schedule.
    public init(manifest: Manifest, backend: sending any Backend, onContextFull: ContextFullPolicy? = nil,
                prefillChunk: Int? = nil) throws {
        let schedule = manifest.schedule
        guard let policy = onContextFull ?? ContextFullPolicy(rawValue: schedule.onContextFull) else {
            throw MiniCPMError.invalidInput("on_context_full must be 'error' or 'stop', got '\(schedule.onContextFull)'")
        }
        let chunk = prefillChunk ?? schedule.prefillChunk
        guard chunk >= 1 else { throw MiniCPMError.invalidInput("prefill chunk must be >= 1, got \(chunk)") }
        self.manifest = manifest
        self.prefillChunk = chunk
        self.maxContext = schedule.maxContext
        self.onContextFull = policy
        self.table = try EmbeddingTable(manifest: manifest)
        self.halfPrecision = manifest.model.dtype == "float16"
        self.kvShape = schedule.kvCache.shape
        self.filledSlots = schedule.kvCache.filledSlots
        self.minPrefill = schedule.steps["prefill"]?.minTokens
        guard kvShape.count == 4, kvShape[2] == maxContext else {
            throw MiniCPMError.invalidExport("manifest.json: kv_cache shape \(kvShape) is not [layers, kv_heads, "
                                             + "\(maxContext), head_dim]")
        }
        // reset(), which the nonisolated initializer cannot call
        try backend.reset()
        let count = backend.ownsCache ? 0 : kvShape.reduce(1, *)
        self.keys = [Float](repeating: 0, count: count)
        self.values = [Float](repeating: 0, count: count)
        self.backend = backend
    }

    /// True when the next turn starts the conversation (build it with `build`, not `build_turn`).
    public var isFresh: Bool { cacheLength == 0 && pending.isEmpty }

    /// Forget the conversation: empty cache, no history.
    public func reset() throws {
        // Backends whose graphs keep the cache as state reset it themselves.
        let count = backend.ownsCache ? 0 : kvShape.reduce(1, *)
        keys = [Float](repeating: 0, count: count)
        values = [Float](repeating: 0, count: count)
        try backend.reset()
        cacheLength = 0
        historyIDs = []
        historyBounds = []
        historyImages = 0
        pending = []
    }

    /// Streams the answer to `turn` as text pieces; `lastResult` holds the whole answer when the stream ends.
    /// Stopping the iteration cancels generation (the last token stays pending, `FinishReason.cancelled`).
    public nonisolated func ask<D: TextDecoding & Sendable>(_ turn: TurnInput, sampling: SamplingConfig,
                                                             decoder: D) -> AsyncThrowingStream<String, Error> {
        let (stream, continuation) = AsyncThrowingStream<String, Error>.makeStream()
        let task = Task {
            do {
                let result = try await self.respond(to: turn, sampling: sampling, decoder: decoder) {
                    continuation.yield($0)
                }
                await self.remember(result)
                continuation.finish()
            } catch {
                continuation.finish(throwing: error)
            }
        }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }

    private func remember(_ result: TurnResult) { lastResult = result }

    /// Adds `turn` (the new tokens, without the pending one) to the conversation and generates the answer,
    /// calling `onText` with each text piece.
    public func respond<D: TextDecoding & Sendable>(to turn: TurnInput, sampling: SamplingConfig, decoder: D,
                                         onText: (@Sendable (String) -> Void)? = nil) async throws -> TurnResult {
        let carried = pending
        let ids = carried + turn.inputIDs
        guard !ids.isEmpty else { throw MiniCPMError.invalidInput("a turn needs at least one token") }
        let bounds = turn.imageBounds.map { ($0.lowerBound + carried.count)..<($0.upperBound + carried.count) }
        let needed = cacheLength + ids.count
        if needed > maxContext {
            throw MiniCPMError.contextFull("context full: the conversation needs \(needed) tokens before answering, "
                + "the export holds \(maxContext) (/reset, or re-export with a larger --max-context)")
        }
        let clock = ContinuousClock(), t0 = clock.now
        let features = try await vision(turn)
        let tVision = clock.now
        guard features.count == bounds.count else {
            throw MiniCPMError.invalidInput("the turn has \(bounds.count) placeholder spans but its vision inputs give "
                                            + "\(features.count) feature blocks")
        }
        let schedule = manifest.schedule, h = table.hiddenSize
        var embeds = try table.embed(ids, scale: schedule.promptEmbeddingScale)
        let carriedEmbeds = try table.embed(carried, scale: schedule.generatedEmbeddingScale)
        embeds.replaceSubrange(0..<carriedEmbeds.count, with: carriedEmbeds)
        for (span, block) in zip(bounds, features) {
            guard span.count * h == block.count, span.upperBound <= ids.count else {
                throw MiniCPMError.invalidInput("placeholder span \(span) does not fit \(block.count / h) vision features")
            }
            embeds.replaceSubrange(span.lowerBound * h..<span.upperBound * h, with: block)
        }
        var logits = try await prefill(embeds, tokens: ids.count)
        historyBounds += bounds.map { ($0.lowerBound + historyIDs.count)..<($0.upperBound + historyIDs.count) }
        historyIDs += ids
        historyImages += turn.images
        pending = []
        let tPrefill = clock.now

        var sampler = Sampler(sampling), decoder = decoder
        let stop = Set(manifest.tokenizer.stopIDs)
        var generated: [Int] = [], finish = FinishReason.length, text = ""
        func say(_ piece: String) {
            guard !piece.isEmpty else { return }
            text += piece
            onText?(piece)
        }
        while true {
            let token = sampler(logits, previous: generated)
            if stop.contains(token) {  // never fed: the next turn closes the answer with <|im_end|>
                finish = .stop
                break
            }
            generated.append(token)
            say(decoder.put(token))
            if generated.count >= sampling.maxNewTokens {
                pending = [token]
                break
            }
            if Task.isCancelled {
                pending = [token]
                finish = .cancelled
                break
            }
            if cacheLength >= maxContext {
                if onContextFull == .stop {
                    pending = [token]
                    finish = .contextFull
                    break
                }
                throw MiniCPMError.contextFull("context full after \(generated.count) new tokens (\(maxContext) "
                                               + "slots): /reset, or re-export with a larger --max-context")
            }
            logits = try await runLLM(try table.embed([token], scale: schedule.generatedEmbeddingScale), count: 1, width: 1)
            historyIDs.append(token)
        }
        let tEnd = clock.now
        say(decoder.end())
        let stats = Self.stats(tokens: ids.count, turn: turn, generated: generated.count,
                               times: (t0, tVision, tPrefill, tEnd), context: cacheLength, finish: finish,
                               backend: backend.name)
        return TurnResult(tokenIDs: generated, text: text, finishReason: finish, stats: stats)
    }

    // ----- steps ---------------------------------------------------------------------------------------------

    /// One feature block `[query_num * H]` per placeholder span, in prompt order.
    private func vision(_ turn: TurnInput) async throws -> [ArraySlice<Float>] {
        let limit = manifest.preprocessing.maxPatches
        func run(_ batches: [VisionInputs], video: Bool) async throws -> [ArraySlice<Float>] {
            var out: [ArraySlice<Float>] = []
            for batch in batches {
                let patches = batch.positionIDs.shape.last ?? 0
                guard patches == limit else {
                    throw MiniCPMError.invalidInput("a vision batch has \(patches) patch slots but this export's "
                                                    + "vision graph takes \(limit)")
                }
                let f = video ? try await backend.video(batch) : try await backend.vision(batch)
                let n = batch.batch
                guard f.shape.count == 3, f.shape[0] == n, f.count > 0 else {
                    throw MiniCPMError.backend("backend \(backend.name): vision features of shape \(f.shape) for a "
                                               + "batch of \(n)")
                }
                let block = f.count / n
                out += (0..<n).map { f.scalars[$0 * block..<($0 + 1) * block] }
            }
            return out
        }
        var images = try await run(turn.imageBatches, video: false).makeIterator()
        var videos = try await run(turn.videoBatches, video: true).makeIterator()
        return try turn.spanKinds.map { kind in
            guard let block = kind == .image ? images.next() : videos.next() else {
                throw MiniCPMError.invalidInput("the turn has more \(kind) spans than its vision inputs fill")
            }
            return block
        }
    }

    /// Feed the new tokens in chunks of `prefillChunk`; the last one is padded to it, or only up to the prefill
    /// step's `min_tokens` when it takes a shorter T. Logits of the last real token.
    private func prefill(_ embeds: [Float], tokens: Int) async throws -> [Float] {
        let h = table.hiddenSize
        var logits: [Float] = []
        for start in stride(from: 0, to: tokens, by: prefillChunk) {
            let n = min(prefillChunk, tokens - start)
            let width = minPrefill.map { max(n, $0) } ?? prefillChunk
            logits = try await runLLM(Array(embeds[start * h..<(start + n) * h]), count: n, width: width)
        }
        return logits
    }

    /// One graph call on `count` new tokens padded to `width`; writes their K/V into the host cache.
    private func runLLM(_ embeds: [Float], count n: Int, width: Int) async throws -> [Float] {
        let past = cacheLength, ctx = maxContext, h = table.hiddenSize
        let outputs = try await { () async throws -> LLMOutputs in  // scoped: the inputs' cache reference dies before the write
            var x = [Float](repeating: 0, count: width * h)
            x.replaceSubrange(0..<n * h, with: halfPrecision ? embeds.map(HalfFloat.round) : embeds)
            let positions = (0..<width).map { Int64(min(past + $0, ctx - 1)) }
            let slots = filledSlots ? past : ctx
            let inputs = LLMInputs(
                inputsEmbeds: Tensor(shape: [1, width, h], scalars: x),
                positionIDs: Tensor(shape: [1, width], scalars: positions),
                attentionMask: Tensor(shape: [1, 1, width, slots + width],
                                      scalars: mask(count: n, width: width, slots: slots)),
                lastIndex: Tensor(shape: [1], scalars: [Int64(n - 1)]),
                pastKeys: pastCache(keys), pastValues: pastCache(values))
            return try await backend.llm(inputs)
        }()
        if !backend.ownsCache {  // stateful backends wrote their own cache
            guard let newKeys = outputs.newKeys, let newValues = outputs.newValues else {
                throw MiniCPMError.backend("backend \(backend.name) returned no new_keys / new_values")
            }
            try write(newKeys, into: &keys, at: past, count: n)
            try write(newValues, into: &values, at: past, count: n)
        }
        cacheLength = past + n
        let vocab = outputs.logits.shape.last ?? 0
        guard outputs.logits.count == vocab, vocab > 0 else {
            throw MiniCPMError.backend("backend \(backend.name): logits of shape \(outputs.logits.shape), not [1, V]")
        }
        return outputs.logits.scalars
    }

    /// The cache the step gets: empty when the backend owns it, the filled slots `[L,kv,past,d]` when the manifest
    /// says `kv_cache.slots = "filled"`, else all of it.
    private func pastCache(_ cache: [Float]) -> Tensor<Float> {
        if backend.ownsCache { return Tensor(shape: [0], scalars: []) }
        guard filledSlots else { return Tensor(shape: kvShape, scalars: cache) }
        let (rows, slots, dim, past) = (kvShape[0] * kvShape[1], kvShape[2], kvShape[3], cacheLength)
        var filled = [Float]()
        filled.reserveCapacity(rows * past * dim)
        for r in 0..<rows { filled.append(contentsOf: cache[r * slots * dim..<(r * slots + past) * dim]) }
        return Tensor(shape: [kvShape[0], kvShape[1], past, dim], scalars: filled)
    }

    /// The additive mask `[1,1,width,slots+width]`: every real row sees the filled cache slots, every row sees the
    /// new tokens up to itself (pad rows too: no empty rows), clamped to the dtype's lowest finite value.
    private func mask(count n: Int, width: Int, slots: Int) -> [Float] {
        let past = cacheLength, cols = slots + width
        let low = halfPrecision ? max(Self.negInf, -65504) : Self.negInf
        var m = [Float](repeating: low, count: width * cols)
        for r in 0..<width {
            if r < n { for c in 0..<past { m[r * cols + c] = 0 } }
            for c in 0...r { m[r * cols + slots + c] = 0 }
        }
        return m
    }

    /// `cache[:, :, past:past+n] = rows[:, :, :n]` for a `[L,kv,T,d]` tensor of new rows.
    private func write(_ rows: Tensor<Float>, into cache: inout [Float], at past: Int, count n: Int) throws {
        let (layers, heads, slots, dim) = (kvShape[0], kvShape[1], kvShape[2], kvShape[3])
        let s = rows.shape
        guard s.count == 4, s[0] == layers, s[1] == heads, s[2] >= n, s[3] == dim, past + n <= slots else {
            throw MiniCPMError.backend("backend \(backend.name): new K/V of shape \(s) cannot fill slots "
                                       + "\(past)..<\(past + n) of the \(kvShape) cache")
        }
        rows.scalars.withUnsafeBufferPointer { src in
            cache.withUnsafeMutableBufferPointer { dst in
                for l in 0..<layers {
                    for k in 0..<heads {
                        let from = ((l * heads + k) * s[2]) * dim, to = ((l * heads + k) * slots + past) * dim
                        for i in 0..<n * dim { dst[to + i] = src[from + i] }
                    }
                }
            }
        }
    }

    /// The cache as the host holds it (empty when the backend owns it): for tests and diagnostics.
    func cacheSnapshot() -> (keys: [Float], values: [Float]) { (keys, values) }

    private static func stats(tokens: Int, turn: TurnInput, generated: Int,
                              times: (ContinuousClock.Instant, ContinuousClock.Instant, ContinuousClock.Instant,
                                      ContinuousClock.Instant),
                              context: Int, finish: FinishReason, backend: String) -> SessionStats {
        func seconds(_ d: Duration) -> Double {
            Double(d.components.seconds) + Double(d.components.attoseconds) * 1e-18
        }
        func round2(_ x: Double) -> Double { (x * 100).rounded() / 100 }
        let vision = seconds(times.1 - times.0), prefill = seconds(times.2 - times.1)
        let decode = seconds(times.3 - times.2)
        var s = SessionStats()
        s.promptTokens = tokens
        s.newTokens = generated
        s.images = turn.images
        s.slices = turn.slices
        s.visionMs = round2(vision * 1000)
        s.visionMsPerSlice = turn.slices > 0 ? round2(vision * 1000 / Double(turn.slices)) : 0
        s.prefillMs = round2(prefill * 1000)
        s.timeToFirstTokenMs = round2((vision + prefill) * 1000)
        s.prefillTokS = round2(Double(tokens) / max(prefill, 1e-9))
        s.decodeMs = round2(decode * 1000)
        s.decodeTokS = decode > 0 ? round2(Double(max(generated - 1, 0)) / decode) : 0
        s.contextTokens = context
        s.finishReason = finish
        s.peakRSSMB = peakRSSMegabytes()
        s.backend = backend
        return s
    }

    private static func peakRSSMegabytes() -> Double {
        var usage = rusage()
        #if canImport(Glibc)
        let who = __rusage_who_t(RUSAGE_SELF.rawValue)
        #else
        let who = RUSAGE_SELF
        #endif
        guard getrusage(who, &usage) == 0 else { return 0 }
        #if canImport(Darwin)
        let kilobytes = Double(usage.ru_maxrss) / 1024  // bytes on Darwin
        #else
        let kilobytes = Double(usage.ru_maxrss)  // kilobytes on Linux
        #endif
        return (kilobytes / 1024 * 10).rounded() / 10
    }
}
