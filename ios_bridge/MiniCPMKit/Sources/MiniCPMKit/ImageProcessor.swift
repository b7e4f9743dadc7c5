// The image path of a MiniCPM-V export: slicing, Pillow-exact bicubic resizing, normalisation, patch rows and the
// vision graph's batch inputs (mirrors minicpm/image_processing.py and minicpm.modeling.vision_inputs).
import Foundation

/// An 8-bit RGB image, row-major interleaved (R, G, B per pixel). RGBA input drops alpha (as upstream).
public struct RGBImage: Sendable {
    public let width: Int
    public let height: Int
    public let pixels: [UInt8]  // width * height * 3
    public init(width: Int, height: Int, rgb: [UInt8]) {
        precondition(width > 0 && height > 0 && rgb.count == width * height * 3, "RGBImage: \(width)x\(height) needs \(width * height * 3) bytes, got \(rgb.count)")
        self.width = width; self.height = height; self.pixels = rgb
    }
    public init(width: Int, height: Int, rgba: [UInt8]) {
        precondition(width > 0 && height > 0 && rgba.count == width * height * 4, "RGBImage: \(width)x\(height) RGBA needs \(width * height * 4) bytes, got \(rgba.count)")
        var rgb = [UInt8](repeating: 0, count: width * height * 3)
        rgba.withUnsafeBufferPointer { s in
            rgb.withUnsafeMutableBufferPointer { d in
                for i in 0..<(width * height) {
                    d[i * 3] = s[i * 4]; d[i * 3 + 1] = s[i * 4 + 1]; d[i * 3 + 2] = s[i * 4 + 2]
                }
            }
        }
        self.width = width; self.height = height; self.pixels = rgb
    }
}

/// manifest.json `preprocessing` (snake_case keys in JSON; camelCase keys are accepted too).
public struct Preprocessing: Sendable, Codable {
    public var patchSize: Int
    public var scaleResolution: Int
    public var maxSliceNums: Int
    public var sliceMode: Bool
    public var mean: [Float]
    public var std: [Float]
    public var queryNum: Int
    public var useImageID: Bool
    public var imageTag: String
    public var maxPatches: Int
    public var numPatchesPerSide: Int

    public init(patchSize: Int = 14, scaleResolution: Int = 448, maxSliceNums: Int = 9, sliceMode: Bool = true,
                mean: [Float] = [0.5, 0.5, 0.5], std: [Float] = [0.5, 0.5, 0.5], queryNum: Int = 64,
                useImageID: Bool = true, imageTag: String = "(<image>./</image>)", maxPatches: Int = 1088,
                numPatchesPerSide: Int = 70) {
        self.patchSize = patchSize; self.scaleResolution = scaleResolution; self.maxSliceNums = maxSliceNums
        self.sliceMode = sliceMode; self.mean = mean; self.std = std; self.queryNum = queryNum
        self.useImageID = useImageID; self.imageTag = imageTag; self.maxPatches = maxPatches
        self.numPatchesPerSide = numPatchesPerSide
    }

    private struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(_ s: String) { stringValue = s }
        init?(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: Key.self)
        // Match keys ignoring case and underscores, so both plain and convertFromSnakeCase decoders work.
        var keys: [String: Key] = [:]
        for k in c.allKeys { keys[k.stringValue.replacingOccurrences(of: "_", with: "").lowercased()] = k }
        func key(_ name: String) throws -> Key {
            guard let k = keys[name.replacingOccurrences(of: "_", with: "")] else {
                throw DecodingError.keyNotFound(Key(name), .init(codingPath: c.codingPath,
                                                                 debugDescription: "preprocessing.\(name) missing"))
            }
            return k
        }
        patchSize = try c.decode(Int.self, forKey: key("patch_size"))
        scaleResolution = try c.decode(Int.self, forKey: key("scale_resolution"))
        maxSliceNums = try c.decode(Int.self, forKey: key("max_slice_nums"))
        sliceMode = try c.decode(Bool.self, forKey: key("slice_mode"))
        mean = try c.decode([Float].self, forKey: key("mean"))
        std = try c.decode([Float].self, forKey: key("std"))
        queryNum = try c.decode(Int.self, forKey: key("query_num"))
        useImageID = try c.decode(Bool.self, forKey: key("use_image_id"))
        imageTag = try c.decode(String.self, forKey: key("image_tag"))
        maxPatches = try c.decode(Int.self, forKey: key("max_patches"))
        numPatchesPerSide = try c.decode(Int.self, forKey: key("num_patches_per_side"))
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: Key.self)
        try c.encode(patchSize, forKey: Key("patch_size"))
        try c.encode(scaleResolution, forKey: Key("scale_resolution"))
        try c.encode(maxSliceNums, forKey: Key("max_slice_nums"))
        try c.encode(sliceMode, forKey: Key("slice_mode"))
        try c.encode(mean, forKey: Key("mean"))
        try c.encode(std, forKey: Key("std"))
        try c.encode(queryNum, forKey: Key("query_num"))
        try c.encode(useImageID, forKey: Key("use_image_id"))
        try c.encode(imageTag, forKey: Key("image_tag"))
        try c.encode(maxPatches, forKey: Key("max_patches"))
        try c.encode(numPatchesPerSide, forKey: Key("num_patches_per_side"))
    }
}

/// One slice (or the source image) as the encoder's patch row: [3, patch, n * patch] floats, normalised.
public struct PatchRow: Sendable {
    public let pixels: [Float]
    public let height: Int  // tgt_size h: patches per column
    public let width: Int   // tgt_size w: patches per row
    public var patches: Int { height * width }
}

/// An image after slicing: source first, then the slices row-major; `grid` is (cols, rows) when sliced.
public struct ProcessedImage: Sendable {
    public let grid: (cols: Int, rows: Int)?
    public let rows: [PatchRow]
    /// (width, height) of each resized image before patching: source, then slices.
    public var sliceSizes: [(width: Int, height: Int)] = []
    public init(grid: (cols: Int, rows: Int)?, rows: [PatchRow], sliceSizes: [(width: Int, height: Int)] = []) {
        self.grid = grid; self.rows = rows; self.sliceSizes = sliceSizes
    }
}

/// The vision graph's inputs for a batch of patch rows padded to `max_patches`, flattened row-major:
/// pixel_values [B,3,p,P*p], position_ids [B,P], patch_mask [B,P], pos_embed [B,P,H] (as `vision_inputs`).
public struct VisionBatch: Sendable {
    public let batch: Int
    public let pixelValues: [Float]
    public let positionIDs: [Int64]
    public let patchMask: [Float]
    public let posEmbed: [Float]
}

/// Slicing, Pillow-exact bicubic resizing, normalisation, patch rows, NaViT position ids and the resampler's
/// 2D sin-cos table (mirrors `minicpm/image_processing.py` and `minicpm.modeling.vision_inputs`).
public struct ImageProcessor: Sendable {
    public let preprocessing: Preprocessing
    public let hiddenSize: Int

    public init(preprocessing: Preprocessing, hiddenSize: Int) {
        self.preprocessing = preprocessing
        self.hiddenSize = hiddenSize
    }

    /// The slice grid (cols, rows) of an image of this size, or nil when it is not sliced.
    public func grid(width: Int, height: Int, maxSliceNums: Int? = nil) -> (cols: Int, rows: Int)? {
        let pre = preprocessing
        guard let g = SliceGrid.grid(width, height, maxSlices: maxSliceNums ?? pre.maxSliceNums,
                                     scale: pre.scaleResolution, neverSplit: !pre.sliceMode) else { return nil }
        return (g.0, g.1)
    }

    /// Slice sizes (width, height): the source image first, then each slice; and the refine size when sliced.
    public func sizes(width: Int, height: Int, maxSliceNums: Int? = nil)
        -> (grid: (cols: Int, rows: Int)?, source: (Int, Int), refine: (Int, Int)?) {
        let pre = preprocessing
        guard let g = grid(width: width, height: height, maxSliceNums: maxSliceNums) else {
            let best = SliceGrid.bestResize(Double(width), Double(height), scale: pre.scaleResolution,
                                            patch: pre.patchSize, allowUpscale: true)
            return (nil, best, nil)
        }
        let source = SliceGrid.bestResize(Double(width), Double(height), scale: pre.scaleResolution,
                                          patch: pre.patchSize, allowUpscale: false)
        let refine = SliceGrid.refineSize(width, height, grid: (g.cols, g.rows), scale: pre.scaleResolution,
                                          patch: pre.patchSize)
        return (g, source, refine)
    }

    /// Slice, resize (Pillow BICUBIC), normalise and patchify one image.
    public func process(_ image: RGBImage, maxSliceNums: Int? = nil) -> ProcessedImage {
        let s = sizes(width: image.width, height: image.height, maxSliceNums: maxSliceNums)
        let source = Bicubic.resize(image.pixels, width: image.width, height: image.height, to: s.source.0, s.source.1)
        var rows = [patchRow(source, width: s.source.0, height: s.source.1)]
        var sliceSizes = [(width: s.source.0, height: s.source.1)]
        if let g = s.grid, let refine = s.refine {
            let big = Bicubic.resize(image.pixels, width: image.width, height: image.height, to: refine.0, refine.1)
            let cw = refine.0 / g.cols, ch = refine.1 / g.rows
            for r in 0..<g.rows {
                for c in 0..<g.cols {
                    var cell = [UInt8](repeating: 0, count: cw * ch * 3)
                    for y in 0..<ch {
                        let from = ((r * ch + y) * refine.0 + c * cw) * 3
                        cell.replaceSubrange(y * cw * 3..<(y + 1) * cw * 3, with: big[from..<from + cw * 3])
                    }
                    rows.append(patchRow(cell, width: cw, height: ch))
                    sliceSizes.append((cw, ch))
                }
            }
        }
        return ProcessedImage(grid: s.grid, rows: rows, sliceSizes: sliceSizes)
    }

    /// Normalised [3, p, n*p] patch row of an RGB buffer whose sides are multiples of the patch size.
    public func patchRow(_ rgb: [UInt8], width: Int, height: Int) -> PatchRow {
        let p = preprocessing.patchSize
        let ph = height / p, pw = width / p, n = ph * pw
        // float32 as numpy: x / 255, then (x - mean) / std; one lookup table per channel
        var lut = [Float](repeating: 0, count: 3 * 256)
        for c in 0..<3 {
            for v in 0..<256 {
                lut[c * 256 + v] = (Float(v) / Float(255) - preprocessing.mean[c]) / preprocessing.std[c]
            }
        }
        let rowLen = n * p
        var out = [Float](repeating: 0, count: 3 * p * rowLen)
        rgb.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { o in
                lut.withUnsafeBufferPointer { l in
                    for py in 0..<ph {
                        for i in 0..<p {
                            let line = src.baseAddress! + ((py * p + i) * width) * 3
                            for px in 0..<pw {
                                let patch = py * pw + px
                                for j in 0..<p {
                                    let s = line + (px * p + j) * 3
                                    let col = patch * p + j
                                    o[(0 * p + i) * rowLen + col] = l[Int(s[0])]
                                    o[(1 * p + i) * rowLen + col] = l[256 + Int(s[1])]
                                    o[(2 * p + i) * rowLen + col] = l[512 + Int(s[2])]
                                }
                            }
                        }
                    }
                }
            }
        }
        return PatchRow(pixels: out, height: ph, width: pw)
    }

    /// The vision graph's inputs for up to a batch of rows, each padded to `max_patches`
    /// (a row longer than that is a programming error: check `patches <= maxPatches` first).
    public func visionBatch(_ rows: ArraySlice<PatchRow>) -> VisionBatch {
        let p = preprocessing.patchSize, longest = preprocessing.maxPatches, hd = hiddenSize
        let b = rows.count
        var pixels = [Float](repeating: 0, count: b * 3 * p * longest * p)
        var ids = [Int64](repeating: 0, count: b * longest)
        var mask = [Float](repeating: 0, count: b * longest)
        var pos = [Float](repeating: 0, count: b * longest * hd)
        for (i, row) in rows.enumerated() {
            let n = row.patches
            precondition(n <= longest, "a slice has \(n) patches, more than the \(longest) the vision step takes")
            for c in 0..<3 {
                for k in 0..<p {
                    let dst = ((i * 3 + c) * p + k) * longest * p
                    let src = (c * p + k) * n * p
                    pixels.replaceSubrange(dst..<dst + n * p, with: row.pixels[src..<src + n * p])
                }
            }
            let pid = PositionTables.navitPositionIDs(h: row.height, w: row.width, side: preprocessing.numPatchesPerSide)
            ids.replaceSubrange(i * longest..<i * longest + n, with: pid)
            for j in 0..<n { mask[i * longest + j] = 1 }
            let table = PositionTables.sinCos2D(dim: hd, h: row.height, w: row.width)
            pos.replaceSubrange(i * longest * hd..<(i * longest + n) * hd, with: table)
        }
        return VisionBatch(batch: b, pixelValues: pixels, positionIDs: ids, patchMask: mask, posEmbed: pos)
    }
}
