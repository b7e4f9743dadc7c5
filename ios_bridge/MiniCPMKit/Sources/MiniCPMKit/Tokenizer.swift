// The tokenizer of an export: encodes and decodes exactly as the Python side's transformers tokenizer
// (`minicpm/prompt.py load_tokenizer`) does, from the tokenizer files copied next to manifest.json.
import Foundation

/// A byte-pair-encoding tokenizer read from an export directory (tokenizer.json, or Qwen2's vocab.json +
/// merges.txt + tokenizer_config.json).
///
/// `encode` matches Hugging Face `tokenizer.encode(text, add_special_tokens:)` and `decode` matches
/// `tokenizer.decode(ids, skip_special_tokens:)`. transformers never applies `clean_up_tokenization_spaces` to a
/// BPE tokenizer, so neither does this.
public struct Tokenizer: Sendable {
    let model: BytePairEncoding
    let added: AddedVocabulary
    let normalizer: Normalizer?
    let preTokenizer: PreTokenizer?
    let postProcessor: PostProcessor
    let decoder: TokenDecoder?

    /// The number of distinct ids: the model vocabulary plus the added tokens (Python's `len(tokenizer)`).
    public let vocabularySize: Int

    /// Reads the tokenizer files of an export (or checkpoint) directory.
    /// - Throws: `MiniCPMError.invalidExport` naming the missing file or unsupported component.
    public init(directory: URL) throws {
        let parts = try TokenizerFiles.load(directory: directory)
        model = parts.model
        normalizer = parts.normalizer
        added = AddedVocabulary(parts.added, normalizer: parts.normalizer)
        preTokenizer = parts.preTokenizer
        postProcessor = parts.postProcessor
        decoder = parts.decoder
        var ids = Set(parts.model.vocab.values)
        ids.formUnion(added.ids)
        vocabularySize = ids.count
    }

    /// The ids of `text`: added and special tokens as single ids first, then normalizer, pre-tokenizer and BPE on
    /// the text between them; with `addSpecialTokens`, the post-processor's template (e.g. a leading BOS).
    public func encode(_ text: String, addSpecialTokens: Bool = false) -> [Int] {
        let scalars = Array(text.unicodeScalars)
        var ids: [Int] = []
        for segment in added.split(scalars, normalizedPass: false) {
            if let id = segment.id { ids.append(id); continue }
            let raw = Array(scalars[segment.range])
            let normalized = normalizer?.apply(raw) ?? raw
            for part in added.split(normalized, normalizedPass: true) {
                if let id = part.id { ids.append(id); continue }
                if part.range.isEmpty { continue }  // tokenizers drops empty stretches before pre-tokenizing
                let piece = Piece(scalars: Array(normalized[part.range]),
                                  atStart: segment.range.lowerBound == 0 && part.range.lowerBound == 0)
                let pieces = preTokenizer?.apply([piece]) ?? [piece]
                for p in pieces where !p.scalars.isEmpty { ids += model.encode(p.scalars) }
            }
        }
        return addSpecialTokens ? postProcessor.apply(ids) : ids
    }

    /// The text of `ids`: special tokens dropped when `skipSpecialTokens`, ids unknown to the tokenizer dropped,
    /// invalid UTF-8 replaced by U+FFFD as Python's `bytes.decode(errors="replace")` does.
    public func decode(_ ids: [Int], skipSpecialTokens: Bool = true) -> String {
        let tokens = ids.compactMap { id -> String? in
            guard let t = token(for: id) else { return nil }
            return skipSpecialTokens && added.isSpecial(t) ? nil : t
        }
        guard let decoder else { return tokens.joined(separator: " ") }
        return decoder.decode(tokens)
    }

    /// The id of a token string (added tokens first, then the vocabulary), as `convert_tokens_to_ids`.
    public func id(for token: String) -> Int? {
        added.id(of: token) ?? model.vocab[TokenKey(token)]
    }

    /// The token string of an id (added tokens first, then the vocabulary), as `convert_ids_to_tokens`.
    public func token(for id: Int) -> String? {
        if let t = added.content(of: id) { return t }
        guard id >= 0, id < model.tokens.count, !model.tokens[id].isEmpty else { return nil }
        return model.tokens[id]
    }
}
