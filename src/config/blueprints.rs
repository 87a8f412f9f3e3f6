//! Port blueprint definitions kept in the rules directory (`blueprints/*.json`), optional.
//!
//! Entity `properties` are free-form to switchyard: what a `DeploymentConfig` holds is Port's
//! business. A rules directory that holds the blueprints (the JSON Port exports, or the answer of
//! `GET /v1/blueprints`, which `switchyard blueprints pull` saves) tells `check` more: for a rule
//! pinned to blueprints (`$.blueprint == "DeploymentConfig"` or `in [...]` among its `where`),
//! an unknown property is a warning with a did-you-mean, a number property compared with text is
//! an error, and a text compared with a value outside its `enum` is an error naming the allowed
//! values. Templates over `entity.properties.*` are checked the same way. Without blueprint
//! files nothing changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::diag::Diagnostic;
use super::yaml::Pos;
use crate::envelope::{Field, Shape};

/// What `check` knows of one blueprint.
#[derive(Debug, Clone)]
pub struct Blueprint {
    pub identifier: String,
    pub properties: BTreeMap<String, Shape>,
    pub relations: Vec<String>,
    pub file: PathBuf,
}

impl Blueprint {
    /// The shape of `properties` for entities of this blueprint.
    pub fn properties_shape(&self) -> Shape {
        Shape::Object(
            self.properties
                .iter()
                .map(|(k, s)| Field {
                    name: k.clone().into(),
                    shape: s.clone(),
                    doc: "",
                })
                .collect(),
        )
    }

    /// The shape of `relations`.
    pub fn relations_shape(&self) -> Shape {
        Shape::Object(
            self.relations
                .iter()
                .map(|k| Field {
                    name: k.clone().into(),
                    shape: Shape::Any,
                    doc: "",
                })
                .collect(),
        )
    }
}

/// A made-up entity of blueprint `id`: what `check` renders a `with:` rule against when a test
/// gives no results. With the blueprint's file (`known`), one value of the right type per
/// property and every relation; without it, no properties.
pub fn sample_entity(id: &str, known: Option<&Blueprint>) -> Value {
    let properties: serde_json::Map<String, Value> = known
        .into_iter()
        .flat_map(|b| &b.properties)
        .map(|(k, s)| {
            let v = match s {
                Shape::Number => Value::from(0),
                Shape::Bool => Value::Bool(false),
                Shape::Enum(values) => values.first().cloned().unwrap_or(Value::Null),
                Shape::Time => Value::from("2026-01-01T00:00:00Z"),
                Shape::List(_) => Value::Array(Vec::new()),
                Shape::Map(_) | Shape::Object(_) => Value::Object(Default::default()),
                Shape::Text => Value::from(format!("sample {k}")),
                Shape::Any => Value::Null,
            };
            (k.clone(), v)
        })
        .collect();
    let relations: serde_json::Map<String, Value> = known
        .into_iter()
        .flat_map(|b| &b.relations)
        .map(|r| (r.clone(), Value::Null))
        .collect();
    serde_json::json!({
        "identifier": "sample-entity",
        "title": "Sample entity",
        "blueprint": id,
        "icon": null,
        "team": [],
        "properties": properties,
        "relations": relations,
        "scorecards": {},
    })
}

/// Reads `dir/blueprints/*.json`; a file that is not a blueprint is an error at its place.
pub(super) fn load(dir: &Path, diags: &mut Vec<Diagnostic>) -> BTreeMap<String, Blueprint> {
    let mut out = BTreeMap::new();
    let bdir = dir.join("blueprints");
    if !bdir.is_dir() {
        return out;
    }
    let files = match super::parsed::list_files(&bdir, &["json"]) {
        Ok(f) => f,
        Err(d) => {
            diags.push(d);
            return out;
        }
    };
    for f in super::parsed::only_inside(dir, files, diags) {
        let text = match super::parsed::read_text(&f, 4 * 1024 * 1024) {
            Ok(t) => t,
            Err(d) => {
                diags.push(d);
                continue;
            }
        };
        let v: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                diags.push(
                    Diagnostic::error("bad-blueprint", format!("not JSON: {e}")).at(
                        &f,
                        Pos {
                            line: e.line(),
                            column: e.column(),
                            offset: 0,
                            len: 1,
                        },
                    ),
                );
                continue;
            }
        };
        // One blueprint, `{blueprint: {...}}`, `{blueprints: [...]}` (the API's answers) or a list.
        let list: Vec<&Value> = match (&v.get("blueprints"), &v.get("blueprint"), &v) {
            (Some(Value::Array(a)), _, _) => a.iter().collect(),
            (_, Some(b @ Value::Object(_)), _) => vec![b],
            (_, _, Value::Array(a)) => a.iter().collect(),
            _ => vec![&v],
        };
        for b in list {
            match parse(b, &f) {
                Some(bp) => {
                    if let Some(prev) = out.get(&bp.identifier) {
                        let prev: &Blueprint = prev;
                        diags.push(
                            Diagnostic::error(
                                "duplicate",
                                format!(
                                    "blueprint `{}` is defined twice (also in {})",
                                    bp.identifier,
                                    prev.file.display()
                                ),
                            )
                            .in_file(&f),
                        );
                        continue;
                    }
                    out.insert(bp.identifier.clone(), bp);
                }
                None => diags.push(
                    Diagnostic::error(
                        "bad-blueprint",
                        "not a Port blueprint: it needs `identifier` and `schema.properties`",
                    )
                    .in_file(&f)
                    .hint("save what Port exports (or run `switchyard blueprints pull --port <destination>`)"),
                ),
            }
        }
    }
    out
}

fn parse(b: &Value, file: &Path) -> Option<Blueprint> {
    let identifier = b.get("identifier")?.as_str()?.to_string();
    let schema = b.get("schema")?.get("properties")?.as_object()?;
    let mut properties = BTreeMap::new();
    for (k, p) in schema {
        properties.insert(k.clone(), property_shape(p));
    }
    // Calculated, mirrored and aggregated properties land in `properties` too.
    for extra in [
        "calculationProperties",
        "mirrorProperties",
        "aggregationProperties",
    ] {
        if let Some(m) = b.get(extra).and_then(Value::as_object) {
            for (k, p) in m {
                let shape = if extra == "calculationProperties" {
                    property_shape(p)
                } else {
                    Shape::Any
                };
                properties.insert(k.clone(), shape);
            }
        }
    }
    let relations = b
        .get("relations")
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    Some(Blueprint {
        identifier,
        properties,
        relations,
        file: file.to_path_buf(),
    })
}

fn property_shape(p: &Value) -> Shape {
    let allowed: Option<Vec<Value>> = p.get("enum").and_then(Value::as_array).cloned();
    match (p.get("type").and_then(Value::as_str), allowed) {
        (Some("string"), Some(values)) => Shape::Enum(values),
        (Some("number"), _) => Shape::Number,
        (Some("boolean"), _) => Shape::Bool,
        (Some("string"), None) => match p.get("format").and_then(Value::as_str) {
            Some("date-time") | Some("timer") => Shape::Time,
            _ => Shape::Text,
        },
        (Some("array"), _) => Shape::List(Box::new(Shape::Any)),
        (Some("object"), _) => Shape::Map(Box::new(Shape::Any)),
        _ => Shape::Any,
    }
}
