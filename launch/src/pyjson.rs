// SPDX-License-Identifier: MPL-2.0
//! Python-compatible JSON serialisation for the params hash (docs/runner.md, "Status object").
//!
//! The runner hashes `json.dumps(params, sort_keys=True)`: keys sorted at every level,
//! separators `", "` and `": "`, non-ASCII escaped as `\uXXXX`, Python's float `repr`.

use serde_json::Value;
use std::fmt::Write;

/// Serialises `value` exactly as Python's `json.dumps(value, sort_keys=True)` does.
pub fn dumps_sorted(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

/// Lower-case hex md5 of [`dumps_sorted`]: the runner's `last_params_hash`.
pub fn params_hash(value: &Value) -> String {
    format!("{:x}", md5::compute(dumps_sorted(value).as_bytes()))
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Some(u) = n.as_u64() {
                let _ = write!(out, "{u}");
            } else if let Some(f) = n.as_f64() {
                out.push_str(&py_float_repr(f));
            }
        }
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| cmp_py_str(a, b));
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_string(out, key);
                out.push_str(": ");
                write_value(out, &map[key]);
            }
            out.push('}');
        }
    }
}

/// Python sorts str keys by code point; Rust's `str` order is by UTF-8 bytes, which is the same.
fn cmp_py_str(a: &str, b: &str) -> std::cmp::Ordering {
    a.cmp(b)
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            ' '..='~' => out.push(ch),
            _ => {
                let mut units = [0u16; 2];
                for unit in ch.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, fixed notation for exponents in
/// [-4, 16), scientific (`1e-05`, `1.5e+16`) otherwise, and always a `.0` on integral values.
pub fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits, e.g. "1.2345e3", "-1e-5".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (neg, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        if point <= 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-point) as usize));
            out.push_str(&digits);
        } else if point as usize >= digits.len() {
            out.push_str(&digits);
            out.extend(std::iter::repeat_n('0', point as usize - digits.len()));
            out.push_str(".0");
        } else {
            out.push_str(&digits[..point as usize]);
            out.push('.');
            out.push_str(&digits[point as usize..]);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spec_test_vectors() {
        let cases = [
            (json!({}), "{}", "99914b932bd37a50b983c5e7c90ae93b"),
            (
                json!({"prompt":"a cat","width":512,"height":512}),
                r#"{"height": 512, "prompt": "a cat", "width": 512}"#,
                "d9edf618d935e10c1ef76f981919a277",
            ),
            (
                serde_json::from_str(r#"{"b":1,"a":"é","c":{"z":1.0,"y":[1e-05,true,null]}}"#)
                    .unwrap(),
                r#"{"a": "\u00e9", "b": 1, "c": {"y": [1e-05, true, null], "z": 1.0}}"#,
                "2bb7651bb16bc125e99b7e05b32c3ab6",
            ),
        ];
        for (value, text, hash) in cases {
            assert_eq!(dumps_sorted(&value), text);
            assert_eq!(params_hash(&value), hash);
        }
    }

    #[test]
    fn python_float_repr() {
        let cases = [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (1e-05, "1e-05"),
            (0.0001, "0.0001"),
            (123.456, "123.456"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1e15, "1000000000000000.0"),
            (-2.5, "-2.5"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
            (-0.0, "-0.0"),
        ];
        for (f, s) in cases {
            assert_eq!(py_float_repr(f), s, "{f}");
        }
    }

    #[test]
    fn escapes_like_python() {
        let v = json!({"k": "a\"b\\c\n\u{1}\u{7f}😀"});
        assert_eq!(
            dumps_sorted(&v),
            r#"{"k": "a\"b\\c\n\u0001\u007f\ud83d\ude00"}"#
        );
    }
}
