import Foundation
import Testing
@testable import MiniCPMKit

/// `RGBImage.applyingOrientation` against Pillow's `ImageOps.exif_transpose` (ios_bridge/vectors/images.py).
@Suite struct ImageOrientationTests {
    @Test func everyExifOrientationMatchesPillow() throws {
        let cases = try Vectors.cases("images/orientation")
        #expect(cases.count == 8)
        for url in cases {
            let c = try Vectors.load(url)
            let orientation = try #require(c["orientation"] as? Int)
            let input = Vectors.shape(c["input"]), upright = Vectors.shape(c["upright"])
            let image = RGBImage(width: input[1], height: input[0], rgb: try Vectors.bytes(c["input"], near: url))
            let got = image.applyingOrientation(orientation)
            #expect(got.width == upright[1] && got.height == upright[0], "EXIF \(orientation): size")
            #expect(got.pixels == (try Vectors.bytes(c["upright"], near: url)), "EXIF \(orientation): pixels")
        }
    }
}
