import Foundation

/// The one JSON style of the control API: snake_case keys, sorted for stable output and diffs.
public enum APIJSON {
    public static func encode<T: Encodable>(_ value: T) throws -> Data {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
        return try encoder.encode(value)
    }

    public static func decode<T: Decodable>(_ type: T.Type, from data: Data) throws -> T {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        return try decoder.decode(type, from: data)
    }

    /// Decodes a request body, refusing fields the type does not know: a misspelt optional field would otherwise
    /// be dropped without a word and its default used. The message names the offending part.
    public static func decodeRequest<T: StrictlyDecodable>(_ type: T.Type, from data: Data) throws(APIError) -> T {
        let object: Any
        do {
            object = try JSONSerialization.jsonObject(with: data)
        } catch {
            throw APIError(error: "bad_json", message: "the body is not JSON")
        }
        guard let fields = object as? [String: Any] else {
            throw APIError(error: "bad_request", message: "the body must be a JSON object")
        }
        if let unknown = fields.keys.sorted().first(where: { !T.fieldNames.contains($0) }) {
            throw APIError(error: "bad_request", message: "unknown field '\(unknown)'; known fields: \(T.fieldNames.sorted().joined(separator: ", "))")
        }
        do {
            return try decode(type, from: data)
        } catch let DecodingError.keyNotFound(key, _) {
            throw APIError(error: "bad_request", message: "missing field '\(snakeCase(key.stringValue))'")
        } catch let DecodingError.typeMismatch(expected, context) {
            throw APIError(error: "bad_request", message: "field '\(path(context))' must be \(describe(expected))")
        } catch let DecodingError.valueNotFound(expected, context) {
            throw APIError(error: "bad_request", message: "field '\(path(context))' must be \(describe(expected)), not null")
        } catch let DecodingError.dataCorrupted(context) where context.codingPath.isEmpty {
            // Foundation reports a number out of its field's range (-1 for an unsigned field) without the field.
            throw APIError(error: "bad_request", message: "a field's value is out of range or of the wrong type (\(context.debugDescription))")
        } catch let DecodingError.dataCorrupted(context) {
            throw APIError(error: "bad_request", message: "field '\(path(context))': \(context.debugDescription)")
        } catch {
            throw APIError(error: "bad_request", message: "\(error)")
        }
    }

    private static func path(_ context: DecodingError.Context) -> String {
        context.codingPath.map { snakeCase($0.stringValue) }.joined(separator: ".")
    }

    private static func describe(_ type: Any.Type) -> String {
        switch type {
        case is String.Type: "a string"
        case is Bool.Type: "true or false"
        case is Double.Type: "a number"
        case is any BinaryInteger.Type: "a whole number in range"
        default: "of type \(type)"
        }
    }

    /// The wire spelling of a Swift property name, for messages.
    static func snakeCase(_ name: String) -> String {
        var out = ""
        for character in name {
            if character.isUppercase { out += "_" + character.lowercased() } else { out.append(character) }
        }
        return out
    }
}

/// A request document whose wire field names are listed, so that unknown fields can be refused.
public protocol StrictlyDecodable: Decodable {
    static var fieldNames: Set<String> { get }
}
