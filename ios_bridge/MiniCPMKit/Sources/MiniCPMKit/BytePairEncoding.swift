// The BPE model of tokenizers: initial symbols per character (byte fallback / unk), then merges by rank.

/// Byte-pair encoding over a vocabulary and ranked merges (tokenizers' `models::bpe::BPE`, without dropout).
struct BytePairEncoding: Sendable {
    /// Token string -> id.
    let vocab: [TokenKey: Int]
    /// Id -> token string ("" for ids the vocabulary lacks).
    let tokens: [String]
    /// (left id << 32 | right id) -> (rank << 32 | merged id).
    let merges: [UInt64: UInt64]
    /// Single-scalar tokens, for the initial symbols without building strings.
    let scalarIds: [UInt32: Int32]
    let unkId: Int?
    let fuseUnk: Bool
    let byteFallback: Bool
    /// `<0xAB>` token ids by byte value (byte fallback), or -1.
    let byteIds: [Int32]
    /// A word that is itself in the vocabulary is one token (Llama 3 style).
    let ignoreMerges: Bool

    /// `merges` holds pairs of token strings in rank order; a pair whose parts or result the vocabulary lacks is
    /// refused, as tokenizers does.
    init(vocab: [TokenKey: Int], merges: [(String, String)], unkToken: String?, fuseUnk: Bool, byteFallback: Bool,
         ignoreMerges: Bool) throws {
        self.vocab = vocab
        var tokens = [String](repeating: "", count: (vocab.values.max() ?? -1) + 1)
        var scalarIds: [UInt32: Int32] = [:]
        for (key, id) in vocab {
            tokens[id] = key.string
            let scalars = key.string.unicodeScalars
            if let first = scalars.first, scalars.index(after: scalars.startIndex) == scalars.endIndex {
                scalarIds[first.value] = Int32(id)
            }
        }
        self.tokens = tokens
        self.scalarIds = scalarIds
        var table: [UInt64: UInt64] = [:]
        table.reserveCapacity(merges.count)
        for (rank, (a, b)) in merges.enumerated() {
            guard let l = vocab[TokenKey(a)], let r = vocab[TokenKey(b)], let m = vocab[TokenKey(a + b)] else {
                throw MiniCPMError.invalidExport(
                    "tokenizer: merge \(rank) (\"\(a)\" \"\(b)\") uses tokens the vocabulary lacks")
            }
            let key = UInt64(l) << 32 | UInt64(r)
            table[key] = UInt64(rank) << 32 | UInt64(m)  // a repeated pair keeps its last rank, as tokenizers does
        }
        self.merges = table
        if let unkToken {
            guard let id = vocab[TokenKey(unkToken)] else {
                throw MiniCPMError.invalidExport("tokenizer: the unk token \"\(unkToken)\" is not in the vocabulary")
            }
            unkId = id
        } else {
            unkId = nil
        }
        self.fuseUnk = fuseUnk
        self.byteFallback = byteFallback
        self.ignoreMerges = ignoreMerges
        byteIds = (0..<256).map { b in Int32(vocab[TokenKey(Self.byteToken(UInt8(b)))] ?? -1) }
    }

    /// The byte-fallback token of a byte: `<0x0A>`.
    static func byteToken(_ b: UInt8) -> String {
        let hex = String(b, radix: 16, uppercase: true)
        return "<0x" + (hex.count == 1 ? "0" + hex : hex) + ">"
    }

    /// The ids of one pre-tokenized word.
    func encode(_ word: [Unicode.Scalar]) -> [Int] {
        if ignoreMerges, let id = vocab[TokenKey(Normalizer.string(word))] { return [id] }
        var symbols: [Int32] = []
        symbols.reserveCapacity(word.count)
        var pendingUnk = false
        for c in word {
            if let id = scalarIds[c.value] {
                if pendingUnk, let unk = unkId { symbols.append(Int32(unk)); pendingUnk = false }
                symbols.append(id)
                continue
            }
            if byteFallback {
                let ids = String(c).utf8.map { byteIds[Int($0)] }
                if !ids.contains(-1) {
                    symbols.append(contentsOf: ids)
                    continue
                }
            }
            guard let unk = unkId else { continue }  // no unk token: the character is dropped, as tokenizers does
            if pendingUnk && !fuseUnk { symbols.append(Int32(unk)) }
            pendingUnk = true
        }
        if pendingUnk, let unk = unkId { symbols.append(Int32(unk)) }
        mergeAll(&symbols)
        return symbols.map(Int.init)
    }

    /// Apply merges lowest rank first, leftmost on ties (the priority queue of tokenizers' `Word::merge_all`).
    private func mergeAll(_ symbols: inout [Int32]) {
        guard symbols.count > 1 else { return }
        // Rank of the pair starting at each index (UInt64.max when the pair has no merge).
        var ranks = [UInt64](repeating: .max, count: symbols.count)
        func rank(_ i: Int) -> UInt64 {
            guard i + 1 < symbols.count else { return .max }
            return merges[UInt64(UInt32(symbols[i])) << 32 | UInt64(UInt32(symbols[i + 1]))] ?? .max
        }
        for i in 0..<symbols.count - 1 { ranks[i] = rank(i) }
        ranks[symbols.count - 1] = .max
        while true {
            var best = -1
            var bestRank = UInt64.max
            for i in 0..<(symbols.count - 1) where ranks[i] >> 32 < bestRank >> 32 {
                best = i
                bestRank = ranks[i]
            }
            if best < 0 || bestRank == .max { return }
            symbols[best] = Int32(truncatingIfNeeded: bestRank & 0xFFFF_FFFF)
            symbols.remove(at: best + 1)
            ranks.remove(at: best + 1)
            ranks[best] = rank(best)
            if best > 0 { ranks[best - 1] = rank(best - 1) }
        }
    }
}
