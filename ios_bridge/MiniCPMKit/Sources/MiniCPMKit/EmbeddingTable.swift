// The raw [V, H] token-embedding table of an export (`token_embedding.bin`), memory-mapped and indexed by the
// host (runtime/session.py `_embedding_table` and `Session._embed`).
import Foundation

/// The token-embedding table, memory-mapped: a lookup copies rows, nothing is loaded up front.
public struct EmbeddingTable: Sendable {
    public let vocabSize: Int
    public let hiddenSize: Int
    /// "float32", "float16" or "bfloat16" (little-endian), as the manifest says.
    public let dtype: String
    private let data: Data

    /// Maps the manifest's `token_embedding` artifact; refused in one line unless the file holds exactly the
    /// `[vocab, hidden]` float32/float16/bfloat16 table the manifest describes (as the Python runtime refuses it).
    public init(manifest: Manifest) throws {
        let directory = manifest.directory.path
        guard let entry = manifest.artifacts["token_embedding"], let dtype = entry.dtype,
              ["float32", "float16", "bfloat16"].contains(dtype), let shape = entry.shape, shape.count == 2 else {
            throw MiniCPMError.invalidExport("\(directory): manifest.json lacks a token_embedding artifact with a "
                                             + "float32/float16/bfloat16 dtype and a [vocab, hidden] shape")
        }
        let (vocab, hidden) = (shape[0], shape[1])
        let url = manifest.url(of: "token_embedding")
        let size = vocab * hidden * (dtype == "float32" ? 4 : 2)
        let refused = MiniCPMError.invalidExport("\(directory): token_embedding (\(url.lastPathComponent)) does not "
                                                 + "hold the [\(vocab), \(hidden)] \(dtype) table the manifest describes")
        guard vocab >= 1, hidden == manifest.model.hiddenSize else { throw refused }
        let mapped: Data
        do { mapped = try Data(contentsOf: url, options: .alwaysMapped) } catch { throw refused }
        guard mapped.count == size else { throw refused }
        self.vocabSize = vocab
        self.hiddenSize = hidden
        self.dtype = dtype
        self.data = mapped
    }

    /// The rows of `ids` times `scale`, flattened `[ids.count * H]`: float32 arithmetic, as numpy's
    /// `table[ids].astype(float32) * scale`.
    public func embed(_ ids: [Int], scale: Double) throws -> [Float] {
        let h = hiddenSize, s = Float(scale)
        if let bad = ids.first(where: { $0 < 0 || $0 >= vocabSize }) {
            throw MiniCPMError.invalidInput("token id \(bad) is outside the \(vocabSize)-token embedding table")
        }
        var out = [Float](repeating: 0, count: ids.count * h)
        data.withUnsafeBytes { raw in
            out.withUnsafeMutableBufferPointer { dst in
                for (row, id) in ids.enumerated() {
                    for j in 0..<h {
                        let value: Float
                        if dtype == "float16" {
                            let bits = raw.loadUnaligned(fromByteOffset: (id * h + j) * 2, as: UInt16.self)
                            value = HalfFloat.float(UInt16(littleEndian: bits))
                        } else if dtype == "bfloat16" {  // the upper half of a float32
                            let bits = raw.loadUnaligned(fromByteOffset: (id * h + j) * 2, as: UInt16.self)
                            value = Float(bitPattern: UInt32(UInt16(littleEndian: bits)) << 16)
                        } else {
                            let bits = raw.loadUnaligned(fromByteOffset: (id * h + j) * 4, as: UInt32.self)
                            value = Float(bitPattern: UInt32(littleEndian: bits))
                        }
                        dst[row * h + j] = value * s
                    }
                }
            }
        }
        return out
    }
}

/// IEEE 754 binary16 conversions done by hand (Swift's `Float16` is unavailable on macOS x86_64).
public enum HalfFloat {
    /// The float16 value of `bits`, exactly.
    public static func float(_ bits: UInt16) -> Float {
        let sign = UInt32(bits >> 15) << 31
        let exponent = Int(bits >> 10) & 0x1f
        let mantissa = UInt32(bits & 0x3ff)
        if exponent == 0x1f { return Float(bitPattern: sign | 0x7f80_0000 | (mantissa << 13)) }  // inf / NaN
        if exponent == 0 {  // zero or subnormal: mantissa * 2^-24
            let magnitude = Float(mantissa) * Float(bitPattern: 0x3380_0000)
            return sign == 0 ? magnitude : -magnitude
        }
        return Float(bitPattern: sign | UInt32(exponent + 112) << 23 | (mantissa << 13))
    }

    /// `x` rounded to the nearest float16 (ties to even), as numpy's `astype(float16)`; overflow gives inf.
    public static func bits(_ x: Float) -> UInt16 {
        let b = x.bitPattern
        let sign = UInt16((b >> 16) & 0x8000)
        let exponent = Int((b >> 23) & 0xff)
        let mantissa = b & 0x7f_ffff
        if exponent == 0xff { return sign | 0x7c00 | (mantissa != 0 ? 0x200 : 0) }
        let e = exponent - 127 + 15
        if e >= 0x1f { return sign | 0x7c00 }
        if e <= 0 {  // subnormal half (or zero): round mantissa * 2^(e-1) to an integer count of 2^-24
            if e < -10 { return sign }
            let m = mantissa | 0x80_0000
            let shift = UInt32(14 - e)
            var half = m >> shift
            let rest = m & ((1 << shift) - 1), midpoint = UInt32(1) << (shift - 1)
            if rest > midpoint || (rest == midpoint && half & 1 == 1) { half += 1 }
            return sign | UInt16(half)
        }
        var half = UInt32(e) << 10 | (mantissa >> 13)
        let rest = mantissa & 0x1fff
        if rest > 0x1000 || (rest == 0x1000 && half & 1 == 1) { half += 1 }  // may carry into the exponent: right
        return sign | UInt16(half)
    }

    /// `x` rounded to float16 and back.
    public static func round(_ x: Float) -> Float { float(bits(x)) }
}
