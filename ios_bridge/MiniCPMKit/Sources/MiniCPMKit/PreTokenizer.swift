// Pre-tokenization as Hugging Face `tokenizers` does it: the GPT-2 / Qwen2 split regexes (hand-written matchers
// with Oniguruma's backtracking semantics, over Unicode scalars), ByteLevel's byte-to-character map and Metaspace.

/// A split pattern of the `Split` pre-tokenizer (or ByteLevel's built-in regex).
enum SplitPattern: Sendable, Equatable {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` (GPT-2, ByteLevel's own).
    case gpt2
    /// `(?i:'s|...|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,digits}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    /// (Qwen2 with digits 1, Llama 3 with digits 3).
    case qwen(digits: Int)
    /// A plain string (`{"String": ...}` patterns).
    case literal([Unicode.Scalar])

    static let gpt2Regex = #"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"#
    static let qwenRegex = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#
    static let llama3Regex = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#

    /// The pattern for a tokenizer.json regex, or nil when it is not one of the known ones.
    init?(regex: String) {
        switch regex {
        case Self.gpt2Regex: self = .gpt2
        case Self.qwenRegex: self = .qwen(digits: 1)
        case Self.llama3Regex: self = .qwen(digits: 3)
        default: return nil
        }
    }

    /// Successive non-overlapping matches (start, end) in `s`, leftmost first, as a regex `find_iter` yields them.
    func matches(in s: [Unicode.Scalar]) -> [Range<Int>] {
        var out: [Range<Int>] = []
        var i = 0
        while i < s.count {
            if let end = match(s, at: i), end > i {
                out.append(i..<end)
                i = end
            } else {
                i += 1
            }
        }
        return out
    }

    private func match(_ s: [Unicode.Scalar], at i: Int) -> Int? {
        switch self {
        case .gpt2: return Self.gpt2Match(s, i)
        case .qwen(let digits): return Self.qwenMatch(s, i, digits: digits)
        case .literal(let lit):
            guard !lit.isEmpty, i + lit.count <= s.count else { return nil }
            for k in 0..<lit.count where s[i + k] != lit[k] { return nil }
            return i + lit.count
        }
    }

    // Character classes as Oniguruma sees them: \p{L}, \p{N}, \s (the White_Space property).
    static func isLetter(_ c: Unicode.Scalar) -> Bool {
        switch c.properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return true
        default: return false
        }
    }
    static func isNumber(_ c: Unicode.Scalar) -> Bool {
        switch c.properties.generalCategory {
        case .decimalNumber, .letterNumber, .otherNumber: return true
        default: return false
        }
    }
    static func isSpace(_ c: Unicode.Scalar) -> Bool { c.properties.isWhitespace }
    static func isOther(_ c: Unicode.Scalar) -> Bool { !isSpace(c) && !isLetter(c) && !isNumber(c) }
    static func isNewline(_ c: Unicode.Scalar) -> Bool { c == "\r" || c == "\n" }

    /// `'s|'t|'re|'ve|'m|'ll|'d`, optionally case-insensitive (`ſ` folds to `s`, as in Oniguruma).
    static func contraction(_ s: [Unicode.Scalar], _ i: Int, caseInsensitive: Bool) -> Int? {
        guard s[i] == "'", i + 1 < s.count else { return nil }
        func lower(_ c: Unicode.Scalar) -> Unicode.Scalar {
            guard caseInsensitive else { return c }
            if c == "\u{17F}" { return "s" }
            if c.value >= 65 && c.value <= 90 { return Unicode.Scalar(c.value + 32)! }
            return c
        }
        let a = lower(s[i + 1])
        if a == "s" || a == "t" || a == "m" || a == "d" { return i + 2 }
        guard i + 2 < s.count else { return nil }
        let b = lower(s[i + 2])
        if (a == "r" && b == "e") || (a == "v" && b == "e") || (a == "l" && b == "l") { return i + 3 }
        return nil
    }

    /// End of the maximal run of scalars satisfying `p` from `i`.
    static func run(_ s: [Unicode.Scalar], _ i: Int, _ p: (Unicode.Scalar) -> Bool) -> Int {
        var j = i
        while j < s.count && p(s[j]) { j += 1 }
        return j
    }

    /// `\s+(?!\S)|\s+` from `i` (with backtracking: leave the last space to the next token when a non-space follows).
    static func spaces(_ s: [Unicode.Scalar], _ i: Int) -> Int? {
        let r = run(s, i, isSpace)
        guard r > i else { return nil }
        if r == s.count || r - 1 == i { return r }
        return r - 1
    }

    static func gpt2Match(_ s: [Unicode.Scalar], _ i: Int) -> Int? {
        if let e = contraction(s, i, caseInsensitive: false) { return e }
        let sp = s[i] == " " && i + 1 < s.count ? 1 : 0
        for cls in [isLetter, isNumber, isOther] as [(Unicode.Scalar) -> Bool] {
            if sp == 1 && cls(s[i + 1]) { return run(s, i + 1, cls) }
            if cls(s[i]) { return run(s, i, cls) }
        }
        return spaces(s, i)
    }

    static func qwenMatch(_ s: [Unicode.Scalar], _ i: Int, digits: Int) -> Int? {
        if let e = contraction(s, i, caseInsensitive: true) { return e }
        let c = s[i]
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !isNewline(c) && !isLetter(c) && !isNumber(c) && i + 1 < s.count && isLetter(s[i + 1]) {
            return run(s, i + 1, isLetter)
        }
        if isLetter(c) { return run(s, i, isLetter) }
        // \p{N}{1,digits}
        if isNumber(c) { return min(run(s, i, isNumber), i + digits) }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        if c == " " && i + 1 < s.count && isOther(s[i + 1]) { return run(s, run(s, i + 1, isOther), isNewline) }
        if isOther(c) { return run(s, run(s, i, isOther), isNewline) }
        // \s*[\r\n]+ : up to and including the last newline of the whitespace run
        let r = run(s, i, isSpace)
        if let last = (i..<r).last(where: { isNewline(s[$0]) }) { return last + 1 }
        return spaces(s, i)
    }
}

/// How `Split` keeps the matched delimiters (tokenizers' `SplitDelimiterBehavior`).
enum SplitBehavior: String, Sendable {
    case isolated = "Isolated", removed = "Removed", mergedWithPrevious = "MergedWithPrevious"
    case mergedWithNext = "MergedWithNext"
}

/// A pre-tokenizer of tokenizer.json (the kinds the supported checkpoints use).
indirect enum PreTokenizer: Sendable {
    case byteLevel(addPrefixSpace: Bool, useRegex: Bool)
    case split(SplitPattern, SplitBehavior)
    case metaspace(replacement: Unicode.Scalar, prepend: PrependScheme, split: Bool)
    case sequence([PreTokenizer])

    enum PrependScheme: String, Sendable { case always, first, never }

    /// Split `pieces` further; `first` says whether each piece starts the original text (Metaspace "first").
    /// ByteLevel also maps each piece to its byte-level characters.
    func apply(_ pieces: [Piece]) -> [Piece] {
        switch self {
        case .sequence(let steps):
            return steps.reduce(pieces) { $1.apply($0) }
        case .split(let pattern, let behavior):
            return pieces.flatMap { Self.split($0, pattern: pattern, behavior: behavior) }
        case .byteLevel(let addPrefixSpace, let useRegex):
            return pieces.flatMap { piece -> [Piece] in
                var p = piece
                if addPrefixSpace && p.scalars.first != " " { p.scalars.insert(" ", at: 0) }
                let parts = useRegex ? Self.split(p, pattern: .gpt2, behavior: .isolated) : [p]
                return parts.map { Piece(scalars: ByteLevel.encode($0.scalars), atStart: $0.atStart) }
            }
        case .metaspace(let replacement, let prepend, let split):
            return pieces.flatMap { piece -> [Piece] in
                var p = piece
                p.scalars = p.scalars.map { $0 == " " ? replacement : $0 }
                let wantsPrefix = prepend == .always || (prepend == .first && p.atStart)
                if wantsPrefix && p.scalars.first != replacement { p.scalars.insert(replacement, at: 0) }
                return split ? Self.split(p, pattern: .literal([replacement]), behavior: .mergedWithNext) : [p]
            }
        }
    }

    static func split(_ piece: Piece, pattern: SplitPattern, behavior: SplitBehavior) -> [Piece] {
        let s = piece.scalars
        var bounds: [(Range<Int>, Bool)] = []  // (range, is a match)
        var last = 0
        for m in pattern.matches(in: s) {
            if m.lowerBound > last { bounds.append((last..<m.lowerBound, false)) }
            bounds.append((m, true))
            last = m.upperBound
        }
        if last < s.count { bounds.append((last..<s.count, false)) }
        var ranges: [Range<Int>] = []
        switch behavior {
        case .isolated: ranges = bounds.map(\.0)
        case .removed: ranges = bounds.filter { !$0.1 }.map(\.0)
        case .mergedWithPrevious:
            var previousMatched = false
            for (r, isMatch) in bounds {
                if isMatch && !previousMatched, let prev = ranges.last {
                    ranges[ranges.count - 1] = prev.lowerBound..<r.upperBound
                } else { ranges.append(r) }
                previousMatched = isMatch
            }
        case .mergedWithNext:
            var pending: Int?
            for (r, isMatch) in bounds {
                if isMatch {
                    if let p = pending { ranges.append(p..<r.lowerBound) }
                    pending = r.lowerBound
                } else {
                    ranges.append((pending ?? r.lowerBound)..<r.upperBound)
                    pending = nil
                }
            }
            if let p = pending { ranges.append(p..<s.count) }
        }
        return ranges.filter { !$0.isEmpty }.map {
            Piece(scalars: Array(s[$0]), atStart: piece.atStart && $0.lowerBound == 0)
        }
    }
}

/// A stretch of text between pre-tokenizer splits.
struct Piece: Sendable {
    var scalars: [Unicode.Scalar]
    /// Whether the piece begins the encoded text (tokenizers' `offsets_original().0 == 0`).
    var atStart: Bool
}

/// GPT-2's reversible byte <-> printable character map.
enum ByteLevel {
    /// The character standing for each byte value.
    static let byteToScalar: [Unicode.Scalar] = {
        var table = [Unicode.Scalar](repeating: "\0", count: 256)
        var extra: UInt32 = 0
        for b in 0..<256 {
            let printable = (33...126).contains(b) || (161...172).contains(b) || (174...255).contains(b)
            if printable {
                table[b] = Unicode.Scalar(UInt32(b))!
            } else {
                table[b] = Unicode.Scalar(256 + extra)!
                extra += 1
            }
        }
        return table
    }()

    /// The byte each map character stands for.
    static let scalarToByte: [UInt32: UInt8] = {
        var map: [UInt32: UInt8] = [:]
        for (b, c) in byteToScalar.enumerated() { map[c.value] = UInt8(b) }
        return map
    }()

    static func encode(_ scalars: [Unicode.Scalar]) -> [Unicode.Scalar] {
        var out: [Unicode.Scalar] = []
        out.reserveCapacity(scalars.count)
        for c in scalars { for b in String(c).utf8 { out.append(byteToScalar[Int(b)]) } }
        return out
    }
}
