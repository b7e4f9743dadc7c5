// Upright pixels: EXIF orientations applied as Pillow's `ImageOps.exif_transpose` does, and on Apple platforms
// a `CGImage` drawn into an 8-bit RGB buffer (the input `ImageProcessor` takes).
import Foundation
#if canImport(CoreGraphics)
import CoreGraphics
#endif

extension RGBImage {
    /// This image as displayed under EXIF orientation `exif` (1-8; 1 and unknown values: unchanged), the pixel
    /// permutation of Pillow's `exif_transpose` (2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise,
    /// 7 transverse, 8 rotate 90 counter-clockwise).
    public func applyingOrientation(_ exif: Int) -> RGBImage {
        guard (2...8).contains(exif) else { return self }
        let w = width, h = height, swaps = exif >= 5
        let (outW, outH) = swaps ? (h, w) : (w, h)
        var out = [UInt8](repeating: 0, count: pixels.count)
        for y in 0..<outH {
            for x in 0..<outW {
                let (sx, sy): (Int, Int)
                switch exif {
                case 2: (sx, sy) = (w - 1 - x, y)
                case 3: (sx, sy) = (w - 1 - x, h - 1 - y)
                case 4: (sx, sy) = (x, h - 1 - y)
                case 5: (sx, sy) = (y, x)
                case 6: (sx, sy) = (y, h - 1 - x)
                case 7: (sx, sy) = (w - 1 - y, h - 1 - x)
                default: (sx, sy) = (w - 1 - y, x)  // 8
                }
                let d = (y * outW + x) * 3, s = (sy * w + sx) * 3
                out[d] = pixels[s]; out[d + 1] = pixels[s + 1]; out[d + 2] = pixels[s + 2]
            }
        }
        return RGBImage(width: outW, height: outH, rgb: out)
    }
}

#if canImport(CoreGraphics)
extension RGBImage {
    /// The pixels of `image` in sRGB, upright for EXIF orientation `exif` (from `CGImageSource` properties, or
    /// `UIImage.imageOrientation` mapped to EXIF). Transparent pixels are composed over black (alpha dropped).
    public init(cgImage image: CGImage, exifOrientation exif: Int = 1) throws {
        let w = image.width, h = image.height
        var rgba = [UInt8](repeating: 0, count: w * h * 4)
        let drawn = rgba.withUnsafeMutableBytes { buffer -> Bool in
            guard let space = CGColorSpace(name: CGColorSpace.sRGB),
                  let context = CGContext(data: buffer.baseAddress, width: w, height: h, bitsPerComponent: 8,
                                          bytesPerRow: w * 4, space: space,
                                          bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue) else { return false }
            context.draw(image, in: CGRect(x: 0, y: 0, width: w, height: h))
            return true
        }
        guard drawn, w > 0, h > 0 else { throw MiniCPMError.invalidInput("cannot draw a \(w)x\(h) CGImage into RGB") }
        self = RGBImage(width: w, height: h, rgba: rgba).applyingOrientation(exif)
    }
}
#endif
