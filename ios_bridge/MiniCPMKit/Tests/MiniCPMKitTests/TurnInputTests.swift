import Foundation
import Testing
@testable import MiniCPMKit

@Suite("TurnInput and TextStreamer")
struct TurnInputTests {
    static let processor = ImageProcessor(preprocessing: Preprocessing(maxPatches: 8), hiddenSize: 4)

    static func row(_ h: Int, _ w: Int, _ value: Float) -> PatchRow {
        PatchRow(pixels: [Float](repeating: value, count: 3 * 14 * h * w * 14), height: h, width: w)
    }

    @Test("slices go to the vision graph in batches of 8, in prompt order")
    func batching() throws {
        let first = ProcessedImage(grid: (3, 3), rows: (0..<10).map { Self.row(2, 2, Float($0)) })
        let second = ProcessedImage(grid: nil, rows: [Self.row(1, 3, 10)])
        let turn = try TurnInput(inputIDs: Array(0..<20), imageBounds: [1..<3], images: [first, second],
                                 processor: Self.processor)
        #expect(turn.imageBatches.map(\.batch) == [8, 3])
        #expect(turn.images == 2 && turn.slices == 11 && turn.spanKinds == [.image])
        let last = turn.imageBatches[1]
        #expect(last.pixelValues.shape == [3, 3, 14, 8 * 14] && last.posEmbed.shape == [3, 8, 4])
        #expect(last.patchMask.scalars == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0])
        #expect(last.pixelValues.scalars[2 * 3 * 14 * 8 * 14] == 10)  // row 2 of the batch is the second image
    }

    @Test("a slice larger than the vision graph is refused with the Python message")
    func tooBig() {
        let image = ProcessedImage(grid: nil, rows: [Self.row(3, 3, 0)])
        #expect(throws: MiniCPMError.invalidInput("a slice has 9 patches but this export's vision graph takes 8 "
            + "(re-export with --max-patches 9 or use fewer slices for such extreme aspect ratios)")) {
            try TurnInput(inputIDs: [1], imageBounds: [], images: [image], processor: Self.processor)
        }
    }

    @Test("TextStreamer holds back a trailing U+FFFD and emits only what is new, as Python's TextStreamer")
    func streamer() {
        let texts: [[Int]: String] = [[1]: "a", [1, 2]: "a\u{FFFD}", [1, 2, 3]: "aé", [1, 2, 3, 4]: "aé"]
        var s = TextStreamer { texts[$0] ?? "" }
        #expect([s.put(1), s.put(2), s.put(3), s.put(4), s.end()] == ["a", "", "é", "", ""])
        var cut = TextStreamer { texts[$0] ?? "" }
        #expect([cut.put(1), cut.put(2), cut.end()] == ["a", "", "\u{FFFD}"])  // end flushes what was held
    }
}
