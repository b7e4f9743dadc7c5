// SHA-256 of files and directory artifacts, as runtime/manifest.py computes them (sha256_file / sha256_tree).
import Foundation
#if canImport(CryptoKit)
import CryptoKit
#endif

/// A streaming SHA-256: CryptoKit where it exists, a small portable implementation elsewhere (Linux).
public struct SHA256Hasher: Sendable {
    #if canImport(CryptoKit)
    private var inner = CryptoKit.SHA256()
    #else
    private var inner = PortableSHA256()
    #endif

    public init() {}

    public mutating func update(_ bytes: UnsafeRawBufferPointer) { inner.update(bufferPointer: bytes) }
    public mutating func update(_ data: Data) { data.withUnsafeBytes { update($0) } }

    /// The digest as lowercase hex (what manifest.json stores).
    public consuming func hexDigest() -> String {
        #if canImport(CryptoKit)
        return inner.finalize().map { String(format: "%02x", $0) }.joined()
        #else
        return inner.finalize().map { hex2($0) }.joined()
        #endif
    }

    /// One-shot digest of bytes.
    public static func hex(_ data: Data) -> String {
        var h = SHA256Hasher()
        h.update(data)
        return h.hexDigest()
    }

    /// The file's digest, read in 1 MiB blocks (artifacts can be gigabytes).
    public static func file(_ url: URL) throws -> String {
        let handle = try FileHandle(forReadingFrom: url)
        defer { try? handle.close() }
        var h = SHA256Hasher()
        while let block = try handle.read(upToCount: 1 << 20), !block.isEmpty { h.update(block) }
        return h.hexDigest()
    }

    /// `sha256_tree`: sha256 over `<relative POSIX path>\0<sha256 of the file>\n` per file, sorted by path.
    public static func tree(_ url: URL) throws -> String {
        let root = url.standardizedFileURL.resolvingSymlinksInPath()
        var files: [String] = []
        let rootPath = root.path.hasSuffix("/") ? root.path : root.path + "/"
        if let walker = FileManager.default.enumerator(at: root, includingPropertiesForKeys: [.isRegularFileKey]) {
            for case let item as URL in walker {
                let resolved = item.standardizedFileURL.resolvingSymlinksInPath()
                var isDir: ObjCBool = false
                guard FileManager.default.fileExists(atPath: resolved.path, isDirectory: &isDir), !isDir.boolValue
                else { continue }
                let full = item.standardizedFileURL.path
                guard full.hasPrefix(rootPath) else { continue }
                files.append(String(full.dropFirst(rootPath.count)))
            }
        }
        // Python sorts str by code point; UTF-8 byte order is the same order.
        files.sort { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) }
        var h = SHA256Hasher()
        for relative in files {
            let line = "\(relative)\u{0}\(try file(root.appendingPathComponent(relative)))\n"
            h.update(Data(line.utf8))
        }
        return h.hexDigest()
    }

    /// `sha256_path`: `tree` for a directory, `file` otherwise.
    public static func path(_ url: URL) throws -> String {
        var isDir: ObjCBool = false
        _ = FileManager.default.fileExists(atPath: url.path, isDirectory: &isDir)
        return isDir.boolValue ? try tree(url) : try file(url)
    }
}

@inline(__always) private func hex2(_ byte: UInt8) -> String {
    let digits = Array("0123456789abcdef")
    return String([digits[Int(byte >> 4)], digits[Int(byte & 15)]])
}

/// FIPS 180-4 SHA-256 (used where CryptoKit does not exist; tested against the standard vectors everywhere).
struct PortableSHA256: Sendable {
    private static let k: [UInt32] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
    ]
    private var state: [UInt32] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]
    private var buffer: [UInt8] = []
    private var length: UInt64 = 0

    mutating func update(bufferPointer bytes: UnsafeRawBufferPointer) {
        length &+= UInt64(bytes.count)
        var index = 0
        if !buffer.isEmpty {
            let take = min(64 - buffer.count, bytes.count)
            buffer.append(contentsOf: bytes[0..<take])
            index = take
            if buffer.count == 64 {
                buffer.withUnsafeBytes { compress(UnsafeRawBufferPointer(rebasing: $0[0..<64])) }
                buffer.removeAll(keepingCapacity: true)
            }
        }
        while index + 64 <= bytes.count {
            compress(UnsafeRawBufferPointer(rebasing: bytes[index..<index + 64]))
            index += 64
        }
        if index < bytes.count { buffer.append(contentsOf: bytes[index...]) }
    }

    mutating func finalize() -> [UInt8] {
        let bits = length &* 8
        var tail: [UInt8] = [0x80]
        while (buffer.count + tail.count) % 64 != 56 { tail.append(0) }
        for shift in stride(from: 56, through: 0, by: -8) { tail.append(UInt8(truncatingIfNeeded: bits >> UInt64(shift))) }
        let savedLength = length
        tail.withUnsafeBytes { update(bufferPointer: $0) }
        length = savedLength
        return state.flatMap { word in (0..<4).map { UInt8(truncatingIfNeeded: word >> UInt32(24 - 8 * $0)) } }
    }

    private mutating func compress(_ block: UnsafeRawBufferPointer) {
        var w = [UInt32](repeating: 0, count: 64)
        for i in 0..<16 {
            w[i] = UInt32(block[4 * i]) << 24 | UInt32(block[4 * i + 1]) << 16
                | UInt32(block[4 * i + 2]) << 8 | UInt32(block[4 * i + 3])
        }
        for i in 16..<64 {
            let s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3)
            let s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10)
            w[i] = w[i - 16] &+ s0 &+ w[i - 7] &+ s1
        }
        var a = state[0], b = state[1], c = state[2], d = state[3]
        var e = state[4], f = state[5], g = state[6], h = state[7]
        for i in 0..<64 {
            let s1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)
            let ch = (e & f) ^ (~e & g)
            let t1 = h &+ s1 &+ ch &+ Self.k[i] &+ w[i]
            let s0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)
            let maj = (a & b) ^ (a & c) ^ (b & c)
            let t2 = s0 &+ maj
            h = g; g = f; f = e; e = d &+ t1; d = c; c = b; b = a; a = t1 &+ t2
        }
        state[0] &+= a; state[1] &+= b; state[2] &+= c; state[3] &+= d
        state[4] &+= e; state[5] &+= f; state[6] &+= g; state[7] &+= h
    }

    @inline(__always) private func rotr(_ x: UInt32, _ n: UInt32) -> UInt32 { (x >> n) | (x << (32 - n)) }
}
