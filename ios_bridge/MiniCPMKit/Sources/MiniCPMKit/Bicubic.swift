// Pillow's ImagingResample with the BICUBIC filter (a = -0.5) for 8-bit RGB: separable passes, horizontal
// then vertical, 22-bit fixed-point coefficients, 8-bit clipping after each pass; a pass is skipped when
// that side keeps its size (as Pillow does).
import Foundation

enum Bicubic {
    private static let precisionBits = 22

    private static func filter(_ x0: Double) -> Double {
        let a = -0.5
        let x = abs(x0)
        if x < 1.0 { return ((a + 2.0) * x - (a + 3.0)) * x * x + 1 }
        if x < 2.0 { return (((x - 5) * x + 8) * x - 4) * a }
        return 0.0
    }

    /// Per output index: first input index, tap count, and `ksize` fixed-point coefficients.
    private static func coefficients(inSize: Int, outSize: Int) -> (ksize: Int, bounds: [Int], kk: [Int32]) {
        let scale = Double(Float(inSize)) / Double(outSize)
        let filterscale = max(scale, 1.0)
        let support = 2.0 * filterscale
        let ksize = Int(support.rounded(.up)) * 2 + 1
        var bounds = [Int](repeating: 0, count: outSize * 2)
        var kk = [Int32](repeating: 0, count: outSize * ksize)
        var k = [Double](repeating: 0, count: ksize)
        let inv = 1.0 / filterscale
        for xx in 0..<outSize {
            let center = (Double(xx) + 0.5) * scale
            var xmin = Int(center - support + 0.5)  // truncation toward zero, as C's (int)
            if xmin < 0 { xmin = 0 }
            var xmax = Int(center + support + 0.5)
            if xmax > inSize { xmax = inSize }
            xmax -= xmin
            var ww = 0.0
            for x in 0..<xmax {
                let w = filter((Double(x + xmin) - center + 0.5) * inv)
                k[x] = w
                ww += w
            }
            for x in 0..<ksize {
                var v = x < xmax ? k[x] : 0
                if x < xmax && ww != 0.0 { v /= ww }
                let f = v * Double(1 << precisionBits)
                kk[xx * ksize + x] = Int32(v < 0 ? (-0.5 + f).rounded(.towardZero) : (0.5 + f).rounded(.towardZero))
            }
            bounds[xx * 2] = xmin
            bounds[xx * 2 + 1] = xmax
        }
        return (ksize, bounds, kk)
    }

    @inline(__always) private static func clip8(_ v: Int32) -> UInt8 {
        let s = v >> Int32(precisionBits)
        return s < 0 ? 0 : (s > 255 ? 255 : UInt8(s))
    }

    /// Resize interleaved RGB `src` (w x h) to (outW x outH).
    static func resize(_ src: [UInt8], width: Int, height: Int, to outW: Int, _ outH: Int) -> [UInt8] {
        if outW == width && outH == height { return src }
        var cur = src
        var curW = width
        if outW != width {
            let (ks, bounds, kk) = coefficients(inSize: width, outSize: outW)
            var out = [UInt8](repeating: 0, count: outW * height * 3)
            cur.withUnsafeBufferPointer { inp in
                out.withUnsafeMutableBufferPointer { o in
                    kk.withUnsafeBufferPointer { k in
                        for y in 0..<height {
                            let line = inp.baseAddress! + y * width * 3
                            let ol = o.baseAddress! + y * outW * 3
                            for xx in 0..<outW {
                                let xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1]
                                let kp = k.baseAddress! + xx * ks
                                var s0: Int32 = 1 << 21, s1: Int32 = 1 << 21, s2: Int32 = 1 << 21
                                var p = line + xmin * 3
                                for x in 0..<xmax {
                                    let c = kp[x]
                                    s0 &+= Int32(p[0]) &* c
                                    s1 &+= Int32(p[1]) &* c
                                    s2 &+= Int32(p[2]) &* c
                                    p += 3
                                }
                                ol[xx * 3] = clip8(s0); ol[xx * 3 + 1] = clip8(s1); ol[xx * 3 + 2] = clip8(s2)
                            }
                        }
                    }
                }
            }
            cur = out
            curW = outW
        }
        if outH == height { return cur }
        let (ks, bounds, kk) = coefficients(inSize: height, outSize: outH)
        let rowLen = curW * 3
        var out = [UInt8](repeating: 0, count: rowLen * outH)
        var acc = [Int32](repeating: 0, count: rowLen)
        cur.withUnsafeBufferPointer { inp in
            out.withUnsafeMutableBufferPointer { o in
                acc.withUnsafeMutableBufferPointer { a in
                    for yy in 0..<outH {
                        let ymin = bounds[yy * 2], ymax = bounds[yy * 2 + 1]
                        for i in 0..<rowLen { a[i] = 1 << 21 }
                        for y in 0..<ymax {
                            let c = kk[yy * ks + y]
                            let line = inp.baseAddress! + (y + ymin) * rowLen
                            for i in 0..<rowLen { a[i] &+= Int32(line[i]) &* c }
                        }
                        let ol = o.baseAddress! + yy * rowLen
                        for i in 0..<rowLen { ol[i] = clip8(a[i]) }
                    }
                }
            }
        }
        return out
    }
}
