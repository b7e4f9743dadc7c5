import Testing
@testable import MiniCPMKit
import Foundation

/// FIPS 180-4 vectors, through the public hasher (CryptoKit on Apple) and the portable one (used on Linux).
@Suite struct SHA256Tests {
    static let vectors: [(String, String)] = [
        ("", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        ("abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        ("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
         "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"),
    ]

    @Test func knownVectors() {
        for (input, digest) in Self.vectors { #expect(SHA256Hasher.hex(Data(input.utf8)) == digest) }
    }

    @Test func portableInPiecesEqualsOneShot() {
        let million = Data(repeating: UInt8(ascii: "a"), count: 1_000_000)
        var h = PortableSHA256()
        var offset = 0
        for step in [1, 63, 64, 65, 1000, 999_000] where offset < million.count {
            let end = min(offset + step, million.count)
            million[offset..<end].withUnsafeBytes { h.update(bufferPointer: $0) }
            offset = end
        }
        let hex = h.finalize().map { String(format: "%02x", $0) }.joined()
        #expect(hex == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
    }
}
