// The errors of MiniCPMKit: one readable line each (what `minicpm.errors.UserError` is on the Python side).
import Foundation

public enum MiniCPMError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The export directory or its manifest is unusable (unknown schema, escaping path, missing or tampered file).
    case invalidExport(String)
    /// The conversation no longer fits in the KV cache (`runtime.session.ContextFull`).
    case contextFull(String)
    /// A request the export cannot serve (bad sampling values, a slice larger than the vision graph takes, ...).
    case invalidInput(String)
    /// A backend failed (the message names the call).
    case backend(String)

    public var description: String {
        switch self {
        case .invalidExport(let m), .contextFull(let m), .invalidInput(let m), .backend(let m): return m
        }
    }
}

extension MiniCPMError: LocalizedError {
    public var errorDescription: String? { description }
}
