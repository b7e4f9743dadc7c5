// The public face of MiniCPMKit: an export directory (or app bundle folder) plus a backend, asked questions about
// images in plain messages. It chains what `runtime.chat` chains in Python: Manifest (hashes verified), Tokenizer,
// ChatPrompt (the manifest's prompt pieces), ImageProcessor and the Session schedule.
import Foundation

/// A conversation with one export: `ask` builds the turn (first turn or follow-up, as the cache says), runs it and
/// streams the answer. Create one per chat; `reset()` starts over on the same loaded graphs.
public actor Conversation {
    public let manifest: Manifest
    public let tokenizer: Tokenizer
    public let prompt: ChatPrompt
    public let processor: ImageProcessor
    public let session: Session

    /// Loads `directory` (verifying every artifact's sha256 first) and opens a session on `backend`;
    /// `onContextFull` and `prefillChunk` override the manifest's schedule.
    public init(directory: URL, backend: sending any Backend, onContextFull: ContextFullPolicy? = nil,
                prefillChunk: Int? = nil) throws {
        let manifest = try Manifest.load(directory: directory)
        let tokenizer = try Tokenizer(directory: manifest.directory)
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.prompt = ChatPrompt(pieces: try PromptPieces.load(manifest: manifest.directory), tokenizer: tokenizer)
        self.processor = ImageProcessor(preprocessing: manifest.preprocessing, hiddenSize: manifest.model.hiddenSize)
        self.session = try Session(manifest: manifest, backend: backend, onContextFull: onContextFull,
                                   prefillChunk: prefillChunk)
    }

    /// The export's default sampling (`schedule.default_sampling`) with `maxNewTokens`.
    public func defaultSampling(maxNewTokens: Int = 256) throws -> SamplingConfig {
        try SamplingConfig(defaultsOf: manifest, maxNewTokens: maxNewTokens)
    }

    /// Builds the next turn from `messages` (the new ones only): images are RGB pixel buffers, processed and
    /// sliced as the export's preprocessing says; the first turn of a conversation gets the template's prefix,
    /// later ones continue after the cached answer.
    public func turn(_ messages: [Message], enableThinking: Bool = false, maxSliceNums: Int? = nil) async throws
        -> TurnInput {
        var images: [ProcessedImage] = []
        let chat = messages.map { message in
            ChatMessage(role: message.role, content: message.content.map { item -> ChatMessage.Content in
                switch item {
                case .text(let text): return .text(text)
                case .image(let image):
                    let processed = processor.process(image, maxSliceNums: maxSliceNums)
                    images.append(processed)
                    return .image(processed)
                }
            })
        }
        let tokens = await session.isFresh
            ? try prompt.build(chat, enableThinking: enableThinking)
            : try prompt.buildTurn(chat, firstImage: await session.historyImages, enableThinking: enableThinking)
        return try TurnInput(tokens, images: images, processor: processor)
    }

    /// Asks `messages` and streams the answer's text pieces; `lastResult` has the tokens and stats afterwards.
    public func ask(_ messages: [Message], sampling: SamplingConfig, enableThinking: Bool = false) async throws
        -> AsyncThrowingStream<String, Error> {
        let input = try await turn(messages, enableThinking: enableThinking)
        return session.ask(input, sampling: sampling, decoder: StreamingDecoder(tokenizer: tokenizer))
    }

    /// One question, optionally about images, as a user message.
    public func ask(_ text: String, images: [RGBImage] = [], sampling: SamplingConfig) async throws
        -> AsyncThrowingStream<String, Error> {
        try await ask([Message(role: .user, content: images.map { .image($0) } + [.text(text)])], sampling: sampling)
    }

    /// The last answer: tokens, text, finish reason and stats.
    public var lastResult: TurnResult? { get async { await session.lastResult } }

    /// Forget the conversation (empty cache, no history).
    public func reset() async throws { try await session.reset() }
}

/// A chat message as an app writes it: a role and text / image items, images as pixels.
public struct Message: Sendable {
    public enum Item: Sendable {
        case text(String)
        case image(RGBImage)
    }

    public var role: ChatMessage.Role
    public var content: [Item]

    public init(role: ChatMessage.Role, content: [Item]) {
        self.role = role
        self.content = content
    }

    public static func user(_ text: String, images: [RGBImage] = []) -> Message {
        Message(role: .user, content: images.map { .image($0) } + [.text(text)])
    }

    public static func system(_ text: String) -> Message { Message(role: .system, content: [.text(text)]) }
}
