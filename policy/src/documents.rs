//! Policy files: multi-document YAML, every document checked, every problem
//! reported as `FILE:LINE: kind/name: field: message` with the line of the
//! field itself (the YAML is read with the position of every node), within
//! limits that make hostile input cheap to refuse.

use std::fmt;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::doc::{self, Resource};
use crate::{FieldError, ResourceId};

/// The most one file (`weftctl apply -f`) may hold.
pub const MAX_FILE_BYTES: usize = 4 * 1024 * 1024;
/// The most one resource may take, as stored (JSON). etcd refuses requests
/// over 1.5 MiB by default, and a route this large is a mistake.
pub const MAX_RESOURCE_BYTES: usize = 256 * 1024;
/// The most one apply may write: every resource goes in one etcd
/// transaction.
pub const MAX_APPLY_BYTES: usize = 1024 * 1024;
/// The most resources one apply may hold (etcd allows 128 operations in a
/// transaction by default).
pub const MAX_APPLY_RESOURCES: usize = 100;
/// The deepest nesting a YAML document may have (a policy needs 6).
pub const MAX_DEPTH: usize = 32;

/// A resource parsed from a document in a file, with where it came from.
#[derive(Debug, Clone)]
pub struct Located {
    pub resource: Resource,
    /// `FILE:LINE` of the document's first line.
    pub origin: String,
}

/// One problem, located: `FILE:LINE: kind/name: field: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedProblem {
    pub file: String,
    pub line: usize,
    pub resource: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for LocatedProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}: ", self.file, self.line, self.resource)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.message)
    }
}

/// A YAML node with the line of every node below it.
enum Node {
    Null,
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    Str(String),
    Seq(Vec<Spanned<Node>>),
    /// Each entry with the line of its key (a block value starts a line
    /// below it; a problem reads best at the key).
    Map(Vec<(String, usize, Spanned<Node>)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a YAML value")
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_none<E>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
                Ok(Node::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
                Ok(Node::I64(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
                Ok(Node::U64(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
                Ok(Node::F64(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Node, E> {
                Ok(Node::Str(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Node, E> {
                Ok(Node::Str(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut out = Vec::new();
                while let Some(n) = a.next_element::<Spanned<Node>>()? {
                    out.push(n);
                }
                Ok(Node::Seq(out))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut out: Vec<(String, usize, Spanned<Node>)> = Vec::new();
                while let Some(k) = a.next_key::<Spanned<String>>()? {
                    let v = a.next_value::<Spanned<Node>>()?;
                    if out.iter().any(|(seen, _, _)| *seen == k.value) {
                        return Err(serde::de::Error::custom(format!("duplicate key '{}'", k.value)));
                    }
                    out.push((k.value, k.referenced.line() as usize, v));
                }
                Ok(Node::Map(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl Node {
    fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Node::Null => Value::Null,
            Node::Bool(b) => Value::Bool(*b),
            Node::I64(i) => Value::from(*i),
            Node::U64(u) => Value::from(*u),
            Node::F64(f) => serde_json::Number::from_f64(*f).map(Value::Number).unwrap_or(Value::Null),
            Node::Str(s) => Value::String(s.clone()),
            Node::Seq(items) => Value::Array(items.iter().map(|n| n.value.to_json()).collect()),
            Node::Map(entries) => {
                Value::Object(entries.iter().map(|(k, _, v)| (k.clone(), v.value.to_json())).collect())
            }
        }
    }

    /// Records the line of every path below `path` (paths as problems name
    /// fields: `rules[1].retry.attempts`).
    fn lines(&self, path: &str, line: usize, out: &mut Vec<(String, usize)>) {
        out.push((path.to_string(), line));
        match self {
            Node::Seq(items) => {
                for (i, n) in items.iter().enumerate() {
                    n.value.lines(&format!("{path}[{i}]"), n.referenced.line() as usize, out);
                }
            }
            Node::Map(entries) => {
                for (k, key_line, n) in entries {
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    n.value.lines(&p, *key_line, out);
                }
            }
            _ => {}
        }
    }
}

/// One document's JSON value and the lines of its fields (1-based, within
/// the document).
pub struct Parsed {
    pub value: serde_json::Value,
    lines: Vec<(String, usize)>,
}

impl Parsed {
    /// The line of `field` (a problem's path), or of the nearest enclosing
    /// field that is in the document (a missing field's parent).
    pub fn line_of(&self, field: &str) -> usize {
        let mut f = field;
        loop {
            if let Some((_, line)) = self.lines.iter().find(|(p, _)| p == f) {
                return *line;
            }
            match f.rfind(['.', '[']) {
                Some(cut) => f = &f[..cut],
                None => return self.lines.first().map(|(_, l)| *l).unwrap_or(1),
            }
        }
    }
}

/// Parses one YAML document within [`MAX_DEPTH`]. The error carries the
/// 1-based line within `doc`.
pub fn parse_yaml(doc: &str) -> Result<Parsed, (usize, String)> {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_DEPTH;
    let mut opts = serde_saphyr::Options::default();
    opts.budget = Some(budget);
    match serde_saphyr::from_str_with_options::<Spanned<Node>>(doc, opts) {
        Ok(root) => {
            let mut lines = Vec::new();
            root.value.lines("", (root.referenced.line() as usize).max(1), &mut lines);
            Ok(Parsed { value: root.value.to_json(), lines })
        }
        Err(e) => {
            let line = e.location().map(|l| l.line() as usize).unwrap_or(1).max(1);
            let text = e.without_snippet().to_string();
            let first = text.lines().next().unwrap_or("not YAML").trim();
            // "error: line 2 column 10: unclosed bracket" -> "unclosed bracket"
            let msg = first.trim_start_matches("error: ");
            let msg = match msg.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
                Some((_, rest)) => rest,
                None => msg,
            };
            let msg = if msg.contains("Depth") || msg.contains("recursion limit") {
                format!("nested deeper than the limit of {MAX_DEPTH} levels")
            } else {
                msg.to_string()
            };
            Err((line, msg))
        }
    }
}

/// Parses and checks a multi-document YAML file. Returns every resource
/// when all are valid, else every problem found.
pub fn parse(file: &str, text: &str) -> Result<Vec<Located>, Vec<LocatedProblem>> {
    let at_file = |message: String| LocatedProblem {
        file: file.to_string(),
        line: 1,
        resource: "file".into(),
        field: String::new(),
        message,
    };
    if text.len() > MAX_FILE_BYTES {
        return Err(vec![at_file(format!(
            "{} bytes, more than the limit of {} MiB",
            text.len(),
            MAX_FILE_BYTES / (1024 * 1024)
        ))]);
    }
    let mut resources = Vec::new();
    let mut problems = Vec::new();
    let mut total = 0usize;
    for (start_line, doc) in split_documents(text) {
        if doc.trim().lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
            continue;
        }
        match parse_document(file, start_line, &doc) {
            Ok((resource, size)) => {
                total += size;
                resources.push(resource);
            }
            Err(found) => problems.extend(found),
        }
    }
    if resources.len() > MAX_APPLY_RESOURCES {
        problems.push(at_file(format!(
            "{} resources, more than the limit of {MAX_APPLY_RESOURCES} in one apply (split the file)",
            resources.len()
        )));
    }
    if total > MAX_APPLY_BYTES {
        problems.push(at_file(format!(
            "{} KiB of resources as stored, more than the limit of {} KiB in one apply (split the file)",
            total / 1024,
            MAX_APPLY_BYTES / 1024
        )));
    }
    problems.extend(defined_twice(file, &resources));
    if problems.is_empty() { Ok(resources) } else { Err(problems) }
}

/// One document, starting at `start_line` of `file`: the resource and its
/// size as stored, or its problems, each at the line of its field.
fn parse_document(file: &str, start_line: usize, doc: &str) -> Result<(Located, usize), Vec<LocatedProblem>> {
    let problem = |e: FieldError, resource: String, line: usize| LocatedProblem {
        file: file.to_string(),
        line: start_line + line - 1,
        resource,
        field: e.field,
        message: e.message,
    };
    let parsed =
        parse_yaml(doc).map_err(|(line, msg)| vec![problem(FieldError::new("", msg), "document".into(), line)])?;
    let label = describe(&parsed.value);
    let resource = doc::from_value(parsed.value.clone()).map_err(|e| {
        let line = parsed.line_of(&e.field);
        vec![problem(e, label, line)]
    })?;
    let mut found = crate::validate(&resource);
    let size = doc::to_value(&resource).to_string().len();
    if size > MAX_RESOURCE_BYTES {
        found.push(FieldError::new(
            "",
            format!("{} KiB as stored, more than the limit of {} KiB", size / 1024, MAX_RESOURCE_BYTES / 1024),
        ));
    }
    if !found.is_empty() {
        let label = resource.id().to_string();
        return Err(found
            .into_iter()
            .map(|e| {
                let line = parsed.line_of(&e.field);
                problem(e, label.clone(), line)
            })
            .collect());
    }
    Ok((Located { origin: format!("{file}:{start_line}"), resource }, size))
}

/// Two documents for the same resource would make "one transaction"
/// ambiguous: each repeat is a problem, at its line.
fn defined_twice(file: &str, resources: &[Located]) -> Vec<LocatedProblem> {
    let mut problems = Vec::new();
    let mut ids: Vec<(ResourceId, &str)> = Vec::new();
    for r in resources {
        let id = r.resource.id();
        if let Some((_, first)) = ids.iter().find(|(i, _)| *i == id) {
            let (f, line) = r.origin.rsplit_once(':').unwrap_or((file, "1"));
            problems.push(LocatedProblem {
                file: f.to_string(),
                line: line.parse().unwrap_or(1),
                resource: id.to_string(),
                field: String::new(),
                message: format!("defined twice in one file (first at {first})"),
            });
        } else {
            ids.push((id, &r.origin));
        }
    }
    problems
}

/// Splits on `---` lines; yields (1-based line of the document's first line, text).
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut start = 1;
    let mut cur = String::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            docs.push((start, std::mem::take(&mut cur)));
            start = i + 2;
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    docs.push((start, cur));
    docs
}

/// `kind/name` of a document, as far as it can be told from a raw value.
fn describe(v: &serde_json::Value) -> String {
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string();
    match v.get("kind").and_then(|k| k.as_str()) {
        Some("Route") => match v.get("tenant").and_then(|x| x.as_str()) {
            Some(t) => format!("route/{}/{t}", s("service")),
            None => format!("route/{}", s("service")),
        },
        Some("Resilience") => format!("resilience/{}", s("service")),
        Some("TenantPolicy") => format!("tenantpolicy/{}/{}", s("tenant"), s("service")),
        Some("AuthorizationPolicy") => format!("authorizationpolicy/{}", s("service")),
        Some(k) => format!("{}/?", k.to_ascii_lowercase()),
        None => "document".into(),
    }
}
