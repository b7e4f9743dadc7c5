// Streaming text out of generated ids, as the Python side's `minicpm.generation.TextStreamer` does.

/// Turns ids into text pieces as they arrive, as `TextStreamer`: after each id the ids so far are decoded and
/// what is new is emitted, except while the text ends in U+FFFD (an incomplete UTF-8 sequence a later id may
/// complete). Pieces never split a UTF-8 character.
///
/// With a ByteLevel decoder (every supported checkpoint) only the bytes after the last settled UTF-8 boundary are
/// re-decoded, so a long answer costs linear time; other decoders re-decode every id, as `TextStreamer` does.
public struct StreamingDecoder: Sendable {
    /// The tokenizer whose `decode(_:skipSpecialTokens: true)` the pieces follow.
    public let tokenizer: Tokenizer
    private var ids: [Int] = []
    /// Unicode scalars emitted so far (Python counts code points).
    private var emitted = 0
    /// ByteLevel mode: bytes after the settled prefix, and the scalar count of the settled prefix's text.
    private var pending: [UInt8] = []
    private var settled = 0
    private let byteLevel: Bool
    /// The text emitted so far (every piece joined).
    public private(set) var text = ""

    public init(tokenizer: Tokenizer) {
        self.tokenizer = tokenizer
        if case .byteLevel = tokenizer.decoder { byteLevel = true } else { byteLevel = false }
    }

    /// Adds one id; returns the new text piece ("" while nothing new can be shown).
    public mutating func put(_ id: Int) -> String {
        if byteLevel {
            if let token = tokenizer.token(for: id), !tokenizer.added.isSpecial(token) {
                TokenDecoder.appendByteLevel(token, to: &pending)
            }
            let tail = UTF8Repair.string(pending)
            if tail.unicodeScalars.last == "\u{FFFD}" { return "" }
            let piece = emit(tail, offset: settled)
            // Everything is emitted now: settle the prefix whose text can no longer change.
            let cut = UTF8Repair.stablePrefix(pending[...])
            if cut > 0 {
                settled += UTF8Repair.string(Array(pending[..<cut])).unicodeScalars.count
                pending.removeFirst(cut)
            }
            return piece
        }
        ids.append(id)
        let decoded = tokenizer.decode(ids, skipSpecialTokens: true)
        if decoded.unicodeScalars.last == "\u{FFFD}" { return "" }
        return emit(decoded, offset: 0)
    }

    /// Ends the stream; returns what is left (held-back replacement characters included).
    public mutating func end() -> String {
        byteLevel ? emit(UTF8Repair.string(pending), offset: settled)
            : emit(tokenizer.decode(ids, skipSpecialTokens: true), offset: 0)
    }

    /// Emits the part of the full text beyond `emitted`, where `decoded` is the full text from scalar `offset` on.
    private mutating func emit(_ decoded: String, offset: Int) -> String {
        let scalars = decoded.unicodeScalars
        let total = offset + scalars.count
        guard total > emitted else { return "" }
        var piece = String.UnicodeScalarView()
        piece.append(contentsOf: scalars.dropFirst(emitted - offset))
        emitted = total
        let s = String(piece)
        text += s
        return s
    }
}
