// Chat messages -> input ids and image placeholder spans, from the manifest's prompt pieces (minicpm/prompt.py).
import Foundation

/// One chat message: a role and its content items, in order (upstream `chat()` puts images before the text).
public struct ChatMessage: Sendable {
    public enum Role: String, Sendable, CaseIterable {
        case system, user, assistant
    }

    /// A content item. Images and video groups stand for their placeholder spans; the prompt needs only an
    /// image's slice grid (`ImageProcessor` computes it), not its pixels.
    public enum Content: Sendable {
        case text(String)
        /// An image, sliced into `grid` (cols, rows) cells after its overview, or not sliced (nil).
        case image(grid: (cols: Int, rows: Int)?)
        /// One group of video frames resampled together (MiniCPM-V 4.5): one span, no image id, no slices.
        case videoGroup(frames: Int)

        /// The item for an image `ImageProcessor.process` has sliced.
        public static func image(_ processed: ProcessedImage) -> Content { .image(grid: processed.grid) }
    }

    public var role: Role
    public var content: [Content]

    public init(role: Role, content: [Content]) {
        self.role = role
        self.content = content
    }

    public static func system(_ text: String) -> ChatMessage { ChatMessage(role: .system, content: [.text(text)]) }
    public static func user(_ content: Content...) -> ChatMessage { ChatMessage(role: .user, content: content) }
    public static func assistant(_ text: String) -> ChatMessage {
        ChatMessage(role: .assistant, content: [.text(text)])
    }
}

/// What the LLM path needs from a prompt (Python's `Prompt`): token ids and the placeholder spans, in order
/// (per image: its overview, then its slices row by row; one span per video group).
public struct PromptTokens: Sendable, Equatable {
    public let inputIDs: [Int]
    public let imageBounds: [Range<Int>]
    /// The text that was tokenized (placeholders expanded).
    public let text: String
}

/// Builds prompts exactly as `PromptBuilder.build` / `build_turn` do, from the manifest's prompt pieces and the
/// export's tokenizer (no template interpreter).
public struct ChatPrompt: Sendable {
    public let pieces: PromptPieces
    public let tokenizer: Tokenizer

    public init(pieces: PromptPieces, tokenizer: Tokenizer) {
        self.pieces = pieces
        self.tokenizer = tokenizer
    }

    /// The first turn of a conversation: the whole chat rendered, BOS (if the tokenizer adds one), image ids from 0.
    public func build(_ messages: [ChatMessage], enableThinking: Bool = false) throws -> PromptTokens {
        try tokens(pieces.text(messages, enableThinking: enableThinking), continuation: false)
    }

    /// The tokens that continue a conversation whose KV cache ends with the last generated token: the previous
    /// answer closed, then `messages` and the generation prompt; image ids continue from `firstImage`.
    public func buildTurn(_ messages: [ChatMessage], firstImage: Int, enableThinking: Bool = false) throws
        -> PromptTokens {
        try tokens(pieces.text(messages, enableThinking: enableThinking, firstImage: firstImage, continuation: true),
                   continuation: true)
    }

    private func tokens(_ text: String, continuation: Bool) throws -> PromptTokens {
        var ids = tokenizer.encode(text, addSpecialTokens: false)
        if !continuation { ids = pieces.bosIDs + ids + pieces.eosIDs }  // a continuation joins tokens already cached
        if !pieces.droppedIDs.isEmpty {
            let dropped = Set(pieces.droppedIDs)
            ids.removeAll { dropped.contains($0) }
        }
        return PromptTokens(inputIDs: ids, imageBounds: try pieces.imageBounds(ids), text: text)
    }
}

extension PromptPieces {
    /// The text a prompt tokenizes: the messages rendered with the template pieces and every image tag expanded.
    /// Throws `MiniCPMError.invalidInput` for no messages, a text holding the reserved image tag, or a
    /// conversation the pieces cannot render (an answer after the last query, when `trailingAssistant` is false).
    public func text(_ messages: [ChatMessage], enableThinking: Bool, firstImage: Int = 0,
                     continuation: Bool = false) throws -> String {
        guard !messages.isEmpty else { throw MiniCPMError.invalidInput("no messages") }
        let tag = Array(imageTag.utf8)
        var chat: [(ChatMessage.Role, [UInt8])] = []
        var spans: [ChatMessage.Content] = []
        for message in messages {
            var parts: [String] = []
            for item in message.content {
                if case .text(let text) = item { parts.append(text) } else { spans.append(item); parts.append(imageTag) }
            }
            chat.append((message.role, Array(parts.joined(separator: contentJoiner).utf8)))
        }
        let rendered = continuation ? renderTurn(chat, enableThinking) : try render(chat, enableThinking)
        let chunks = rendered.split(bytes: tag)
        guard chunks.count - 1 == spans.count else {
            throw MiniCPMError.invalidInput("the text contains the reserved image tag \(imageTag)")
        }
        var out = chunks[0]
        for (i, span) in spans.enumerated() {
            out += Array(expand(span, index: firstImage + i).utf8) + chunks[i + 1]
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// The placeholder spans in `ids` (start exclusive of its marker, end at the closing marker).
    public func imageBounds(_ ids: [Int]) throws -> [Range<Int>] {
        let starts = Set(spanStartIDs), ends = Set(spanEndIDs)
        let open = ids.indices.filter { starts.contains(ids[$0]) }.map { $0 + 1 }
        let close = ids.indices.filter { ends.contains(ids[$0]) }
        guard open.count == close.count, zip(open, close).allSatisfy({ $0 <= $1 }) else {
            throw MiniCPMError.invalidInput("unbalanced image placeholder tokens in the prompt")
        }
        return zip(open, close).map { $0..<$1 }
    }

    private func generationPrompt(_ enableThinking: Bool) -> [UInt8] {
        Array((enableThinking ? generation.thinking : generation.noThinking).utf8)
    }

    /// The whole conversation as the checkpoint's template renders it (`PromptBuilder.render`).
    private func render(_ chat: [(ChatMessage.Role, [UInt8])], _ enableThinking: Bool) throws -> [UInt8] {
        var out = Array(prefix.utf8) + (chat[0].0 != .system ? Array(defaultSystem.utf8) : [])
        let lastQuery = lastQueryIndex(chat)
        for (i, (role, text)) in chat.enumerated() {
            var content = text
            if role == .assistant {
                if i > lastQuery && !trailingAssistant {
                    throw MiniCPMError.invalidInput("this chat template renders an assistant message after the last "
                                                    + "user message differently; such a conversation cannot be built "
                                                    + "from the prompt pieces")
                }
                if let close = historyReasoning.map({ Array($0.close.utf8) }), content.contains(bytes: close) {
                    // the text after the last close tag, leading "\n" removed (Python's split(close)[-1].lstrip("\n"))
                    content = Array(content.split(bytes: close).last!.drop(while: { $0 == 0x0A }))
                }
            }
            let r = self.role(role)
            out += Array(r.header.utf8) + content + Array(r.footer.utf8)
        }
        return out + generationPrompt(enableThinking)
    }

    /// A follow-up turn (`PromptBuilder.build_turn`): the messages as they are, no default system prompt.
    private func renderTurn(_ chat: [(ChatMessage.Role, [UInt8])], _ enableThinking: Bool) -> [UInt8] {
        var out = Array(continuation.utf8)
        for (role, content) in chat {
            let r = self.role(role)
            out += Array(r.header.utf8) + content + Array(r.footer.utf8)
        }
        return out + generationPrompt(enableThinking)
    }

    /// The last user message that is a query (not a wrapped tool response), else the last message.
    private func lastQueryIndex(_ chat: [(ChatMessage.Role, [UInt8])]) -> Int {
        let wrap = nonQueryUser.map { (Array($0.prefix.utf8), Array($0.suffix.utf8)) }
        for i in chat.indices.reversed() where chat[i].0 == .user {
            guard let (head, tail) = wrap else { return i }
            let c = chat[i].1
            if !(c.starts(with: head) && c.reversed().starts(with: tail.reversed())) { return i }
        }
        return chat.count - 1
    }

    /// One image's (or video group's) placeholder text (`PromptBuilder.image_placeholder`).
    private func expand(_ span: ChatMessage.Content, index: Int) -> String {
        let p = placeholder
        let unks = String(repeating: p.unk, count: p.queryNum)
        var text = p.imageStart + unks + p.imageEnd
        switch span {
        case .image(let grid):
            if p.useImageID { text = p.idStart + String(index) + p.idEnd + text }
            if let grid {
                let row = String(repeating: p.sliceStart + unks + p.sliceEnd, count: grid.cols)
                text += Array(repeating: row, count: grid.rows).joined(separator: p.sliceRowJoiner)
            }
        case .videoGroup:
            if p.useImageID && p.videoImageID { text = p.idStart + String(index) + p.idEnd + text }
        case .text:
            break
        }
        return text
    }
}

// Byte-wise (UTF-8) search and split: Python compares code points, Swift's String compares canonical
// equivalents, so the prompt text is cut as bytes (UTF-8 is self-synchronising: same positions).
extension Array where Element == UInt8 {
    fileprivate func range(of needle: [UInt8], from start: Int) -> Range<Int>? {
        guard !needle.isEmpty, count >= needle.count, start <= count - needle.count else { return nil }
        for i in start...(count - needle.count) where self[i] == needle[0] {
            if self[i..<(i + needle.count)].elementsEqual(needle) { return i..<(i + needle.count) }
        }
        return nil
    }

    fileprivate func contains(bytes needle: [UInt8]) -> Bool { range(of: needle, from: 0) != nil }

    /// Python's `str.split(sep)`: left to right, non-overlapping, empty pieces kept.
    fileprivate func split(bytes separator: [UInt8]) -> [[UInt8]] {
        var pieces: [[UInt8]] = [], start = 0
        while let r = range(of: separator, from: start) {
            pieces.append(Array(self[start..<r.lowerBound]))
            start = r.upperBound
        }
        pieces.append(Array(self[start...]))
        return pieces
    }
}
