import Testing
@testable import MiniCPMKit

/// The helpers batch-1 backends (Core ML, Core AI) use to run a batch one row at a time.
@Suite struct BackendTests {
    @Test func itemsSplitTheBatchAndStackingJoinsItBack() {
        let pixels = Tensor(shape: [2, 3, 1, 2], scalars: (0..<12).map(Float.init))
        let inputs = VisionInputs(pixelValues: pixels, positionIDs: Tensor(shape: [2, 2], scalars: [0, 1, 2, 3]),
                                  patchMask: Tensor(shape: [2, 2], scalars: [1, 1, 1, 0]),
                                  posEmbed: Tensor(shape: [2, 2, 1], scalars: [5, 6, 7, 8]))
        let items = inputs.items
        #expect(items.count == 2)
        #expect(items[1].pixelValues == Tensor(shape: [1, 3, 1, 2], scalars: (6..<12).map(Float.init)))
        #expect(items[1].positionIDs.scalars == [2, 3] && items[1].patchMask.scalars == [1, 0])
        #expect(items[0].posEmbed == Tensor(shape: [1, 2, 1], scalars: [5, 6]))
        #expect(Tensor.stacking(items.map(\.pixelValues)) == pixels)
    }
}
