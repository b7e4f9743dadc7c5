import Testing
@testable import MiniCPMKit
import Foundation

/// Conformance of `Tokenizer` and `StreamingDecoder` with transformers (`ios_bridge/vectors/tokenizer.py`):
/// exact ids, exact text and exact streamed pieces for every case of every model.
@Suite struct TokenizerTests {
    typealias Model = (name: String, tokenizer: Tokenizer, cases: [String: Any])

    /// The loaded models, shared by the tests (case files are read-only after loading).
    final class Loaded: @unchecked Sendable {
        let models: Result<[Model], Error>
        init() { models = Result { try TokenizerTests.load() } }
    }
    static let loaded = Loaded()

    static func models() throws -> [Model] { try loaded.models.get() }

    /// Each model's case file and its tokenizer (load time printed).
    static func load() throws -> [Model] {
        try Vectors.cases("tokenizer").map { url in
            let c = try Vectors.load(url)
            let dir = url.deletingLastPathComponent().appendingPathComponent(c["directory"] as! String)
            let start = Date()
            let tokenizer = try Tokenizer(directory: dir)
            let ms = Int(Date().timeIntervalSince(start) * 1000)
            print("tokenizer \(c["model"]!): loaded in \(ms) ms, \(tokenizer.vocabularySize) ids")
            return (c["model"] as! String, tokenizer, c)
        }
    }

    /// "" when equal, else where the two sequences first differ.
    static func firstDifference<T: Equatable>(_ got: [T], _ want: [T]) -> String {
        if got == want { return "" }
        let i = (0..<min(got.count, want.count)).first { got[$0] != want[$0] } ?? min(got.count, want.count)
        func at(_ a: [T]) -> String { i < a.count ? "\(a[i])" : "<end>" }
        return "first difference at \(i): got \(at(got)), want \(at(want)) (lengths \(got.count) / \(want.count))"
    }

    static func scalars(_ s: String) -> [UInt32] { s.unicodeScalars.map(\.value) }

    @Test func encodeMatchesTransformers() throws {
        var checked = 0
        for m in try Self.models() {
            for c in m.cases["encode"] as! [[String: Any]] {
                let special = c["add_special_tokens"] as! Bool
                let got = m.tokenizer.encode(c["text"] as! String, addSpecialTokens: special)
                let diff = Self.firstDifference(got, c["ids"] as! [Int])
                #expect(diff.isEmpty, "\(m.name) encode \(c["name"]!) (add_special_tokens \(special)): \(diff)")
                checked += 1
            }
        }
        #expect(checked >= 4 * 40)
    }

    @Test func decodeMatchesTransformers() throws {
        for m in try Self.models() {
            for c in m.cases["decode"] as! [[String: Any]] {
                let skip = c["skip_special_tokens"] as! Bool
                let got = m.tokenizer.decode(c["ids"] as! [Int], skipSpecialTokens: skip)
                let diff = Self.firstDifference(Self.scalars(got), Self.scalars(c["text"] as! String))
                #expect(diff.isEmpty, "\(m.name) decode \(c["name"]!) (skip_special_tokens \(skip)): scalar \(diff)")
            }
        }
    }

    @Test func streamingMatchesTextStreamer() throws {
        for m in try Self.models() {
            for c in m.cases["stream"] as! [[String: Any]] {
                var stream = StreamingDecoder(tokenizer: m.tokenizer)
                var pieces: [String] = []
                for id in c["ids"] as! [Int] {
                    let piece = stream.put(id)
                    if !piece.isEmpty { pieces.append(piece) }
                }
                pieces.append("<end>")
                let rest = stream.end()
                if !rest.isEmpty { pieces.append(rest) }
                let want = c["pieces"] as! [String]
                let diff = Self.firstDifference(pieces.map(Self.scalars), want.map(Self.scalars))
                #expect(diff.isEmpty, "\(m.name) stream \(c["name"]!): piece \(diff)")
                #expect(stream.text == want.filter { $0 != "<end>" }.joined(), "\(m.name) stream \(c["name"]!): text")
                #expect(stream.text == m.tokenizer.decode(c["ids"] as! [Int]), "\(m.name) stream \(c["name"]!): text")
            }
        }
    }

    @Test func vocabularyAndTokenLookups() throws {
        for m in try Self.models() {
            #expect(m.tokenizer.vocabularySize == m.cases["vocabulary_size"] as! Int, "\(m.name): vocabulary size")
            for t in m.cases["tokens"] as! [[String: Any]] {
                let token = t["token"] as! String
                if let id = t["id"] as? Int {
                    let got = m.tokenizer.token(for: id).map(Self.scalars)
                    #expect(got == Self.scalars(token), "\(m.name): token(for: \(id))")
                }
                // Added tokens first: o-4.5's <unk> is both vocabulary id 128244 and an added token.
                #expect(m.tokenizer.id(for: token) == t["id_of_token"] as? Int, "\(m.name): id(for: \(token))")
            }
            #expect(m.tokenizer.token(for: -1) == nil && m.tokenizer.token(for: 10_000_000) == nil)
            #expect(m.tokenizer.id(for: "no such token \u{1}") == nil)
        }
    }

    @Test func loadFailuresAreOneLine() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("tok-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        func failure() -> String? {
            do { _ = try Tokenizer(directory: dir); return nil } catch let e as MiniCPMError {
                if case .invalidExport(let m) = e { return m } else { return nil }
            } catch { return nil }
        }
        #expect(failure()?.contains("no tokenizer.json") == true)
        let json = dir.appendingPathComponent("tokenizer.json")
        try Data("{\"model\": {\"type\": \"Unigram\"}}".utf8).write(to: json)
        #expect(failure()?.contains("Unigram") == true)
        try Data(#"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}"#.utf8).write(to: json)
        #expect(failure()?.contains("merge 0") == true)
        try Data("not json".utf8).write(to: json)
        #expect(failure().map { !$0.contains("\n") } == true)
    }
}
