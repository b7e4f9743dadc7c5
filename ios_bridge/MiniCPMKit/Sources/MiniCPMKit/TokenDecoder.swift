// Decoders of tokenizer.json (tokenizers' `decoders`): token strings back to text.

/// A decoder step: maps the list of token strings to a new list (tokenizers' `decode_chain`).
indirect enum TokenDecoder: Sendable {
    case byteLevel
    case byteFallback
    case fuse
    case replace(pattern: [Unicode.Scalar], content: [Unicode.Scalar])
    case strip(content: Unicode.Scalar, start: Int, stop: Int)
    case metaspace(replacement: Unicode.Scalar, prependFirst: Bool)
    case sequence([TokenDecoder])

    /// The text of `tokens` (their pieces joined).
    func decode(_ tokens: [String]) -> String { decodeChain(tokens).joined() }

    func decodeChain(_ tokens: [String]) -> [String] {
        switch self {
        case .sequence(let steps):
            return steps.reduce(tokens) { $1.decodeChain($0) }
        case .byteLevel:
            // A token whose characters are all byte-map characters gives those bytes, any other its own UTF-8.
            var bytes: [UInt8] = []
            for token in tokens { Self.appendByteLevel(token, to: &bytes) }
            return [UTF8Repair.string(bytes)]
        case .byteFallback:
            // Runs of <0xAB> tokens become their UTF-8 text, or one U+FFFD per byte when invalid.
            var out: [String] = []
            var pending: [UInt8] = []
            func flush() {
                guard !pending.isEmpty else { return }
                if let s = UTF8Repair.valid(pending) { out.append(s) } else {
                    out.append(contentsOf: Array(repeating: "\u{FFFD}", count: pending.count))
                }
                pending.removeAll()
            }
            for token in tokens {
                if let b = Self.byteValue(token) { pending.append(b) } else {
                    flush()
                    out.append(token)
                }
            }
            flush()
            return out
        case .fuse:
            return [tokens.joined()]
        case .replace(let pattern, let content):
            return tokens.map { Normalizer.string(Normalizer.replacing(Array($0.unicodeScalars), pattern, content)) }
        case .strip(let content, let start, let stop):
            return tokens.map { token in
                let s = Array(token.unicodeScalars)
                var lo = 0, hi = s.count
                while lo < min(start, s.count) && s[lo] == content { lo += 1 }
                var cut = 0
                while cut < stop && hi > lo && s[hi - 1] == content { hi -= 1; cut += 1 }
                return Normalizer.string(Array(s[lo..<hi]))
            }
        case .metaspace(let replacement, let prependFirst):
            return tokens.enumerated().map { i, token in
                var out = String.UnicodeScalarView()
                for c in token.unicodeScalars {
                    if c == replacement {
                        if !(i == 0 && prependFirst) { out.append(" ") }
                    } else { out.append(c) }
                }
                return String(out)
            }
        }
    }

    /// The bytes of one token under the ByteLevel decoder: its byte-map characters' bytes, or when any character is
    /// not a byte-map character, the token's own UTF-8.
    static func appendByteLevel(_ token: String, to bytes: inout [UInt8]) {
        let start = bytes.count
        for c in token.unicodeScalars {
            guard let b = ByteLevel.scalarToByte[c.value] else {
                bytes.removeSubrange(start...)
                bytes.append(contentsOf: token.utf8)
                return
            }
            bytes.append(b)
        }
    }

    /// The byte of a `<0xAB>` token.
    static func byteValue(_ token: String) -> UInt8? {
        let u = Array(token.utf8)
        guard u.count == 6, u[0] == 60, u[1] == 48, u[2] == 120, u[5] == 62 else { return nil }  // "<0x" ... ">"
        return UInt8(String(decoding: u[3..<5], as: UTF8.self), radix: 16)
    }
}

/// UTF-8 decoding that replaces each maximal invalid subsequence with one U+FFFD, as Python's
/// `bytes.decode(errors="replace")` and Rust's `String::from_utf8_lossy` do.
enum UTF8Repair {
    static func string(_ bytes: [UInt8]) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count)
        var i = 0
        let n = bytes.count
        while i < n {
            let b = bytes[i]
            if b < 0x80 { out.append(b); i += 1; continue }
            let length: Int
            var lo: UInt8 = 0x80, hi: UInt8 = 0xBF  // the allowed range of the second byte
            switch b {
            case 0xC2...0xDF: length = 2
            case 0xE0: length = 3; lo = 0xA0
            case 0xE1...0xEC, 0xEE, 0xEF: length = 3
            case 0xED: length = 3; hi = 0x9F
            case 0xF0: length = 4; lo = 0x90
            case 0xF1...0xF3: length = 4
            case 0xF4: length = 4; hi = 0x8F
            default: length = 0
            }
            var j = i + 1
            if length > 0 && j < n && bytes[j] >= lo && bytes[j] <= hi {
                j += 1
                while j < i + length && j < n && bytes[j] >= 0x80 && bytes[j] <= 0xBF { j += 1 }
            }
            if length > 0 && j == i + length {
                out.append(contentsOf: bytes[i..<j])
            } else {
                out.append(contentsOf: [0xEF, 0xBF, 0xBD])
            }
            i = j
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// A prefix length of `bytes` whose repaired text can no longer change when bytes are appended: the boundary
    /// after the last sequence that starts at least 4 bytes before the end (each decision reads at most 4 bytes).
    static func stablePrefix(_ bytes: ArraySlice<UInt8>) -> Int {
        let n = bytes.count
        let base = bytes.startIndex
        var i = 0
        while i + 4 <= n {
            let b = bytes[base + i]
            let length = b >= 0xC2 && b <= 0xDF ? 2 : b >= 0xE0 && b <= 0xEF ? 3 : b >= 0xF0 && b <= 0xF4 ? 4 : 1
            // Step over a well-formed sequence, or over the maximal invalid subpart (at least one byte).
            var j = i + 1
            if length > 1 {
                let (lo, hi): (UInt8, UInt8) = b == 0xE0 ? (0xA0, 0xBF) : b == 0xED ? (0x80, 0x9F)
                    : b == 0xF0 ? (0x90, 0xBF) : b == 0xF4 ? (0x80, 0x8F) : (0x80, 0xBF)
                if bytes[base + j] >= lo && bytes[base + j] <= hi {
                    j += 1
                    while j < i + length && bytes[base + j] >= 0x80 && bytes[base + j] <= 0xBF { j += 1 }
                }
            }
            i = j
        }
        return i
    }

    /// The text of `bytes` when they are valid UTF-8.
    static func valid(_ bytes: [UInt8]) -> String? {
        let s = string(bytes)
        return Array(s.utf8) == bytes ? s : nil  // any repair changes the bytes
    }
}
