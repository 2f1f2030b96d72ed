// SPDX-License-Identifier: MPL-2.0
//! Stage conditions (`"when": "params.enhance == true"`): a small expression language over the
//! stream's current params, evaluated again on every params update.
//!
//! ```text
//! expr    := and ("||" and)*
//! and     := unary ("&&" unary)*
//! unary   := "!" unary | "(" expr ")" | compare
//! compare := operand (("==" | "!=" | "<" | "<=" | ">" | ">=") operand)?
//! operand := params.a.b | number | "string" | 'string' | true | false | null
//! ```
//! A lone operand is true when it is truthy (not null, false, 0, "" or an empty array/object).
//! A missing param is `null`. Ordering compares numbers, or strings; anything else is false.

use serde_json::Value;
use std::cmp::Ordering;

/// A parsed condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    Or(Box<Cond>, Box<Cond>),
    And(Box<Cond>, Box<Cond>),
    Not(Box<Cond>),
    Cmp(Operand, Op, Operand),
    Truthy(Operand),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// `params.a.b` as the path `["a", "b"]`.
    Param(Vec<String>),
    Literal(Value),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Num(f64),
    Str(String),
    Op(&'static str),
    LParen,
    RParen,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let two: String = chars[i..chars.len().min(i + 2)].iter().collect();
        if let Some(op) = ["==", "!=", "<=", ">=", "&&", "||"]
            .into_iter()
            .find(|o| *o == two)
        {
            out.push(Tok::Op(op));
            i += 2;
            continue;
        }
        match c {
            '(' => out.push(Tok::LParen),
            ')' => out.push(Tok::RParen),
            '<' => out.push(Tok::Op("<")),
            '>' => out.push(Tok::Op(">")),
            '!' => out.push(Tok::Op("!")),
            '"' | '\'' => {
                let mut j = i + 1;
                let mut text = String::new();
                while j < chars.len() && chars[j] != c {
                    text.push(chars[j]);
                    j += 1;
                }
                if j >= chars.len() {
                    return Err(format!("unterminated string starting at column {}", i + 1));
                }
                out.push(Tok::Str(text));
                i = j + 1;
                continue;
            }
            c if c.is_ascii_digit() || c == '-' || c == '.' => {
                let mut j = i + 1;
                while j < chars.len()
                    && (chars[j].is_ascii_digit() || matches!(chars[j], '.' | 'e' | 'E'))
                {
                    j += 1;
                }
                let text: String = chars[i..j].iter().collect();
                let n = text
                    .parse::<f64>()
                    .map_err(|_| format!("'{text}' is not a number"))?;
                out.push(Tok::Num(n));
                i = j;
                continue;
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut j = i + 1;
                while j < chars.len()
                    && (chars[j].is_alphanumeric() || matches!(chars[j], '_' | '.' | '-'))
                {
                    j += 1;
                }
                out.push(Tok::Ident(chars[i..j].iter().collect()));
                i = j;
                continue;
            }
            c => return Err(format!("unexpected '{c}' at column {}", i + 1)),
        }
        i += 1;
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn expr(&mut self) -> Result<Cond, String> {
        let mut left = self.and()?;
        while self.peek() == Some(&Tok::Op("||")) {
            self.pos += 1;
            left = Cond::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }
    fn and(&mut self) -> Result<Cond, String> {
        let mut left = self.unary()?;
        while self.peek() == Some(&Tok::Op("&&")) {
            self.pos += 1;
            left = Cond::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }
    fn unary(&mut self) -> Result<Cond, String> {
        match self.peek() {
            Some(Tok::Op("!")) => {
                self.pos += 1;
                Ok(Cond::Not(Box::new(self.unary()?)))
            }
            Some(Tok::LParen) => {
                self.pos += 1;
                let e = self.expr()?;
                match self.next() {
                    Some(Tok::RParen) => Ok(e),
                    _ => Err("missing ')'".into()),
                }
            }
            _ => self.compare(),
        }
    }
    fn compare(&mut self) -> Result<Cond, String> {
        let left = self.operand()?;
        let op = match self.peek() {
            Some(Tok::Op("==")) => Op::Eq,
            Some(Tok::Op("!=")) => Op::Ne,
            Some(Tok::Op("<")) => Op::Lt,
            Some(Tok::Op("<=")) => Op::Le,
            Some(Tok::Op(">")) => Op::Gt,
            Some(Tok::Op(">=")) => Op::Ge,
            _ => return Ok(Cond::Truthy(left)),
        };
        self.pos += 1;
        let right = self.operand()?;
        Ok(Cond::Cmp(left, op, right))
    }
    fn operand(&mut self) -> Result<Operand, String> {
        match self.next() {
            Some(Tok::Num(n)) => Ok(Operand::Literal(
                serde_json::Number::from_f64(n)
                    .map(Value::Number)
                    .unwrap_or(Value::Null),
            )),
            Some(Tok::Str(s)) => Ok(Operand::Literal(Value::String(s))),
            Some(Tok::Ident(id)) => match id.as_str() {
                "true" => Ok(Operand::Literal(Value::Bool(true))),
                "false" => Ok(Operand::Literal(Value::Bool(false))),
                "null" => Ok(Operand::Literal(Value::Null)),
                _ => {
                    let mut parts = id.split('.');
                    if parts.next() != Some("params") {
                        return Err(format!(
                            "unknown name '{id}': use params.NAME, a number, a string, true, false or null"
                        ));
                    }
                    let path: Vec<String> = parts.map(str::to_owned).collect();
                    if path.is_empty() || path.iter().any(String::is_empty) {
                        return Err(format!("'{id}' does not name a param (params.NAME)"));
                    }
                    Ok(Operand::Param(path))
                }
            },
            Some(t) => Err(format!("unexpected {t:?}")),
            None => Err("the condition ends too early".into()),
        }
    }
}

/// Parses a condition.
pub fn parse(text: &str) -> Result<Cond, String> {
    let toks = tokenize(text)?;
    if toks.is_empty() {
        return Err("the condition is empty".into());
    }
    let mut p = Parser { toks, pos: 0 };
    let c = p.expr()?;
    if p.pos < p.toks.len() {
        return Err(format!(
            "unexpected {:?} after the condition",
            p.toks[p.pos]
        ));
    }
    Ok(c)
}

fn value<'a>(o: &'a Operand, params: &'a Value) -> Option<&'a Value> {
    match o {
        Operand::Literal(v) => Some(v),
        Operand::Param(path) => path.iter().try_fold(params, |v, k| v.get(k)),
    }
}

fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::Bool(true)) => true,
    }
}

fn equal(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a, b) {
        (None | Some(Value::Null), None | Some(Value::Null)) => true,
        (Some(Value::Number(x)), Some(Value::Number(y))) => x.as_f64() == y.as_f64(),
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

fn order(a: Option<&Value>, b: Option<&Value>) -> Option<Ordering> {
    match (a?, b?) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

impl Cond {
    /// Evaluates the condition on `params` (the stream's params object).
    pub fn eval(&self, params: &Value) -> bool {
        match self {
            Cond::Or(a, b) => a.eval(params) || b.eval(params),
            Cond::And(a, b) => a.eval(params) && b.eval(params),
            Cond::Not(a) => !a.eval(params),
            Cond::Truthy(o) => truthy(value(o, params)),
            Cond::Cmp(a, op, b) => {
                let (a, b) = (value(a, params), value(b, params));
                match op {
                    Op::Eq => equal(a, b),
                    Op::Ne => !equal(a, b),
                    Op::Lt => order(a, b) == Some(Ordering::Less),
                    Op::Le => matches!(order(a, b), Some(Ordering::Less | Ordering::Equal)),
                    Op::Gt => order(a, b) == Some(Ordering::Greater),
                    Op::Ge => matches!(order(a, b), Some(Ordering::Greater | Ordering::Equal)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(c: &str, p: Value) -> bool {
        parse(c).unwrap().eval(&p)
    }

    #[test]
    fn comparisons_and_logic() {
        assert!(ev("params.enhance == true", json!({"enhance": true})));
        assert!(!ev("params.enhance == true", json!({"enhance": false})));
        assert!(!ev("params.enhance == true", json!({})));
        assert!(ev("params.enhance", json!({"enhance": 1})));
        assert!(ev("!params.enhance", json!({})));
        assert!(ev("params.a.b >= 2.5", json!({"a": {"b": 3}})));
        assert!(ev(
            "params.x < 3 && params.s == 'hi'",
            json!({"x": 1, "s": "hi"})
        ));
        assert!(ev(
            "params.x > 3 || (params.s != \"hi\")",
            json!({"x": 1, "s": "ho"})
        ));
        assert!(ev("params.x == 2", json!({"x": 2.0})));
        assert!(!ev("params.x < 'a'", json!({"x": 2})));
        assert!(ev("params.missing == null", json!({})));
    }

    #[test]
    fn syntax_errors() {
        for bad in [
            "",
            "params.",
            "enhance == true",
            "params.x ==",
            "(params.x",
            "params.x == 'open",
            "params.x # 2",
            "params.x true",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}
