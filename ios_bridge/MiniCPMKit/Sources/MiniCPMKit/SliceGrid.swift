// Slice grid and resize sizes, exactly as minicpm/image_processing.py (upstream MiniCPMVImageProcessor).
import Foundation

enum SliceGrid {
    /// `max(round(length / p) * p, p)` with Python's round (half to even).
    static func ensureDivide(_ length: Double, _ patch: Int) -> Int {
        max(Int((length / Double(patch)).rounded(.toNearestOrEven)) * patch, patch)
    }

    /// (width, height) after `find_best_resize`.
    static func bestResize(_ width: Double, _ height: Double, scale: Int, patch: Int, allowUpscale: Bool) -> (Int, Int) {
        var w = width, h = height
        if w * h > Double(scale * scale) || allowUpscale {
            let r = w / h
            h = Double(Int(Double(scale) / r.squareRoot()))
            w = Double(Int(h * r))
        }
        return (ensureDivide(w, patch), ensureDivide(h, patch))
    }

    /// (width, height) of the refine image for `grid` (cols, rows).
    static func refineSize(_ width: Int, _ height: Int, grid: (Int, Int), scale: Int, patch: Int) -> (Int, Int) {
        let rw = ensureDivide(Double(width), grid.0), rh = ensureDivide(Double(height), grid.1)
        let cell = bestResize(Double(rw) / Double(grid.0), Double(rh) / Double(grid.1), scale: scale, patch: patch,
                              allowUpscale: true)
        return (cell.0 * grid.0, cell.1 * grid.1)
    }

    /// (cols, rows), or nil when the image is not sliced.
    static func grid(_ width: Int, _ height: Int, maxSlices: Int, scale: Int, neverSplit: Bool) -> (Int, Int)? {
        let logRatio = log(Double(width) / Double(height))
        let ratio = Double(width * height) / Double(scale * scale)
        let multiple = min(Int(ratio.rounded(.up)), maxSlices)
        if multiple <= 1 || neverSplit { return nil }
        var best = (1, 1), bestError = Double.infinity
        for n in [multiple - 1, multiple, multiple + 1] where n != 1 && n <= maxSlices {
            for m in 1...n where n % m == 0 {
                let error = abs(logRatio - log(Double(m) / Double(n / m)))
                if error < bestError { best = (m, n / m); bestError = error }  // strict: first wins ties
            }
        }
        return best
    }
}
