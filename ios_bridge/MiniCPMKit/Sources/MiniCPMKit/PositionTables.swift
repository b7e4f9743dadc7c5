// NaViT bucketised position ids and the resampler's 2D sin-cos table, exactly as the Python side defines them
// (minicpm.image_processing.navit_position_ids: torch's scalar arange arithmetic; minicpm.resampler.sincos_1d:
// the float32 formula evaluated in double and rounded once).
import Foundation

public enum PositionTables {
    /// Bucket of each fractional coordinate `i / n` against `arange(1/side, 1, 1/side)` (torch, right=True).
    static func buckets(_ n: Int, side: Int) -> [Int] {
        let bstep = 1.0 / Double(side)
        let bcount = Int(((1.0 - bstep) / bstep).rounded(.up))
        let boundaries = (0..<bcount).map { Float(bstep + bstep * Double($0)) }
        let step = Double(Float(1) / Float(n))  // 1 / torch.tensor(n): a float32 step
        let count = Int(((1.0 - 1e-6) / step).rounded(.up))
        return (0..<count).map { i in
            let frac = Float(step * Double(i))  // torch CPU arange: start + step * i in double, stored as float32
            var b = 0
            while b < boundaries.count && boundaries[b] <= frac { b += 1 }
            return b
        }
    }

    /// Position ids of a slice of tgt size (h, w): bucket_h * side + bucket_w, row-major.
    public static func navitPositionIDs(h: Int, w: Int, side: Int) -> [Int64] {
        let bh = buckets(h, side: side), bw = buckets(w, side: side)
        var out = [Int64]()
        out.reserveCapacity(bh.count * bw.count)
        for r in bh { for c in bw { out.append(Int64(r * side + c)) } }
        return out
    }

    /// sincos_1d's frequencies for width `dim`: 1 / 10000^(i / (dim/2)) in double, rounded to float32.
    static func omega(_ dim: Int) -> [Float] {
        (0..<(dim / 2)).map { i in Float(1.0 / pow(10000.0, Double(i) / (Double(dim) / 2.0))) }
    }

    /// [h * w, dim] table of a slice: first dim/2 channels encode the column, the rest the row.
    public static func sinCos2D(dim: Int, h: Int, w: Int) -> [Float] {
        let half = dim / 2, quarter = half / 2
        let om = omega(half).map(Double.init)
        var out = [Float](repeating: 0, count: h * w * dim)
        out.withUnsafeMutableBufferPointer { o in
            for r in 0..<h {
                for c in 0..<w {
                    let base = (r * w + c) * dim
                    for i in 0..<quarter {
                        let aw = Double(c) * om[i], ah = Double(r) * om[i]
                        o[base + i] = Float(sin(aw))
                        o[base + quarter + i] = Float(cos(aw))
                        o[base + half + i] = Float(sin(ah))
                        o[base + half + quarter + i] = Float(cos(ah))
                    }
                }
            }
        }
        return out
    }
}
