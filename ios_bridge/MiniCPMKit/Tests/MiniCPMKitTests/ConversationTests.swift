import Foundation
import Testing
@testable import MiniCPMKit

/// `Conversation`, the public entry point, over recorded traces: it must build, run and stream the turns exactly
/// as `runtime.session.Session` did (the replay backend checks every call).
@Suite("Conversation (public API) over recorded traces")
struct ConversationTests {
    /// The trace's turns as app messages (text only: these traces' images are given to the vision calls as
    /// recorded inputs, not as pixels).
    static func messages(_ turn: Trace.Turn) -> [Message] {
        turn.messages.map { message in
            Message(role: message.role, content: message.content.compactMap { item in
                if case .text(let text) = item { return .text(text) }
                return nil
            })
        }
    }

    @Test("text turns stream the recorded answers; resets, follow-up turns and context-full errors as recorded",
          arguments: ["text_only", "context_full_stop", "context_full_error"])
    func textTurns(_ name: String) async throws {
        let trace = try Trace.named(name)
        let manifest = try Manifest.load(directory: trace.export, verify: false)
        let backend = ReplayBackend(trace, kvShape: manifest.schedule.kvCache.shape)
        let conversation = try Conversation(directory: trace.export, backend: backend, onContextFull: trace.policy,
                                            prefillChunk: trace.chunk)
        var turns = 0
        for event in trace.events {
            guard case .turn(let turn) = event else {
                try await conversation.reset()
                continue
            }
            var pieces: [String] = []
            do {
                for try await piece in try await conversation.ask(Self.messages(turn), sampling: turn.sampling) {
                    pieces.append(piece)
                }
            } catch let error as MiniCPMError {
                #expect(error.description == turn.error, "\(name) turn \(turns): error")
                turns += 1
                continue
            }
            #expect(turn.error == nil, "\(name) turn \(turns): answered, trace has an error")
            let result = try #require(await conversation.lastResult)
            #expect(result.tokenIDs == turn.tokenIDs, "\(name) turn \(turns): token ids")
            #expect(pieces.joined() == turn.text && result.text == turn.text, "\(name) turn \(turns): text")
            #expect(result.finishReason.rawValue == turn.finishReason)
            turns += 1
        }
        #expect(turns >= 1)
        #expect(backend.index == trace.calls.count, "the conversation made \(backend.index) of \(trace.calls.count) calls")
    }
}
