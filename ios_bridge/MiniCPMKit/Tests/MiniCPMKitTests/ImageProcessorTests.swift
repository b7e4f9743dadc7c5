import Testing
@testable import MiniCPMKit
import Foundation

/// Conformance of the image path with the Python side (`ios_bridge/vectors/images.py`).
@Suite struct ImageProcessorTests {
    static func preprocessing(_ c: [String: Any]) throws -> Preprocessing {
        let data = try JSONSerialization.data(withJSONObject: c["preprocessing"]!)
        return try JSONDecoder().decode(Preprocessing.self, from: data)
    }

    @Test func imageSlicingGridsAndSizes() throws {
        let cases = try Vectors.cases("images/slicing")
        #expect(cases.count >= 30)
        for url in cases {
            let c = try Vectors.load(url)
            let proc = ImageProcessor(preprocessing: try Self.preprocessing(c), hiddenSize: 64)
            let w = c["width"] as! Int, h = c["height"] as! Int, cap = c["max_slice_nums"] as! Int
            let s = proc.sizes(width: w, height: h, maxSliceNums: cap)
            let grid = s.grid.map { [$0.cols, $0.rows] }
            #expect(grid == (c["grid"] as? [Int]), "\(url.lastPathComponent): grid")
            var sizes = [[s.source.0, s.source.1]]
            if let g = s.grid, let r = s.refine {
                sizes += Array(repeating: [r.0 / g.cols, r.1 / g.rows], count: g.cols * g.rows)
            }
            #expect(sizes == (c["slice_sizes"] as! [[Int]]), "\(url.lastPathComponent): slice sizes")
        }
    }

    @Test func imagePixelRows() throws {
        for url in try Vectors.cases("images/pixels") {
            let c = try Vectors.load(url)
            let name = url.lastPathComponent
            let proc = ImageProcessor(preprocessing: try Self.preprocessing(c), hiddenSize: 64)
            let w = c["width"] as! Int, h = c["height"] as! Int
            let bytes = try Vectors.bytes(c["input"], near: url)
            let image = (c["channels"] as! Int) == 4 ? RGBImage(width: w, height: h, rgba: bytes)
                : RGBImage(width: w, height: h, rgb: bytes)
            let start = Date()
            let out = proc.process(image)
            let ms = Date().timeIntervalSince(start) * 1000
            #expect(out.grid.map { [$0.cols, $0.rows] } == (c["grid"] as? [Int]), "\(name): grid")
            let tgt = c["tgt_sizes"] as! [[Int]]
            let refs = c["rows"] as! [Any]
            #expect(out.rows.count == refs.count, "\(name): slice count")
            var maxDiff: Float = 0, exact = 0, total = 0
            for (i, (row, ref)) in zip(out.rows, refs).enumerated() {
                #expect([row.height, row.width] == tgt[i], "\(name): tgt size of row \(i)")
                let want = try Vectors.floats(ref, near: url)
                #expect(row.pixels.count == want.count, "\(name): row \(i) length")
                guard row.pixels.count == want.count else { continue }
                for (a, b) in zip(row.pixels, want) {
                    let d = abs(a - b)
                    maxDiff = max(maxDiff, d); total += 1
                    if d == 0 { exact += 1 }
                }
            }
            print("image \(name): \(w)x\(h) \(out.rows.count) rows in \(String(format: "%.1f", ms)) ms, max diff \(maxDiff), exact \(Double(exact) / Double(max(total, 1)))")
            #expect(maxDiff <= 2.0 / 255.0 + 1e-6, "\(name): max pixel difference \(maxDiff)")
        }
    }

    @Test func imagePositionIDsAndTables() throws {
        for url in try Vectors.cases("images/positions") {
            let c = try Vectors.load(url)
            let name = url.lastPathComponent
            let h = c["h"] as! Int, w = c["w"] as! Int, dim = c["dim"] as! Int
            let ids = try Vectors.int64s(c["ids"], near: url)
            #expect(PositionTables.navitPositionIDs(h: h, w: w, side: 70) == ids, "\(name): position ids")
            let want = try Vectors.floats(c["table"], near: url)
            let got = PositionTables.sinCos2D(dim: dim, h: h, w: w)
            #expect(got.count == want.count, "\(name): table size")
            let d = zip(got, want).map { abs($0 - $1) }.max() ?? 0
            #expect(d <= 1e-6, "\(name): table max diff \(d)")
        }
    }
}
