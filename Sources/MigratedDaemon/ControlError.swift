import MigratedAPI

/// An answer other than success: the HTTP status and the APIError document the client receives.
public struct ControlError: Error, Equatable, CustomStringConvertible {
    public var status: Int
    public var body: APIError

    public init(_ status: Int, _ error: String, _ message: String) {
        self.status = status
        self.body = APIError(error: error, message: message)
    }

    public var description: String { "\(status) \(body.error): \(body.message)" }

    static func vmNotFound(_ id: String) -> ControlError { ControlError(404, "vm_not_found", "no VM with id '\(id)'") }
    static func badRequest(_ message: String) -> ControlError { ControlError(400, "bad_request", message) }
    static func unprocessable(_ error: String, _ message: String) -> ControlError { ControlError(422, error, message) }
    static func conflict(_ error: String, _ message: String) -> ControlError { ControlError(409, error, message) }
    /// The seam answers this until the migration engine is plugged in.
}
