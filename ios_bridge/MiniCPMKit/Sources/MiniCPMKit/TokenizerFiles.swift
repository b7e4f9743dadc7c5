// Reading a tokenizer from an export directory: tokenizer.json (any checkpoint), else Qwen2's vocab.json +
// merges.txt with tokenizer_config.json's added tokens (what transformers' Qwen2TokenizerFast builds).
import Foundation

/// The parts of a tokenizer, as read from its files.
struct TokenizerParts: Sendable {
    var model: BytePairEncoding
    var added: [AddedToken]
    var normalizer: Normalizer?
    var preTokenizer: PreTokenizer?
    var postProcessor: PostProcessor
    var decoder: TokenDecoder?
}

enum TokenizerFiles {
    static func fail(_ message: String) -> MiniCPMError { .invalidExport("tokenizer: \(message)") }

    static func load(directory: URL) throws -> TokenizerParts {
        let json = directory.appendingPathComponent("tokenizer.json")
        let config = try optionalObject(directory.appendingPathComponent("tokenizer_config.json"))
        var parts: TokenizerParts
        if FileManager.default.fileExists(atPath: json.path) {
            parts = try fromTokenizerJSON(try object(json))
        } else if FileManager.default.fileExists(atPath: directory.appendingPathComponent("vocab.json").path),
                  FileManager.default.fileExists(atPath: directory.appendingPathComponent("merges.txt").path) {
            parts = try qwen2(directory: directory, config: config)
        } else {
            throw fail("\(directory.path) has no tokenizer.json (nor vocab.json + merges.txt)")
        }
        // transformers also registers tokenizer_config.json's added tokens the tokenizer.json lacks.
        let known = Set(parts.added.map(\.id))
        parts.added += try addedTokensDecoder(config).filter { !known.contains($0.id) }
        return parts
    }

    // MARK: files

    static func object(_ url: URL) throws -> [String: Any] {
        guard let data = try? Data(contentsOf: url) else { throw fail("cannot read \(url.lastPathComponent)") }
        guard let obj = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
            throw fail("\(url.lastPathComponent) is not a JSON object")
        }
        return obj
    }

    static func optionalObject(_ url: URL) throws -> [String: Any] {
        FileManager.default.fileExists(atPath: url.path) ? try object(url) : [:]
    }

    static func vocab(_ raw: Any?, file: String) throws -> [TokenKey: Int] {
        guard let raw = raw as? [String: Any] else { throw fail("\(file) has no vocabulary object") }
        var out: [TokenKey: Int] = [:]
        out.reserveCapacity(raw.count)
        for (token, id) in raw {
            guard let id = id as? Int, id >= 0 else { throw fail("\(file): token \"\(token)\" has no valid id") }
            out[TokenKey(token)] = id
        }
        return out
    }

    // MARK: tokenizer.json

    static func fromTokenizerJSON(_ root: [String: Any]) throws -> TokenizerParts {
        guard let model = root["model"] as? [String: Any] else { throw fail("tokenizer.json has no model") }
        let type = model["type"] as? String ?? "BPE"
        guard type == "BPE" else { throw fail("model type \(type) is not supported (only BPE)") }
        for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
            if let s = model[key] as? String, !s.isEmpty { throw fail("BPE \(key) \"\(s)\" is not supported") }
        }
        let merges: [(String, String)] = try (model["merges"] as? [Any] ?? []).map { m in
            if let pair = m as? [String], pair.count == 2 { return (pair[0], pair[1]) }
            if let line = m as? String, let pair = splitMerge(line) { return pair }
            throw fail("tokenizer.json has a malformed merge \(m)")
        }
        let bpe = try BytePairEncoding(
            vocab: try vocab(model["vocab"], file: "tokenizer.json"), merges: merges,
            unkToken: model["unk_token"] as? String, fuseUnk: model["fuse_unk"] as? Bool ?? false,
            byteFallback: model["byte_fallback"] as? Bool ?? false,
            ignoreMerges: model["ignore_merges"] as? Bool ?? false)
        let added = (root["added_tokens"] as? [[String: Any]] ?? []).compactMap { t -> AddedToken? in
            guard let id = t["id"] as? Int, t["content"] is String else { return nil }
            return addedToken(id: id, t)
        }
        let normalizer = try (root["normalizer"] as? [String: Any]).map(normalizer)
        return TokenizerParts(
            model: bpe, added: added, normalizer: normalizer,
            preTokenizer: try (root["pre_tokenizer"] as? [String: Any]).map(preTokenizer),
            postProcessor: try (root["post_processor"] as? [String: Any]).map(postProcessor) ?? PostProcessor(),
            decoder: try (root["decoder"] as? [String: Any]).map(decoder))
    }

    static func addedToken(id: Int, _ t: [String: Any]) -> AddedToken {
        AddedToken(id: id, content: t["content"] as? String ?? "", special: t["special"] as? Bool ?? false,
                   lstrip: t["lstrip"] as? Bool ?? false, rstrip: t["rstrip"] as? Bool ?? false,
                   normalized: t["normalized"] as? Bool ?? false, singleWord: t["single_word"] as? Bool ?? false)
    }

    static func addedTokensDecoder(_ config: [String: Any]) throws -> [AddedToken] {
        guard let decoder = config["added_tokens_decoder"] as? [String: Any] else { return [] }
        return try decoder.map { key, value in
            guard let id = Int(key), let t = value as? [String: Any], t["content"] is String else {
                throw fail("tokenizer_config.json: malformed added token \(key)")
            }
            return addedToken(id: id, t)
        }.sorted { $0.id < $1.id }
    }

    static func splitMerge(_ line: String) -> (String, String)? {
        let parts = line.split(separator: " ", omittingEmptySubsequences: false)
        return parts.count == 2 ? (String(parts[0]), String(parts[1])) : nil
    }

    static func pattern(_ p: Any?) throws -> [Unicode.Scalar] {
        guard let p = p as? [String: Any], let s = p["String"] as? String else {
            throw fail("only string patterns are supported in Replace (got \(String(describing: p)))")
        }
        return Array(s.unicodeScalars)
    }

    static func scalar(_ s: Any?, default d: Unicode.Scalar) -> Unicode.Scalar {
        (s as? String)?.unicodeScalars.first ?? d
    }

    static func scalars(_ s: Any?) -> [Unicode.Scalar] { Array((s as? String ?? "").unicodeScalars) }

    static func normalizer(_ n: [String: Any]) throws -> Normalizer {
        switch n["type"] as? String ?? "" {
        case "NFC": return .nfc
        case "NFD": return .nfd
        case "NFKC": return .nfkc
        case "NFKD": return .nfkd
        case "Lowercase": return .lowercase
        case "Prepend": return .prepend(Array((n["prepend"] as? String ?? "").unicodeScalars))
        case "Replace": return .replace(pattern: try pattern(n["pattern"]), content: scalars(n["content"]))
        case "Strip": return .strip(left: n["strip_left"] as? Bool ?? false, right: n["strip_right"] as? Bool ?? false)
        case "Sequence": return .sequence(try (n["normalizers"] as? [[String: Any]] ?? []).map(normalizer))
        case let t: throw fail("normalizer \(t) is not supported")
        }
    }

    static func prependScheme(_ p: [String: Any]) -> PreTokenizer.PrependScheme {
        if let s = p["prepend_scheme"] as? String, let scheme = PreTokenizer.PrependScheme(rawValue: s) {
            return scheme
        }
        return (p["add_prefix_space"] as? Bool ?? true) ? .always : .never
    }

    static func preTokenizer(_ p: [String: Any]) throws -> PreTokenizer {
        switch p["type"] as? String ?? "" {
        case "ByteLevel":
            return .byteLevel(addPrefixSpace: p["add_prefix_space"] as? Bool ?? true,
                              useRegex: p["use_regex"] as? Bool ?? true)
        case "Split":
            guard p["invert"] as? Bool != true else { throw fail("inverted Split is not supported") }
            guard let b = SplitBehavior(rawValue: p["behavior"] as? String ?? "") else {
                throw fail("Split behavior \(p["behavior"] ?? "nil") is not supported")
            }
            let raw = p["pattern"] as? [String: Any]
            if let regex = raw?["Regex"] as? String {
                guard let known = SplitPattern(regex: regex) else {
                    throw fail("Split regex \(regex) is not supported")
                }
                return .split(known, b)
            }
            return .split(.literal(try pattern(raw)), b)
        case "Metaspace":
            return .metaspace(replacement: scalar(p["replacement"], default: "\u{2581}"), prepend: prependScheme(p),
                              split: p["split"] as? Bool ?? true)
        case "Sequence":
            return .sequence(try (p["pretokenizers"] as? [[String: Any]] ?? []).map(preTokenizer))
        case let t: throw fail("pre-tokenizer \(t) is not supported")
        }
    }

    static func decoder(_ d: [String: Any]) throws -> TokenDecoder {
        switch d["type"] as? String ?? "" {
        case "ByteLevel": return .byteLevel
        case "ByteFallback": return .byteFallback
        case "Fuse": return .fuse
        case "Replace": return .replace(pattern: try pattern(d["pattern"]), content: scalars(d["content"]))
        case "Strip":
            return .strip(content: scalar(d["content"], default: " "), start: d["start"] as? Int ?? 0,
                          stop: d["stop"] as? Int ?? 0)
        case "Metaspace":
            return .metaspace(replacement: scalar(d["replacement"], default: "\u{2581}"),
                              prependFirst: prependScheme(d) != .never)
        case "Sequence": return .sequence(try (d["decoders"] as? [[String: Any]] ?? []).map(decoder))
        case let t: throw fail("decoder \(t) is not supported")
        }
    }

    static func postProcessor(_ p: [String: Any]) throws -> PostProcessor {
        switch p["type"] as? String ?? "" {
        case "ByteLevel": return PostProcessor()
        case "Sequence":
            let steps = try (p["processors"] as? [[String: Any]] ?? []).map(postProcessor)
            return steps.reduce(PostProcessor()) { $0.then($1) }
        case "TemplateProcessing":
            let specials = p["special_tokens"] as? [String: [String: Any]] ?? [:]
            let items: [PostProcessor.Item] = try (p["single"] as? [[String: Any]] ?? []).map { item in
                if item["Sequence"] != nil { return .sequence }
                guard let s = item["SpecialToken"] as? [String: Any], let name = s["id"] as? String,
                      let ids = specials[name]?["ids"] as? [Int]
                else { throw fail("malformed TemplateProcessing item") }
                return .special(ids)
            }
            return PostProcessor(single: items)
        case "RobertaProcessing", "BertProcessing":
            guard let cls = p["cls"] as? [Any], let sep = p["sep"] as? [Any], let c = cls.last as? Int,
                  let s = sep.last as? Int
            else { throw fail("malformed \(p["type"] ?? "") post-processor") }
            return PostProcessor(single: [.special([c]), .sequence, .special([s])])
        case let t: throw fail("post-processor \(t) is not supported")
        }
    }

    // MARK: vocab.json + merges.txt

    /// What transformers' Qwen2TokenizerFast builds from the slow files: NFC, the Qwen2 split regex, ByteLevel.
    static func qwen2(directory: URL, config: [String: Any]) throws -> TokenizerParts {
        let vocab = try vocab(try object(directory.appendingPathComponent("vocab.json")), file: "vocab.json")
        guard let data = try? Data(contentsOf: directory.appendingPathComponent("merges.txt")) else {
            throw fail("cannot read merges.txt")
        }
        // Split bytes, not Characters: grapheme breaking over 150k lines is slow.
        var merges: [(String, String)] = []
        merges.reserveCapacity(data.count / 8)
        let lines = [UInt8](data).split(separator: 0x0A, omittingEmptySubsequences: true)
        for (n, raw) in lines.enumerated() {
            let line = raw.last == 0x0D ? raw.dropLast() : raw[...]
            if n == 0 && line.starts(with: Array("#version".utf8)) { continue }
            let parts = line.split(separator: 0x20, omittingEmptySubsequences: false)
            guard parts.count == 2 else { throw fail("merges.txt line \(n + 1) is not two tokens") }
            merges.append((String(decoding: parts[0], as: UTF8.self), String(decoding: parts[1], as: UTF8.self)))
        }
        let bpe = try BytePairEncoding(vocab: vocab, merges: merges, unkToken: nil, fuseUnk: false, byteFallback: false,
                                       ignoreMerges: false)
        var added = try addedTokensDecoder(config)
        if added.isEmpty {  // older checkpoints: added_tokens.json, special when special_tokens_map.json lists them
            let names = try optionalObject(directory.appendingPathComponent("added_tokens.json"))
            let specials = Set(try specialTokenNames(directory))
            added = names.compactMap { name, id in
                (id as? Int).map { AddedToken(id: $0, content: name, special: specials.contains(name), lstrip: false,
                                              rstrip: false, normalized: false, singleWord: false) }
            }.sorted { $0.id < $1.id }
        }
        return TokenizerParts(
            model: bpe, added: added, normalizer: .nfc,
            preTokenizer: .sequence([.split(.qwen(digits: 1), .isolated),
                                     .byteLevel(addPrefixSpace: false, useRegex: false)]),
            postProcessor: PostProcessor(), decoder: .byteLevel)
    }

    static func specialTokenNames(_ directory: URL) throws -> [String] {
        let map = try optionalObject(directory.appendingPathComponent("special_tokens_map.json"))
        func names(_ v: Any) -> [String] {
            if let s = v as? String { return [s] }
            if let d = v as? [String: Any], let s = d["content"] as? String { return [s] }
            if let a = v as? [Any] { return a.flatMap(names) }
            return []
        }
        return map.values.flatMap(names)
    }
}

/// The post-processor of encode(addSpecialTokens: true): a template of special ids around the sequence.
struct PostProcessor: Sendable {
    enum Item: Sendable { case special([Int]), sequence }
    var single: [Item] = [.sequence]

    func apply(_ ids: [Int]) -> [Int] {
        single.flatMap { item -> [Int] in
            switch item {
            case .special(let s): return s
            case .sequence: return ids
            }
        }
    }

    /// This processor followed by `next`.
    func then(_ next: PostProcessor) -> PostProcessor {
        PostProcessor(single: next.single.flatMap { item -> [Item] in
            if case .sequence = item { return single }
            return [item]
        })
    }
}
