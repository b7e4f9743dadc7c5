import Foundation
import Testing
@testable import MiniCPMKit

/// A conversation recorded from `runtime.session.Session` on onnxruntime (`ios_bridge/vectors/traces.py`).
struct Trace {
    enum Call {
        case reset
        case vision(VisionInputs, features: Tensor<Float>)
        case llm(LLMCall)

        var kind: String {
            switch self {
            case .reset: return "reset"
            case .vision: return "vision"
            case .llm: return "llm"
            }
        }
    }

    struct LLMCall {
        var inputsEmbeds: Tensor<Float>
        var positionIDs: Tensor<Int64>
        var attentionMask: Tensor<Float>
        var lastIndex: Tensor<Int64>
        var pastShape: [Int]
        var writeStart: Int
        var writeCount: Int
        var logits: Tensor<Float>
        var newKeys: Tensor<Float>
        var newValues: Tensor<Float>
    }

    struct Turn {
        var builtIDs: [Int]
        var builtBounds: [Range<Int>]
        var visionBatches: [VisionInputs]  // the inputs of the turn's recorded vision calls
        var images: Int
        var slices: Int
        var sampling: SamplingConfig
        var error: String?
        var tokenIDs: [Int]
        var text: String
        var pieces: [String]
        var decoded: [String]
        var finishReason: String
        var statsKeys: [String]
        var stats: [String: Any]
        var historyIDs: [Int]
        var historyImages: Int
        var historyBounds: [Range<Int>]
        var messages: [ChatMessage]
        var cacheLength: Int
        var pendingAfter: [Int]
    }

    enum Event { case reset, turn(Turn) }

    var name: String
    var url: URL
    var export: URL
    var chunk: Int
    var policy: ContextFullPolicy
    var events: [Event]
    var calls: [Call]

    static func load(_ url: URL) throws -> Trace {
        let c = try Vectors.load(url)
        var cache: [String: Any] = [:]  // arrays are stored by content: read each file once
        func floats(_ ref: Any?) throws -> Tensor<Float> {
            let key = (ref as? [String: Any])?["array"] as? String ?? ""
            if let t = cache[key] as? Tensor<Float> { return t }
            let t = Tensor(shape: Vectors.shape(ref), scalars: try Vectors.floats(ref, near: url))
            cache[key] = t
            return t
        }
        func ints(_ ref: Any?) throws -> Tensor<Int64> {
            let key = (ref as? [String: Any])?["array"] as? String ?? ""
            if let t = cache[key] as? Tensor<Int64> { return t }
            let t = Tensor(shape: Vectors.shape(ref), scalars: try Vectors.int64s(ref, near: url))
            cache[key] = t
            return t
        }
        let calls: [Call] = try (c["calls"] as! [[String: Any]]).map { d in
            switch d["kind"] as! String {
            case "reset": return .reset
            case "vision":
                return .vision(VisionInputs(pixelValues: try floats(d["pixel_values"]),
                                            positionIDs: try ints(d["position_ids"]),
                                            patchMask: try floats(d["patch_mask"]), posEmbed: try floats(d["pos_embed"])),
                               features: try floats(d["features"]))
            default:
                let write = d["cache_write"] as! [String: Int]
                return .llm(LLMCall(inputsEmbeds: try floats(d["inputs_embeds"]), positionIDs: try ints(d["position_ids"]),
                                    attentionMask: try floats(d["attention_mask"]), lastIndex: try ints(d["last_index"]),
                                    pastShape: d["past_shape"] as! [Int], writeStart: write["start"]!,
                                    writeCount: write["count"]!, logits: try floats(d["logits"]),
                                    newKeys: try floats(d["new_keys"]), newValues: try floats(d["new_values"])))
            }
        }
        let events: [Event] = try (c["events"] as! [[String: Any]]).map { e in
            if e["kind"] as! String == "reset" { return .reset }
            let s = e["sampling"] as! [String: Any]
            let sampling = try SamplingConfig(greedy: s["greedy"] as! Bool, temperature: s["temperature"] as! Double,
                                              topP: s["top_p"] as! Double, topK: s["top_k"] as! Int,
                                              repetitionPenalty: s["repetition_penalty"] as! Double,
                                              maxNewTokens: s["max_new_tokens"] as! Int)
            return .turn(Turn(
                builtIDs: e["built_ids"] as! [Int],
                builtBounds: (e["built_bounds"] as! [[Int]]).map { $0[0]..<$0[1] },
                visionBatches: (e["vision_calls"] as! [Int]).map { i in
                    guard case .vision(let inputs, _) = calls[i] else { fatalError("call \(i) is not vision") }
                    return inputs
                },
                images: e["images"] as! Int, slices: e["slices"] as! Int,
                sampling: sampling, error: e["error"] as? String, tokenIDs: e["token_ids"] as? [Int] ?? [],
                text: e["text"] as? String ?? "", pieces: (e["pieces"] as? [[Any]] ?? []).map { $0[1] as! String },
                decoded: e["decoded"] as? [String] ?? [], finishReason: e["finish_reason"] as! String,
                statsKeys: e["stats_keys"] as? [String] ?? [], stats: e["stats"] as? [String: Any] ?? [:],
                historyIDs: e["history_ids"] as! [Int], historyImages: e["history_images"] as! Int,
                historyBounds: (e["history_bounds"] as! [[Int]]).map { $0[0]..<$0[1] },
                messages: (e["messages"] as! [[String: Any]]).map { m in
                    ChatMessage(role: ChatMessage.Role(rawValue: m["role"] as! String)!,
                                content: (m["content"] as! [[String: Any]]).map { item in
                                    if let text = item["text"] as? String { return .text(text) }
                                    return .image(grid: (item["grid"] as? [Int]).map { ($0[0], $0[1]) })
                                })
                },
                cacheLength: e["cache_len"] as! Int, pendingAfter: e["pending_after"] as! [Int]))
        }
        return Trace(name: c["name"] as! String, url: url,
                     export: url.deletingLastPathComponent().appendingPathComponent(c["export"] as! String),
                     chunk: c["chunk"] as! Int, policy: ContextFullPolicy(rawValue: c["on_context_full"] as! String)!,
                     events: events, calls: calls)
    }

    static func all() throws -> [Trace] { try Vectors.cases("traces").map(load) }

    static func named(_ name: String) throws -> Trace {
        try load(Vectors.root.appendingPathComponent("traces/\(name).json"))
    }
}

/// A replay found the Swift side doing something the Python runtime did not.
struct Deviation: Error, CustomStringConvertible {
    let description: String
}

/// Serves a trace's recorded outputs and checks every incoming call against the recorded inputs: kind and
/// order, shapes, exact positions / last index / mask cells, embeddings within 1e-6, and the host KV cache
/// (what the recorded writes built, cell for cell).
final class ReplayBackend: Backend, @unchecked Sendable {  // used only from inside the Session actor
    let name = "onnxruntime"
    /// A backend that keeps the cache as state: it must get empty past K/V and returns none.
    let ownsCache: Bool
    let calls: [Trace.Call]
    private(set) var index = 0
    private(set) var mirrorKeys: [Float]
    private(set) var mirrorValues: [Float]
    private let kvCount: Int
    private let kvShape: [Int]

    init(_ trace: Trace, kvShape: [Int], ownsCache: Bool = false) {
        self.ownsCache = ownsCache
        calls = trace.calls
        self.kvShape = kvShape
        kvCount = kvShape.reduce(1, *)
        mirrorKeys = [Float](repeating: 0, count: kvCount)
        mirrorValues = mirrorKeys
    }

    private func next(_ kind: String) throws -> (Int, Trace.Call) {
        let i = index
        guard i < calls.count else { throw Deviation(description: "call \(i) (\(kind)): the trace has only \(calls.count) calls") }
        guard calls[i].kind == kind else {
            throw Deviation(description: "call \(i): the session called \(kind), trace has \(calls[i].kind)")
        }
        index += 1
        return (i, calls[i])
    }

    func reset() throws {
        _ = try next("reset")
        mirrorKeys = [Float](repeating: 0, count: kvCount)
        mirrorValues = mirrorKeys
    }

    func vision(_ inputs: VisionInputs) async throws -> Tensor<Float> {
        let (i, call) = try next("vision")
        guard case .vision(let want, let features) = call else { fatalError() }
        let at = "call \(i) (vision)"
        try Self.same(at, "pixel_values", inputs.pixelValues, want.pixelValues)
        try Self.same(at, "position_ids", inputs.positionIDs, want.positionIDs)
        try Self.same(at, "patch_mask", inputs.patchMask, want.patchMask)
        try Self.same(at, "pos_embed", inputs.posEmbed, want.posEmbed)
        return features
    }

    func llm(_ inputs: LLMInputs) async throws -> LLMOutputs {
        let (i, call) = try next("llm")
        guard case .llm(let want) = call else { fatalError() }
        let at = "call \(i) (llm)"
        try Self.same(at, "position_ids", inputs.positionIDs, want.positionIDs)
        try Self.same(at, "last_index", inputs.lastIndex, want.lastIndex)
        try Self.same(at, "attention_mask", inputs.attentionMask, want.attentionMask)
        try Self.same(at, "inputs_embeds", inputs.inputsEmbeds, want.inputsEmbeds, tolerance: 1e-6)
        if ownsCache {
            try Self.same(at, "past_keys", inputs.pastKeys, Tensor(shape: [0], scalars: []))
            try Self.same(at, "past_values", inputs.pastValues, Tensor(shape: [0], scalars: []))
            return LLMOutputs(logits: want.logits)
        }
        // the trace's past shape says how many slots the step got (the filled ones, or all of them)
        try Self.same(at, "past_keys", inputs.pastKeys, Self.leading(want.pastShape, of: mirrorKeys, shape: kvShape))
        try Self.same(at, "past_values", inputs.pastValues, Self.leading(want.pastShape, of: mirrorValues, shape: kvShape))
        Self.write(want.newKeys, count: want.writeCount, at: want.writeStart, into: &mirrorKeys, shape: kvShape)
        Self.write(want.newValues, count: want.writeCount, at: want.writeStart, into: &mirrorValues, shape: kvShape)
        return LLMOutputs(logits: want.logits, newKeys: want.newKeys, newValues: want.newValues)
    }

    /// The first `want[2]` slots of every layer and head of the mirror `cache` (laid out as `shape`).
    private static func leading(_ want: [Int], of cache: [Float], shape: [Int]) -> Tensor<Float> {
        guard want.count == 4, want[2] <= shape[2] else { return Tensor(shape: [0], scalars: []) }  // shape deviation
        let (rows, slots, dim) = (shape[0] * shape[1], shape[2], shape[3])
        let scalars = (0..<rows).flatMap { r in cache[r * slots * dim..<(r * slots + want[2]) * dim] }
        return Tensor(shape: want, scalars: scalars)
    }

    /// The trace's cache write: slots [start, start+count) of every layer and head.
    private static func write(_ rows: Tensor<Float>, count: Int, at start: Int, into cache: inout [Float], shape: [Int]) {
        let (layers, heads, slots, dim) = (shape[0], shape[1], shape[2], shape[3]), t = rows.shape[2]
        for l in 0..<layers {
            for h in 0..<heads {
                let from = ((l * heads + h) * t) * dim, to = ((l * heads + h) * slots + start) * dim
                cache.replaceSubrange(to..<to + count * dim, with: rows.scalars[from..<from + count * dim])
            }
        }
    }

    /// "a[i,j] is X, trace has Y" for the first cell that differs (exactly, or by more than `tolerance`).
    static func same<T: Equatable & CustomStringConvertible>(_ at: String, _ field: String, _ got: Tensor<T>,
                                                             _ want: Tensor<T>, tolerance: Float? = nil) throws {
        guard got.shape == want.shape else {
            throw Deviation(description: "\(at): \(field) has shape \(got.shape), trace has \(want.shape)")
        }
        let differs: (Int) -> Bool
        if let tolerance, let g = got.scalars as? [Float], let w = want.scalars as? [Float] {
            differs = { !(abs(g[$0] - w[$0]) <= tolerance) }
        } else {
            if got.scalars == want.scalars { return }
            differs = { got.scalars[$0] != want.scalars[$0] }
        }
        guard let k = got.scalars.indices.first(where: differs) else { return }
        throw Deviation(description: "\(at): \(field)\(cell(k, want.shape)) is \(got.scalars[k]), trace has \(want.scalars[k])")
    }

    static func cell(_ flat: Int, _ shape: [Int]) -> String {
        var rest = flat, index: [Int] = []
        for d in shape.reversed() {
            index.append(rest % d)
            rest /= d
        }
        return "[" + index.reversed().map(String.init).joined(separator: ",") + "]"
    }
}

/// Decodes with the trace's recorded prefix texts (Python's tokenizer output), so `TextStreamer` runs the
/// streaming logic on real decodes; ids the trace never decoded give a visible marker.
func recordedDecoder(_ turn: Trace.Turn) -> TextStreamer {
    var table: [[Int]: String] = [:]
    for (n, text) in turn.decoded.enumerated() { table[Array(turn.tokenIDs.prefix(n + 1))] = text }
    let known = table
    return TextStreamer { ids in known[ids] ?? "<ids \(ids) not in the trace>" }
}

/// Replays `trace` through `Session` on a `ReplayBackend`: the deviations found, in order (empty = identical).
/// A backend deviation ends the replay (everything after it would differ too).
/// With `chain`, the turns are built by Swift's `ChatPrompt` from the recorded messages (checked against the
/// ids Python built) and decoded by the tokenizer's `StreamingDecoder` instead of the recorded decodes.
func replayTrace(_ trace: Trace, streaming: Bool = false, ownsCache: Bool = false,
                 chain: (prompt: ChatPrompt, tokenizer: Tokenizer)? = nil) async throws -> [String] {
    let manifest = try Manifest.load(directory: trace.export, verify: false)
    let backend = ReplayBackend(trace, kvShape: manifest.schedule.kvCache.shape, ownsCache: ownsCache)
    let session = try Session(manifest: manifest, backend: backend, onContextFull: trace.policy,
                              prefillChunk: trace.chunk)
    var failures: [String] = []
    do {
        for (number, event) in trace.events.enumerated() {
            guard case .turn(let turn) = event else {
                try await session.reset()
                continue
            }
            let at = "event \(number) (turn)"
            var ids = turn.builtIDs, bounds = turn.builtBounds
            if let chain {
                let built = await session.isFresh ? try chain.prompt.build(turn.messages)
                    : try chain.prompt.buildTurn(turn.messages, firstImage: await session.historyImages)
                if built.inputIDs != ids || built.imageBounds != bounds {
                    failures.append("\(at): ChatPrompt built \(built.inputIDs) \(built.imageBounds), trace has \(ids) \(bounds)")
                }
                (ids, bounds) = (built.inputIDs, built.imageBounds)
            }
            let input = TurnInput(inputIDs: ids, imageBounds: bounds, imageBatches: turn.visionBatches,
                                  images: turn.images, slices: turn.slices)
            do {
                let (result, pieces) = try await answer(session, input, turn, streaming: streaming,
                                                        tokenizer: chain?.tokenizer)
                if let error = turn.error { failures.append("\(at): answered, trace has the error '\(error)'") }
                failures += compare(at, result, pieces, turn)
            } catch let error as MiniCPMError {
                if error.description != turn.error {
                    failures.append("\(at): error '\(error)', trace has \(turn.error.map { "'\($0)'" } ?? "an answer")")
                }
            }
            if await session.historyIDs != turn.historyIDs { failures.append("\(at): history ids differ") }
            if await session.historyImages != turn.historyImages { failures.append("\(at): history images differ") }
            let history = await session.historyBounds
            if history != turn.historyBounds { failures.append("\(at): image bounds \(history), trace has \(turn.historyBounds)") }
            let length = await session.cacheLength, pending = await session.pending
            if length != turn.cacheLength { failures.append("\(at): cache length is \(length), trace has \(turn.cacheLength)") }
            if pending != turn.pendingAfter { failures.append("\(at): pending is \(pending), trace has \(turn.pendingAfter)") }
            let cache = await session.cacheSnapshot()
            if ownsCache ? !(cache.keys.isEmpty && cache.values.isEmpty)
                : (cache.keys != backend.mirrorKeys || cache.values != backend.mirrorValues) {
                failures.append("\(at): the host KV cache differs from the trace's writes")
            }
        }
        if backend.index != trace.calls.count {
            failures.append("the session made \(backend.index) calls, trace has \(trace.calls.count)")
        }
    } catch let deviation as Deviation {
        failures.append(deviation.description)
    }
    return failures
}

private func answer(_ session: Session, _ input: TurnInput, _ turn: Trace.Turn, streaming: Bool,
                    tokenizer: Tokenizer?) async throws -> (TurnResult, [String]) {
    if let tokenizer {
        let collected = Pieces()
        let result = try await session.respond(to: input, sampling: turn.sampling,
                                               decoder: StreamingDecoder(tokenizer: tokenizer)) { collected.append($0) }
        return (result, collected.all)
    }
    if streaming {
        var pieces: [String] = []
        for try await piece in session.ask(input, sampling: turn.sampling, decoder: recordedDecoder(turn)) {
            pieces.append(piece)
        }
        return (try #require(await session.lastResult), pieces)
    }
    let collected = Pieces()
    let result = try await session.respond(to: input, sampling: turn.sampling, decoder: recordedDecoder(turn)) {
        collected.append($0)
    }
    return (result, collected.all)
}

/// Text pieces collected from the `onText` callback.
private final class Pieces: @unchecked Sendable {
    private let lock = NSLock()
    private var pieces: [String] = []
    func append(_ s: String) { lock.withLock { pieces.append(s) } }
    var all: [String] { lock.withLock { pieces } }
}

private func compare(_ at: String, _ r: TurnResult, _ pieces: [String], _ t: Trace.Turn) -> [String] {
    var out: [String] = []
    if r.tokenIDs.count != t.tokenIDs.count {
        out.append("\(at): \(r.tokenIDs.count) token ids, trace has \(t.tokenIDs.count)")
    }
    if let k = zip(r.tokenIDs, t.tokenIDs).map({ $0 != $1 }).firstIndex(of: true) {
        out.append("\(at): token_ids[\(k)] is \(r.tokenIDs[k]), trace has \(t.tokenIDs[k])")
    }
    if r.text != t.text { out.append("\(at): text is \(r.text.debugDescription), trace has \(t.text.debugDescription)") }
    if pieces != t.pieces { out.append("\(at): streamed pieces \(pieces), trace has \(t.pieces)") }
    if r.finishReason.rawValue != t.finishReason {
        out.append("\(at): finish reason is \(r.finishReason.rawValue), trace has \(t.finishReason)")
    }
    let stats = r.stats.dictionary
    if stats.keys.sorted() != t.statsKeys { out.append("\(at): stats keys \(stats.keys.sorted()), trace has \(t.statsKeys)") }
    for (key, want) in t.stats {
        let got: String? = switch stats[key] {
        case .number(let n): String(Int(n))
        case .string(let s): s
        default: nil
        }
        if got != "\(want)" { out.append("\(at): stats[\(key)] is \(got ?? "missing"), trace has \(want)") }
    }
    return out
}

@Suite("Session trace replay")
struct TraceReplayTests {
    @Test("every recorded conversation replays call for call, with the same tokens, text and finish reasons")
    func replayAll() async throws {
        let traces = try Trace.all()
        #expect(traces.count >= 7)
        for trace in traces {
            let failures = try await replayTrace(trace)
            #expect(failures.isEmpty, "\(trace.name): \(failures.joined(separator: "; "))")
            let turns = trace.events.filter { if case .turn = $0 { true } else { false } }.count
            print("trace \(trace.name): \(trace.calls.count) calls, \(turns) turns, \(failures.count) deviations")
        }
    }

    @Test("a backend that owns its cache gets empty past K/V, and the host keeps none")
    func statefulBackend() async throws {
        for name in ["two_turns", "context_full_stop"] {
            let failures = try await replayTrace(try Trace.named(name), ownsCache: true)
            #expect(failures.isEmpty, "\(name): \(failures.joined(separator: "; "))")
        }
    }

    @Test("the whole Swift chain: ChatPrompt builds the turns, StreamingDecoder streams the text, as Python did")
    func chain() async throws {
        for trace in try Trace.all() {
            let tokenizer = try Tokenizer(directory: trace.export)
            let prompt = ChatPrompt(pieces: try PromptPieces.load(manifest: trace.export.appendingPathComponent("manifest.json")),
                                    tokenizer: tokenizer)
            let failures = try await replayTrace(trace, chain: (prompt, tokenizer))
            #expect(failures.isEmpty, "\(trace.name): \(failures.joined(separator: "; "))")
        }
    }

    @Test("ask streams the same pieces and leaves the whole answer in lastResult")
    func streaming() async throws {
        for name in ["two_turns", "chunk7_pending"] {
            let failures = try await replayTrace(try Trace.named(name), streaming: true)
            #expect(failures.isEmpty, "\(name): \(failures.joined(separator: "; "))")
        }
    }
}

@Suite("Session trace replay: deviations are caught and named")
struct TraceDeviationTests {
    static let name = "chunk7_pending"
    static let call = 4  // the third prefill chunk of the first turn (cache slots 0..<14 filled)

    static func llm(_ trace: Trace, _ i: Int) -> Trace.LLMCall {
        guard case .llm(let c) = trace.calls[i] else { fatalError("call \(i) is not an llm call") }
        return c
    }

    static func tampered(_ edit: (inout Trace.LLMCall) -> Void) throws -> Trace {
        var trace = try Trace.named(name)
        var c = llm(trace, call)
        edit(&c)
        trace.calls[call] = .llm(c)
        return trace
    }

    @Test("the untampered trace replays clean (so each failure below is the tampering's)")
    func clean() async throws {
        #expect(try await replayTrace(try Trace.named(Self.name)).isEmpty)
    }

    @Test("a position id off by one names the call and the cell")
    func position() async throws {
        let original = Self.llm(try Trace.named(Self.name), Self.call).positionIDs.scalars[3]
        let trace = try Self.tampered { $0.positionIDs.scalars[3] += 1 }
        let failures = try await replayTrace(trace)
        #expect(failures == ["call 4 (llm): position_ids[0,3] is \(original), trace has \(original + 1)"])
    }

    @Test("one changed mask cell names the call and the cell")
    func mask() async throws {
        let trace = try Self.tampered { $0.attentionMask.scalars[2 * (14 + 7) + 5] = -1e30 }  // 14 filled slots + 7 new
        let failures = try await replayTrace(trace)
        #expect(failures == ["call 4 (llm): attention_mask[0,0,2,5] is 0.0, trace has \(Float(-1e30))"])
    }

    @Test("an embedding off by 1e-3 names the call and the cell")
    func embedding() async throws {
        let original = Self.llm(try Trace.named(Self.name), Self.call).inputsEmbeds.scalars[256 + 2]
        let trace = try Self.tampered { $0.inputsEmbeds.scalars[256 + 2] += 1e-3 }
        let failures = try await replayTrace(trace)
        #expect(failures == ["call 4 (llm): inputs_embeds[0,1,2] is \(original), trace has \(original + 1e-3)"])
    }

    @Test("a cache write one slot off shows in the next call's past_keys")
    func cacheWrite() async throws {
        let trace = try Self.tampered { $0.writeStart += 1 }
        let failures = try await replayTrace(trace)
        let written = Self.llm(trace, Self.call).newKeys.scalars[0]
        #expect(failures == ["call 5 (llm): past_keys[0,0,14,0] is \(written), trace has 0.0"])
    }

    @Test("a changed token names the turn and the position")
    func token() async throws {
        var trace = try Trace.named(Self.name)
        guard case .turn(var turn) = trace.events[0] else { Issue.record("event 0 is not a turn"); return }
        let original = turn.tokenIDs[1]
        turn.tokenIDs[1] = original + 1
        trace.events[0] = .turn(turn)
        let failures = try await replayTrace(trace)
        #expect(failures.first == "event 0 (turn): token_ids[1] is \(original), trace has \(original + 1)")
    }

    @Test("a missing call names the call and both kinds")
    func order() async throws {
        var trace = try Trace.named(Self.name)
        trace.calls.remove(at: 1)  // the vision call
        let failures = try await replayTrace(trace)
        #expect(failures == ["call 1: the session called vision, trace has llm"])
    }
}
