// Added and special tokens: matched as whole ids before anything else (tokenizers' `AddedVocabulary`).
import Foundation

/// A token string compared and hashed by its UTF-8 bytes (Swift's String equality would equate canonically
/// equivalent spellings, which are different tokens).
struct TokenKey: Hashable, Sendable {
    let string: String
    init(_ string: String) { self.string = string }

    static func == (a: TokenKey, b: TokenKey) -> Bool {
        var x = a.string, y = b.string
        return x.withUTF8 { p in
            y.withUTF8 { q in p.count == q.count && (p.isEmpty || memcmp(p.baseAddress!, q.baseAddress!, p.count) == 0) }
        }
    }

    func hash(into hasher: inout Hasher) {
        var s = string
        s.withUTF8 { hasher.combine(bytes: UnsafeRawBufferPointer($0)) }
    }
}

/// One entry of `added_tokens` (tokenizer.json) or `added_tokens_decoder` (tokenizer_config.json).
struct AddedToken: Sendable {
    let id: Int
    let content: String
    let special: Bool
    let lstrip: Bool
    let rstrip: Bool
    let normalized: Bool
    let singleWord: Bool
}

/// The added tokens of a tokenizer and the two matchers over them: raw text (normalized == false) and
/// normalized text (normalized == true).
struct AddedVocabulary: Sendable {
    let tokens: [AddedToken]
    private let byId: [Int: Int]
    private let byContent: [TokenKey: Int]
    private let specials: Set<TokenKey>
    /// The pattern of each token (its content, or for normalized tokens its normalized content).
    private let patterns: [[Unicode.Scalar]]
    /// First scalar -> indices of tokens starting with it, longest first; one table per pass.
    private let rawStarts: [UInt32: [Int]]
    private let normalizedStarts: [UInt32: [Int]]

    init(_ tokens: [AddedToken], normalizer: Normalizer?) {
        var unique: [AddedToken] = []
        var byId: [Int: Int] = [:]
        for t in tokens where byId[t.id] == nil {  // the first entry of an id wins
            byId[t.id] = unique.count
            unique.append(t)
        }
        self.tokens = unique
        self.byId = byId
        var byContent: [TokenKey: Int] = [:]
        for (i, t) in unique.enumerated() where byContent[TokenKey(t.content)] == nil {
            byContent[TokenKey(t.content)] = i
        }
        self.byContent = byContent
        specials = Set(unique.filter(\.special).map { TokenKey($0.content) })
        let patterns = unique.map { t -> [Unicode.Scalar] in
            let s = Array(t.content.unicodeScalars)
            return t.normalized ? (normalizer?.apply(s) ?? s) : s
        }
        self.patterns = patterns
        func table(normalized: Bool) -> [UInt32: [Int]] {
            var out: [UInt32: [Int]] = [:]
            for (i, t) in unique.enumerated() where t.normalized == normalized {
                guard let first = patterns[i].first else { continue }
                out[first.value, default: []].append(i)
            }
            return out.mapValues { $0.sorted { patterns[$0].count > patterns[$1].count } }
        }
        rawStarts = table(normalized: false)
        normalizedStarts = table(normalized: true)
    }

    /// The token text an id decodes to when it is an added token (normalized tokens give their normalized form).
    func content(of id: Int) -> String? {
        guard let i = byId[id] else { return nil }
        return tokens[i].normalized ? Normalizer.string(patterns[i]) : tokens[i].content
    }

    func id(of content: String) -> Int? { byContent[TokenKey(content)].map { tokens[$0].id } }

    func isSpecial(_ token: String) -> Bool { specials.contains(TokenKey(token)) }

    var ids: [Int] { tokens.map(\.id) }

    /// `s` cut into stretches: added-token matches (with their id) and the text between them (id nil).
    /// Leftmost-longest matching; lstrip / rstrip absorb neighbouring whitespace; single_word tokens match only
    /// between non-word characters (tokenizers' `find_matches`).
    func split(_ s: [Unicode.Scalar], normalizedPass: Bool) -> [(range: Range<Int>, id: Int?)] {
        let starts = normalizedPass ? normalizedStarts : rawStarts
        guard !starts.isEmpty, !s.isEmpty else { return [(0..<s.count, nil)] }
        var out: [(range: Range<Int>, id: Int?)] = []
        var offset = 0
        var i = 0
        while i < s.count {
            guard let candidates = starts[s[i].value],
                  let k = candidates.first(where: { Self.matches(s, at: i, patterns[$0]) }) else {
                i += 1
                continue
            }
            let token = tokens[k]
            var start = i, stop = i + patterns[k].count
            i = stop
            if token.singleWord {
                let before = start > 0 && Self.isWordChar(s[start - 1])
                let after = stop < s.count && Self.isWordChar(s[stop])
                if before || after { continue }
            }
            if token.lstrip {
                var j = start
                while j > 0 && s[j - 1].properties.isWhitespace { j -= 1 }
                start = max(j, offset)
            }
            if token.rstrip {
                while stop < s.count && s[stop].properties.isWhitespace { stop += 1 }
                i = stop
            }
            if offset < start { out.append((offset..<start, nil)) }
            out.append((start..<stop, token.id))
            offset = stop
        }
        if offset < s.count { out.append((offset..<s.count, nil)) }
        return out
    }

    private static func matches(_ s: [Unicode.Scalar], at i: Int, _ p: [Unicode.Scalar]) -> Bool {
        guard i + p.count <= s.count else { return false }
        for k in 0..<p.count where s[i + k] != p[k] { return false }
        return true
    }

    /// Rust regex `\w`: alphabetic, marks, decimal digits, connector punctuation, join controls.
    private static func isWordChar(_ c: Unicode.Scalar) -> Bool {
        let p = c.properties
        if p.isAlphabetic || p.isJoinControl { return true }
        switch p.generalCategory {
        case .nonspacingMark, .spacingMark, .enclosingMark, .decimalNumber, .connectorPunctuation: return true
        default: return false
        }
    }
}
