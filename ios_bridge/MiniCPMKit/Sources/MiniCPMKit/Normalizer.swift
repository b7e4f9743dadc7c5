// Normalizers of tokenizer.json (tokenizers' `normalizers`), over Unicode scalars so that nothing is
// canonicalised behind our back (Swift's String comparison is canonical-equivalence based).
import Foundation

/// A text normalizer applied before pre-tokenization.
indirect enum Normalizer: Sendable {
    case nfc, nfd, nfkc, nfkd, lowercase
    case prepend([Unicode.Scalar])
    case replace(pattern: [Unicode.Scalar], content: [Unicode.Scalar])
    case strip(left: Bool, right: Bool)
    case sequence([Normalizer])

    func apply(_ s: [Unicode.Scalar]) -> [Unicode.Scalar] {
        switch self {
        case .nfc: return Self.scalars(Self.string(s).precomposedStringWithCanonicalMapping)
        case .nfd: return Self.scalars(Self.string(s).decomposedStringWithCanonicalMapping)
        case .nfkc: return Self.scalars(Self.string(s).precomposedStringWithCompatibilityMapping)
        case .nfkd: return Self.scalars(Self.string(s).decomposedStringWithCompatibilityMapping)
        case .lowercase: return s.flatMap { Array($0.properties.lowercaseMapping.unicodeScalars) }
        case .prepend(let p): return s.isEmpty ? s : p + s
        case .replace(let pattern, let content): return Self.replacing(s, pattern, content)
        case .strip(let left, let right):
            var lo = 0, hi = s.count
            if left { while lo < hi && s[lo].properties.isWhitespace { lo += 1 } }
            if right { while hi > lo && s[hi - 1].properties.isWhitespace { hi -= 1 } }
            return Array(s[lo..<hi])
        case .sequence(let steps): return steps.reduce(s) { $1.apply($0) }
        }
    }

    static func string(_ s: [Unicode.Scalar]) -> String {
        var out = String.UnicodeScalarView()
        out.append(contentsOf: s)
        return String(out)
    }

    static func scalars(_ s: String) -> [Unicode.Scalar] { Array(s.unicodeScalars) }

    /// Every non-overlapping occurrence of `pattern`, left to right, replaced by `content`.
    static func replacing(_ s: [Unicode.Scalar], _ pattern: [Unicode.Scalar], _ content: [Unicode.Scalar])
        -> [Unicode.Scalar] {
        guard !pattern.isEmpty, s.count >= pattern.count else { return s }
        var out: [Unicode.Scalar] = []
        out.reserveCapacity(s.count)
        var i = 0
        while i < s.count {
            if i + pattern.count <= s.count && s[i] == pattern[0] && Array(s[i..<i + pattern.count]) == pattern {
                out.append(contentsOf: content)
                i += pattern.count
            } else {
                out.append(s[i])
                i += 1
            }
        }
        return out
    }
}
