// A minimal SwiftUI app over MiniCPMKit's public API: pick a photo, ask, watch the answer stream, see the stats.
// It cannot be built on Linux; open it in Xcode as described in ios_bridge/Example/README.md.
import CoreML
import MiniCPMCoreML
import MiniCPMKit
import PhotosUI
import SwiftUI

@main
struct MiniCPMExampleApp: App {
    var body: some Scene { WindowGroup { ChatView() } }
}

@MainActor
final class ChatModel: ObservableObject {
    @Published var answer = ""
    @Published var stats = ""
    @Published var busy = false
    @Published var image: RGBImage?
    private var conversation: Conversation?

    /// The bundle folder added to the app target (`python -m ios_bridge.bundle --out MiniCPM`).
    private var bundleURL: URL? { Bundle.main.url(forResource: "MiniCPM", withExtension: nil) }

    func ask(_ question: String) async {
        busy = true
        defer { busy = false }
        answer = ""
        do {
            if conversation == nil {
                guard let url = bundleURL else { answer = "Add the MiniCPM bundle folder to the app target."; return }
                let manifest = try Manifest.load(directory: url)
                conversation = try Conversation(directory: url, backend: try await CoreMLBackend(manifest: manifest))
            }
            guard let conversation else { return }
            let sampling = try await conversation.defaultSampling(maxNewTokens: 256)
            for try await piece in try await conversation.ask(question, images: image.map { [$0] } ?? [],
                                                                 sampling: sampling) {
                answer += piece
            }
            image = nil  // attached to this turn only; the conversation remembers it
            if let s = await conversation.lastResult?.stats {
                stats = String(format: "first token %.0f ms · decode %.1f tok/s · %d slices", s.timeToFirstTokenMs,
                               s.decodeTokS, s.slices)
            }
        } catch {
            answer = "Error: \(error)"
        }
    }

    func load(_ item: PhotosPickerItem?) async {
        guard let data = try? await item?.loadTransferable(type: Data.self),
              let source = CGImageSourceCreateWithData(data as CFData, nil),
              let cgImage = CGImageSourceCreateImageAtIndex(source, 0, nil) else { return }
        let properties = CGImageSourceCopyPropertiesAtIndex(source, 0, nil) as? [CFString: Any]
        image = try? RGBImage(cgImage: cgImage,
                              exifOrientation: properties?[kCGImagePropertyOrientation] as? Int ?? 1)
    }
}

struct ChatView: View {
    @StateObject private var model = ChatModel()
    @State private var question = "What is in this image?"
    @State private var pick: PhotosPickerItem?

    var body: some View {
        VStack(alignment: .leading, spacing: 12) {
            PhotosPicker(model.image == nil ? "Pick a photo" : "Photo attached", selection: $pick, matching: .images)
                .onChange(of: pick) { _, item in Task { await model.load(item) } }
            TextField("Ask", text: $question).textFieldStyle(.roundedBorder)
            Button("Ask") { Task { await model.ask(question) } }.disabled(model.busy)
            ScrollView { Text(model.answer).frame(maxWidth: .infinity, alignment: .leading) }
            Text(model.stats).font(.footnote).foregroundStyle(.secondary)
        }
        .padding()
    }
}
