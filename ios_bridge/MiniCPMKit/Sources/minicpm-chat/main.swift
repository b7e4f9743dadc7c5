// minicpm-chat: `runtime.chat` over a Core ML (macOS 15+) or Core AI (macOS 27+) export.
//     minicpm-chat EXPORT_DIR [--max-new-tokens N]
// Type a message and press enter; `/image PATH` attaches an image to the next message, `/reset` starts over,
// `/quit` leaves. Answers stream as they are generated; the stats line follows each answer.
import Foundation
#if canImport(CoreML) && canImport(ImageIO)
import ImageIO
import MiniCPMCoreML
import MiniCPMKit
#if canImport(CoreAI)
import MiniCPMCoreAI
#endif

/// The backend of the export's own format, as runtime.backends.default_backend picks it.
func backend(for manifest: Manifest) async throws -> any Backend {
    switch manifest.format {
    case "coreml": return try await CoreMLBackend(manifest: manifest)
    #if canImport(CoreAI)
    case "coreai": return try await CoreAIBackend(manifest: manifest)
    #endif
    default:
        throw MiniCPMError.invalidExport("minicpm-chat runs Core ML or Core AI exports; this is a \(manifest.format) export")
    }
}

func loadImage(_ path: String) throws -> RGBImage {
    guard let source = CGImageSourceCreateWithURL(URL(fileURLWithPath: path) as CFURL, nil),
          let image = CGImageSourceCreateImageAtIndex(source, 0, nil) else {
        throw MiniCPMError.invalidInput("\(path): not a readable image")
    }
    let properties = CGImageSourceCopyPropertiesAtIndex(source, 0, nil) as? [CFString: Any]
    let orientation = properties?[kCGImagePropertyOrientation] as? Int ?? 1
    return try RGBImage(cgImage: image, exifOrientation: orientation)
}

func chat() async throws {
    var arguments = Array(CommandLine.arguments.dropFirst())
    guard let directory = arguments.first else {
        throw MiniCPMError.invalidInput("usage: minicpm-chat EXPORT_DIR [--max-new-tokens N]")
    }
    arguments.removeFirst()
    var maxNewTokens = 256
    if let i = arguments.firstIndex(of: "--max-new-tokens"), i + 1 < arguments.count, let n = Int(arguments[i + 1]) {
        maxNewTokens = n
    }
    let url = URL(fileURLWithPath: directory)
    let manifest = try Manifest.load(directory: url)
    let conversation = try Conversation(directory: url, backend: try await backend(for: manifest))
    let sampling = try await conversation.defaultSampling(maxNewTokens: maxNewTokens)
    print("\(manifest.model.variant) on \(manifest.format); /image PATH, /reset, /quit")
    var images: [RGBImage] = []
    while true {
        print("> ", terminator: "")
        guard let line = readLine()?.trimmingCharacters(in: .whitespaces) else { break }
        if line == "/quit" { break }
        if line == "/reset" { try await conversation.reset(); images = []; print("(new conversation)"); continue }
        if line.hasPrefix("/image ") {
            do { images.append(try loadImage(String(line.dropFirst(7)))) } catch { print("error: \(error)") }
            continue
        }
        if line.isEmpty { continue }
        do {
            for try await piece in try await conversation.ask(line, images: images, sampling: sampling) {
                print(piece, terminator: "")
                fflush(stdout)
            }
            print()
            if let s = await conversation.lastResult?.stats {
                print(String(format: "[%d prompt tokens, %d slices] vision %.1f ms/slice, first token %.0f ms, "
                             + "prefill %.1f tok/s, decode %d tokens %.1f tok/s", s.promptTokens, s.slices,
                             s.visionMsPerSlice, s.timeToFirstTokenMs, s.prefillTokS, s.newTokens, s.decodeTokS))
            }
        } catch {
            print("\nerror: \(error)")
        }
        images = []
    }
}

do {
    try await chat()
} catch {
    FileHandle.standardError.write(Data("error: \(error)\n".utf8))
    exit(2)
}
#else
FileHandle.standardError.write(Data("minicpm-chat needs macOS 15+ (Core ML); on Linux use python -m runtime.chat\n".utf8))
exit(2)
#endif
