// The chat template as data: the manifest's "prompt" section, written by export/prompt_pieces.py.
import Foundation

/// The pieces of a checkpoint's own chat template, cut out at export time and verified there against the Python
/// `PromptBuilder`, so a prompt is built without a Jinja interpreter (see `ChatPrompt`).
public struct PromptPieces: Sendable, Decodable, Equatable {
    /// The only layout this package reads (`prompt.version`).
    public static let supportedVersion = 1

    /// The text around one message's content.
    public struct Role: Sendable, Decodable, Equatable {
        public let header: String
        public let footer: String
    }

    public struct Roles: Sendable, Decodable, Equatable {
        public let system: Role
        public let user: Role
        public let assistant: Role
    }

    /// The assistant header a prompt ends with, by `enableThinking`.
    public struct Generation: Sendable, Decodable, Equatable {
        public let thinking: String
        public let noThinking: String
        enum CodingKeys: String, CodingKey { case thinking, noThinking = "no_thinking" }
    }

    /// Earlier answers keep only the text after the last `close` tag, leading newlines removed (Qwen3).
    public struct HistoryReasoning: Sendable, Decodable, Equatable {
        public let close: String
    }

    /// A user message whose content has this prefix and suffix is not a query (Qwen3's tool responses).
    public struct Wrapper: Sendable, Decodable, Equatable {
        public let prefix: String
        public let suffix: String
    }

    /// How an image tag expands: `id_start i id_end` (when used), `image_start unk×query_num image_end`, then
    /// one `slice_start unk×query_num slice_end` per grid cell, rows joined by `slice_row_joiner`.
    public struct Placeholder: Sendable, Decodable, Equatable {
        public let imageStart: String
        public let imageEnd: String
        public let unk: String
        public let queryNum: Int
        public let sliceStart: String
        public let sliceEnd: String
        public let sliceRowJoiner: String
        public let useImageID: Bool
        public let idStart: String
        public let idEnd: String
        /// Whether a video group gets an image id (never slices).
        public let videoImageID: Bool
        enum CodingKeys: String, CodingKey {
            case unk
            case imageStart = "image_start", imageEnd = "image_end", queryNum = "query_num"
            case sliceStart = "slice_start", sliceEnd = "slice_end", sliceRowJoiner = "slice_row_joiner"
            case useImageID = "use_image_id", idStart = "id_start", idEnd = "id_end", videoImageID = "video_image_id"
        }
    }

    public let version: Int
    /// Text before the first message.
    public let prefix: String
    /// Text after `prefix` when the first message is not a system message (Qwen2's default system prompt).
    public let defaultSystem: String
    public let roles: Roles
    public let generation: Generation
    /// Whether the model has a thinking mode (the two generation prompts differ).
    public let thinking: Bool
    public let historyReasoning: HistoryReasoning?
    public let nonQueryUser: Wrapper?
    /// Whether an assistant message after the last query renders like any other; when false such a
    /// conversation is refused (the template would render it differently).
    public let trailingAssistant: Bool
    /// What a follow-up turn starts with: it closes the previous answer, whose stop token was never fed.
    public let continuation: String
    /// Joins the content items of one message.
    public let contentJoiner: String
    /// What each image stands for in a message's text before expansion.
    public let imageTag: String
    public let placeholder: Placeholder
    /// Ids the tokenizer adds around a first turn (`add_special_tokens`), e.g. Llama's `<s>`.
    public let bosIDs: [Int]
    public let eosIDs: [Int]
    /// Ids removed after tokenizing (o-4.5's `<|listen|>`).
    public let droppedIDs: [Int]
    /// A placeholder span starts after any of these ids and ends before any of `spanEndIDs`.
    public let spanStartIDs: [Int]
    public let spanEndIDs: [Int]

    enum CodingKeys: String, CodingKey {
        case version, prefix, roles, generation, thinking, continuation, placeholder
        case defaultSystem = "default_system", historyReasoning = "history_reasoning"
        case nonQueryUser = "non_query_user", trailingAssistant = "trailing_assistant"
        case contentJoiner = "content_joiner", imageTag = "image_tag", bosIDs = "bos_ids", eosIDs = "eos_ids"
        case droppedIDs = "dropped_ids", spanStartIDs = "span_start_ids", spanEndIDs = "span_end_ids"
    }

    /// The pieces of `manifest` (a `manifest.json` file, or the export directory holding it).
    public static func load(manifest: URL) throws -> PromptPieces {
        var isDir: ObjCBool = false
        let file = FileManager.default.fileExists(atPath: manifest.path, isDirectory: &isDir) && isDir.boolValue
            ? manifest.appendingPathComponent("manifest.json") : manifest
        struct Section: Decodable { let prompt: JSONValue? }
        let section: Section
        do {
            section = try JSONDecoder().decode(Section.self, from: Data(contentsOf: file))
        } catch {
            throw MiniCPMError.invalidExport("\(file.path): cannot read the manifest (\(error.localizedDescription))")
        }
        guard let prompt = section.prompt else {
            throw MiniCPMError.invalidExport("\(file.path) has no \"prompt\" section: re-export the model with this "
                                             + "version of minicpm-mobile")
        }
        return try decode(prompt)
    }

    /// Decodes the manifest's `prompt` value, refusing an unknown layout version.
    public static func decode(_ prompt: JSONValue) throws -> PromptPieces {
        guard let version = prompt["version"]?.double, Int(version) == supportedVersion else {
            throw MiniCPMError.invalidExport("manifest prompt version \(prompt["version"]?.double.map { "\($0)" } ?? "none")"
                                             + " is not supported (this package reads \(supportedVersion))")
        }
        do { return try prompt.decode(PromptPieces.self) } catch {
            throw MiniCPMError.invalidExport("manifest prompt section: \(error)")
        }
    }

    /// The header and footer of `role`.
    public func role(_ role: ChatMessage.Role) -> Role {
        switch role {
        case .system: return roles.system
        case .user: return roles.user
        case .assistant: return roles.assistant
        }
    }
}
