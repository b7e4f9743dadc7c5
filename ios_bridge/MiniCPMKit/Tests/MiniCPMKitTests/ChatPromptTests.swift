import Foundation
import Testing
@testable import MiniCPMKit

/// Conformance of `ChatPrompt` with `PromptBuilder.build` / `build_turn` (`ios_bridge/vectors/prompts.py`): every
/// case's text, input ids and image spans, per model, from the manifest's prompt pieces and the tokenizer files.
@Suite struct ChatPromptTests {
    struct Turn {
        let call: String
        let messages: [ChatMessage]
        let enableThinking: Bool
        let firstImage: Int
        let inputIDs: [Int]
        let imageBounds: [Range<Int>]
        let text: String
    }

    struct Case {
        let label: String  // "model / case"
        let directory: URL
        let turns: [Turn]
        let error: String?
    }

    static func messages(_ json: Any?) -> [ChatMessage] {
        ((json as? [[String: Any]]) ?? []).map { m in
            let items: [ChatMessage.Content] = ((m["content"] as? [[String: Any]]) ?? []).map { item in
                switch item["type"] as? String {
                case "image":
                    let grid = item["grid"] as? [Int]
                    return .image(grid: grid.map { (cols: $0[0], rows: $0[1]) })
                case "video_group": return .videoGroup(frames: item["frames"] as? Int ?? 1)
                default: return .text(item["text"] as? String ?? "")
                }
            }
            return ChatMessage(role: ChatMessage.Role(rawValue: m["role"] as! String)!, content: items)
        }
    }

    static func cases() throws -> [Case] {
        try Vectors.cases("prompts").map { url in
            let c = try Vectors.load(url)
            let turns = (c["turns"] as! [[String: Any]]).map { t in
                Turn(call: t["call"] as! String, messages: messages(t["messages"]),
                     enableThinking: t["enable_thinking"] as? Bool ?? false, firstImage: t["first_image"] as? Int ?? 0,
                     inputIDs: t["input_ids"] as? [Int] ?? [],
                     imageBounds: ((t["image_bounds"] as? [[Int]]) ?? []).map { $0[0]..<$0[1] },
                     text: t["text"] as? String ?? "")
            }
            let directory = url.deletingLastPathComponent().appendingPathComponent(c["directory"] as! String)
            return Case(label: "\(c["model"] as! String) / \(c["case"] as! String)", directory: directory,
                        turns: turns, error: c["error"] as? String)
        }
    }

    /// Where two sequences first differ, for a readable failure ("position 17: 151669 vs 198").
    static func firstDifference<T: Equatable>(_ a: [T], _ b: [T]) -> String {
        let n = zip(a, b).prefix { $0 == $1 }.count
        let got = n < a.count ? "\(a[n])" : "end", want = n < b.count ? "\(b[n])" : "end"
        return "first difference at position \(n): got \(got), expected \(want) (lengths \(a.count) vs \(b.count))"
    }

    func text(_ prompt: PromptPieces, _ turn: Turn) throws -> String {
        try prompt.text(turn.messages, enableThinking: turn.enableThinking, firstImage: turn.firstImage,
                        continuation: turn.call == "turn")
    }

    @Test func renderedTextMatchesPython() throws {
        let cases = try Self.cases().filter { $0.error == nil }
        #expect(cases.count >= 40)
        var pieces: [URL: PromptPieces] = [:]
        for c in cases {
            if pieces[c.directory] == nil { pieces[c.directory] = try PromptPieces.load(manifest: c.directory) }
            for (k, turn) in c.turns.enumerated() {
                let got = try text(pieces[c.directory]!, turn)
                let (g, e) = (Array(got.utf8), Array(turn.text.utf8))
                let same = g == e  // bytes: Swift's == on String would accept canonically equivalent text
                #expect(same, "\(c.label) turn \(k) text: UTF-8 \(Self.firstDifference(g, e))")
            }
        }
    }

    @Test func inputIDsAndImageBoundsMatchPython() throws {
        let cases = try Self.cases().filter { $0.error == nil }
        #expect(cases.count >= 40)
        var prompts: [URL: ChatPrompt] = [:]
        for c in cases {
            if prompts[c.directory] == nil {
                prompts[c.directory] = ChatPrompt(pieces: try PromptPieces.load(manifest: c.directory),
                                                  tokenizer: try Tokenizer(directory: c.directory))
            }
            let prompt = prompts[c.directory]!
            for (k, turn) in c.turns.enumerated() {
                let got = turn.call == "build"
                    ? try prompt.build(turn.messages, enableThinking: turn.enableThinking)
                    : try prompt.buildTurn(turn.messages, firstImage: turn.firstImage, enableThinking: turn.enableThinking)
                // one readable line per mismatch (not the arrays), and only the first failing turn of a case
                let sameIDs = got.inputIDs == turn.inputIDs, sameBounds = got.imageBounds == turn.imageBounds
                #expect(sameIDs, "\(c.label) turn \(k) input ids: \(Self.firstDifference(got.inputIDs, turn.inputIDs))")
                #expect(sameBounds,
                        "\(c.label) turn \(k) image bounds: \(Self.firstDifference(got.imageBounds, turn.imageBounds))")
                if !(sameIDs && sameBounds) { break }
            }
        }
    }

    @Test func refusedConversationsThrow() throws {
        let cases = try Self.cases().filter { $0.error != nil }
        #expect(cases.count >= 8)
        var prompts: [URL: ChatPrompt] = [:]
        for c in cases {
            if prompts[c.directory] == nil {
                prompts[c.directory] = ChatPrompt(pieces: try PromptPieces.load(manifest: c.directory),
                                                  tokenizer: try Tokenizer(directory: c.directory))
            }
            let prompt = prompts[c.directory]!
            do {
                _ = try prompt.build(c.turns[0].messages, enableThinking: c.turns[0].enableThinking)
                Issue.record("\(c.label): built, but Python refuses it (\(c.error!))")
            } catch let error as MiniCPMError {
                #expect(error.description.contains(c.error!), "\(c.label): \(error)")
            }
        }
    }

    @Test func piecesOfMiniCPMo45() throws {
        let dir = Vectors.root.appendingPathComponent("prompts/tiny-minicpm-o-4.5")
        let p = try PromptPieces.load(manifest: dir.appendingPathComponent("manifest.json"))
        #expect(p.roles.user == PromptPieces.Role(header: "<|im_start|>user\n", footer: "<|im_end|>\n"))
        #expect(p.generation.noThinking == "<|im_start|>assistant\n<think>\n\n</think>\n\n")
        #expect(p.generation.thinking == "<|im_start|>assistant\n" && p.thinking)
        #expect(p.imageTag == "<image>./</image>" && p.droppedIDs == [151705] && p.bosIDs.isEmpty)
        #expect(p.spanStartIDs == [151669, 151679] && p.spanEndIDs == [151670, 151680])
        #expect(p.historyReasoning?.close == "</think>" && !p.trailingAssistant)
        #expect(p.placeholder.queryNum == 64 && p.placeholder.useImageID && !p.placeholder.videoImageID)
    }

    @Test func missingOrUnknownPromptSectionIsRefused() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("chatprompt-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let file = dir.appendingPathComponent("manifest.json")
        try Data(#"{"schema_version": 1}"#.utf8).write(to: file)
        #expect(throws: MiniCPMError.self) { try PromptPieces.load(manifest: dir) }
        try Data(#"{"prompt": {"version": 2}}"#.utf8).write(to: file)
        do {
            _ = try PromptPieces.load(manifest: file)
            Issue.record("an unknown prompt version was accepted")
        } catch let error as MiniCPMError {
            #expect(error.description.contains("version 2.0 is not supported"))
        }
    }

    /// Hand-made pieces, independent of any vectors: layout of one sliced image, a video group, reasoning cut.
    @Test func expandsPlaceholdersFromThePieces() throws {
        let json = #"""
        {"version": 1, "prefix": "", "default_system": "[sys]", "thinking": false, "history_reasoning": {"close": "</t>"},
         "non_query_user": null, "trailing_assistant": true, "continuation": "|\n", "content_joiner": "\n",
         "image_tag": "<I>", "bos_ids": [1], "eos_ids": [], "dropped_ids": [], "span_start_ids": [5], "span_end_ids": [6],
         "roles": {"system": {"header": "S:", "footer": "|\n"}, "user": {"header": "U:", "footer": "|\n"},
                   "assistant": {"header": "A:", "footer": "|\n"}},
         "generation": {"thinking": "A:", "no_thinking": "A:"},
         "placeholder": {"image_start": "<", "image_end": ">", "unk": "u", "query_num": 2, "slice_start": "[",
                         "slice_end": "]", "slice_row_joiner": "/", "use_image_id": true, "id_start": "#",
                         "id_end": "#", "video_image_id": false}}
        """#
        let pieces = try PromptPieces.decode(try JSONDecoder().decode(JSONValue.self, from: Data(json.utf8)))
        let messages = [ChatMessage.user(.image(grid: (cols: 2, rows: 2)), .videoGroup(frames: 3), .text("q")),
                        .assistant("why</t>\n\nsure"), .user(.text("é"))]
        #expect(try pieces.text(messages, enableThinking: false, firstImage: 4)
                == "[sys]U:#4#<uu>[uu][uu]/[uu][uu]\n<uu>\nq|\nA:sure|\nU:é|\nA:")
        #expect(try pieces.text([.user(.text("x"))], enableThinking: true, continuation: true) == "|\nU:x|\nA:")
        #expect(try pieces.imageBounds([1, 5, 0, 0, 6, 9, 5, 6]) == [2..<4, 7..<7])
        #expect(throws: MiniCPMError.self) { try pieces.imageBounds([6, 5]) }
        #expect(throws: MiniCPMError.self) { try pieces.text([.user(.text("a<I>"))], enableThinking: false) }
        #expect(throws: MiniCPMError.self) { try pieces.text([], enableThinking: false) }
    }
}
