//! Structure: unknown fields and values of the wrong type, every one with its field path, checked
//! against the model's own JSON Schema ([`super::json_schema`]), so the schema editors use and
//! the checks here cannot disagree.
//!
//! serde stops at the first structural error; this walks the whole document first and lists
//! them all. It also repairs the document as it goes (an unknown field is dropped, a value of
//! the wrong type is replaced by a neutral one of the right type) so the typed config can still
//! be built and validated: the semantic errors come out in the same list.

use serde_json::{Map, Value};

use super::FieldError;

/// How far a `$ref` chain is followed (the model's are one deep).
const MAX_REF_DEPTH: usize = 8;

/// Checks `doc` against `schema`; returns every structural error and leaves `doc` repaired.
pub(super) fn check(schema: &Value, doc: &mut Value) -> Vec<FieldError> {
    let mut w = Walker { root: schema, errors: Vec::new() };
    if !w.walk(schema, doc, "") {
        *doc = w.placeholder(schema);
    }
    w.errors
}

/// Whether an error at `seen` already explains one at `other`: the same place, or one inside
/// the other (a missing `name` explains "name or mac is required" at the interface). A
/// document that is not a mapping (an error at the empty path) explains everything.
pub(super) fn covers(seen: &str, other: &str) -> bool {
    fn inside(child: &str, parent: &str) -> bool {
        !parent.is_empty()
            && child.strip_prefix(parent).is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
    }
    seen.is_empty() || seen == other || inside(other, seen) || inside(seen, other)
}

struct Walker<'s> {
    root: &'s Value,
    errors: Vec<FieldError>,
}

fn at(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

impl<'s> Walker<'s> {
    fn err(&mut self, path: &str, message: String) {
        self.errors.push(FieldError { path: path.to_owned(), message });
    }

    /// `s` with its `$ref`s followed (`#/$defs/Name`).
    fn resolve(&self, mut s: &'s Value) -> &'s Value {
        for _ in 0..MAX_REF_DEPTH {
            let Some(r) = s.get("$ref").and_then(Value::as_str) else { break };
            let Some(target) = r.strip_prefix('#').and_then(|p| self.root.pointer(p)) else { break };
            s = target;
        }
        s
    }

    fn alternatives(&self, s: &'s Value) -> Option<&'s Vec<Value>> {
        s.get("anyOf").or_else(|| s.get("oneOf")).and_then(Value::as_array)
    }

    /// Whether `v` has the shape `s` asks for at its top (type, const or enum), not looking inside.
    fn shape_fits(&self, s: &'s Value, v: &Value) -> bool {
        let s = self.resolve(s);
        if let Some(alts) = self.alternatives(s) {
            return alts.iter().any(|a| self.shape_fits(a, v));
        }
        if let Some(c) = s.get("const") {
            return c == v;
        }
        if let Some(e) = s.get("enum").and_then(Value::as_array) {
            return e.contains(v);
        }
        let types = types_of(s);
        types.is_empty() || types.iter().any(|t| type_fits(t, v))
    }

    /// What `s` accepts, in words: "a string", "one of `correct`, `report`".
    fn expected(&self, s: &'s Value) -> String {
        let s = self.resolve(s);
        let mut consts = Vec::new();
        let mut kinds = Vec::new();
        self.collect_expected(s, &mut consts, &mut kinds);
        if !consts.is_empty() {
            return format!("one of {}", consts.join(", "));
        }
        match kinds.as_slice() {
            [] => "something else".into(),
            [one] => (*one).to_owned(),
            [init @ .., last] => format!("{} or {last}", init.join(", ")),
        }
    }

    fn collect_expected(&self, s: &'s Value, consts: &mut Vec<String>, kinds: &mut Vec<&'static str>) {
        let s = self.resolve(s);
        if let Some(alts) = self.alternatives(s) {
            for a in alts {
                self.collect_expected(a, consts, kinds);
            }
            return;
        }
        if let Some(c) = s.get("const") {
            consts.push(format!("`{}`", c.as_str().map_or_else(|| c.to_string(), str::to_owned)));
            return;
        }
        if let Some(e) = s.get("enum").and_then(Value::as_array) {
            consts.extend(
                e.iter().map(|c| format!("`{}`", c.as_str().map_or_else(|| c.to_string(), str::to_owned))),
            );
            return;
        }
        for t in types_of(s) {
            let word = match t {
                "string" => "a string",
                "integer" => "a whole number",
                "number" => "a number",
                "boolean" => "true or false",
                "array" => "a list",
                "object" => "a mapping",
                _ => continue, // null: an optional field may be left out instead
            };
            if !kinds.contains(&word) {
                kinds.push(word);
            }
        }
    }

    /// Checks `v` against `s`, recording every problem under `path`. Returns false when `v`
    /// itself cannot stand here (the caller replaces or drops it); problems further inside are
    /// repaired in place.
    fn walk(&mut self, s: &'s Value, v: &mut Value, path: &str) -> bool {
        let s = self.resolve(s);
        if let Some(alts) = self.alternatives(s) {
            return match alts.iter().find(|a| self.shape_fits(a, v)) {
                Some(a) => self.walk(a, v, path),
                None => {
                    let msg = wrong_type(&self.expected(s), v);
                    self.err(path, msg);
                    false
                }
            };
        }
        if !self.shape_fits(s, v) {
            let msg = wrong_type(&self.expected(s), v);
            self.err(path, msg);
            return false;
        }
        match v {
            Value::Object(map) => self.walk_object(s, map, path),
            Value::Array(items) => {
                if let Some(item) = s.get("items") {
                    for (i, x) in items.iter_mut().enumerate() {
                        if !self.walk(item, x, &format!("{path}[{i}]")) {
                            *x = self.placeholder(item);
                        }
                    }
                }
                true
            }
            Value::Number(n) => match out_of_range(s, n) {
                Some(msg) => {
                    self.err(path, msg);
                    false
                }
                None => true,
            },
            _ => true,
        }
    }

    fn walk_object(&mut self, s: &'s Value, map: &mut Map<String, Value>, path: &str) -> bool {
        let props = s.get("properties").and_then(Value::as_object);
        let extra = s.get("additionalProperties");
        let mut drop = Vec::new();
        for (k, x) in map.iter_mut() {
            let here = at(path, k);
            match (props.and_then(|p| p.get(k)), extra) {
                (Some(ps), _) => {
                    if !self.walk(ps, x, &here) {
                        drop.push(k.clone());
                    }
                }
                (None, Some(Value::Bool(false))) => {
                    let known: Vec<&str> =
                        props.map(|p| p.keys().map(String::as_str).collect()).unwrap_or_default();
                    let msg = match did_you_mean(k, &known) {
                        Some(m) => format!("unknown field `{k}`; did you mean `{m}`?"),
                        None if known.is_empty() => format!("unknown field `{k}`"),
                        None => format!("unknown field `{k}` (known fields: {})", known.join(", ")),
                    };
                    self.err(&here, msg);
                    drop.push(k.clone());
                }
                (None, Some(ap)) if ap.is_object() => {
                    if !self.walk(ap, x, &here) {
                        drop.push(k.clone());
                    }
                }
                (None, _) => {}
            }
        }
        let dropped: Vec<String> = drop.clone();
        for k in drop {
            map.remove(&k);
        }
        let required = s.get("required").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        for r in required.iter().filter_map(Value::as_str) {
            if map.contains_key(r) {
                continue;
            }
            if !dropped.iter().any(|d| d == r) {
                self.err(&at(path, r), "is required".into());
            }
            let filler = props.and_then(|p| p.get(r)).map_or(Value::Null, |ps| self.placeholder(ps));
            map.insert(r.to_owned(), filler);
        }
        true
    }

    /// A neutral value of the shape `s` asks for: what stands in for a value that was wrong,
    /// so the rest of the document can still be checked. Its own errors are never reported
    /// (they are at the place already reported).
    fn placeholder(&self, s: &'s Value) -> Value {
        let s = self.resolve(s);
        if let Some(alts) = self.alternatives(s) {
            let pick = alts.iter().find(|a| types_of(self.resolve(a)) != ["null"]).or_else(|| alts.first());
            return pick.map_or(Value::Null, |a| self.placeholder(a));
        }
        if let Some(c) = s.get("const") {
            return c.clone();
        }
        if let Some(first) = s.get("enum").and_then(Value::as_array).and_then(|e| e.first()) {
            return first.clone();
        }
        match types_of(s).into_iter().find(|t| *t != "null") {
            Some("string") => Value::from(""),
            Some("integer" | "number") => s.get("minimum").cloned().unwrap_or(Value::from(0)),
            Some("boolean") => Value::Bool(false),
            Some("array") => Value::Array(Vec::new()),
            Some("object") => {
                let mut m = Map::new();
                let props = s.get("properties").and_then(Value::as_object);
                let required =
                    s.get("required").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
                for r in required.iter().filter_map(Value::as_str) {
                    let filler = props.and_then(|p| p.get(r)).map_or(Value::Null, |ps| self.placeholder(ps));
                    m.insert(r.to_owned(), filler);
                }
                Value::Object(m)
            }
            _ => Value::Null,
        }
    }
}

/// The `type` of a schema node as a list (`"string"` or `["string", "null"]`).
fn types_of(s: &Value) -> Vec<&str> {
    match s.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

fn type_fits(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => true,
    }
}

/// `v` in words, for "found ...".
fn found(v: &Value) -> String {
    match v {
        Value::Null => "nothing (null)".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.chars().count() > 40 => {
            format!("the string {:?}...", s.chars().take(40).collect::<String>())
        }
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

fn wrong_type(expected: &str, v: &Value) -> String {
    let hint = if expected == "a string" && (v.is_number() || v.is_boolean()) { " (quote it)" } else { "" };
    format!("invalid type: expected {expected}, found {}{hint}", found(v))
}

/// The range an integer field allows: the schema's `minimum`/`maximum`, and the width its
/// `format` names (`uint32`: at most 4294967295).
fn out_of_range(s: &Value, n: &serde_json::Number) -> Option<String> {
    let min = s.get("minimum").and_then(Value::as_f64);
    let width_max = match s.get("format").and_then(Value::as_str) {
        Some("uint8") => Some(f64::from(u8::MAX)),
        Some("uint16") => Some(f64::from(u16::MAX)),
        Some("uint32") => Some(f64::from(u32::MAX)),
        _ => None,
    };
    let max = match (s.get("maximum").and_then(Value::as_f64), width_max) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let x = n.as_f64()?;
    let low = min.is_some_and(|m| x < m);
    let high = max.is_some_and(|m| x > m);
    (low || high).then(|| match (min, max) {
        (Some(lo), Some(hi)) => format!("{n} is out of range: must be from {lo} to {hi}"),
        (Some(lo), None) => format!("{n} is out of range: must be at least {lo}"),
        (None, Some(hi)) => format!("{n} is out of range: must be at most {hi}"),
        (None, None) => format!("{n} is out of range"),
    })
}

/// The known name closest to `unknown`, if it is close enough to be a typo: the same name in
/// another case or with `_`/`-` (`api_version` for `apiVersion`), or at most two edits away
/// and fewer than half the name's letters.
pub(super) fn did_you_mean<'a>(unknown: &str, known: &[&'a str]) -> Option<&'a str> {
    let fold = |s: &str| {
        s.chars().filter(|c| !matches!(c, '_' | '-')).flat_map(char::to_lowercase).collect::<String>()
    };
    let u = fold(unknown);
    if let Some(k) = known.iter().find(|k| fold(k) == u) {
        return Some(k);
    }
    known
        .iter()
        .map(|k| (strsim::levenshtein(&u, &fold(k)), *k))
        .filter(|(d, k)| *d <= 2 && *d * 2 < k.chars().count())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}
