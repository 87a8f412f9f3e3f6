//! Partials (`{{> name}}`) checked at load: no cycles, bounded nesting, names written out.
//!
//! The Handlebars renderer follows partials by recursion with no limit of its own, so `a`
//! including `b` including `a` overflows the stack on the first event that reaches either,
//! which aborts the process: no `catch_unwind` can turn a stack overflow into an error. The
//! only safe place to stop it is before any rendering: the graph of which template includes
//! which is known when the templates compile, and a ruleset with a cycle (or nesting deeper
//! than [`MAX_DEPTH`], or a partial whose name is computed at render time, which this check
//! could not follow) is refused as a whole, so a reload keeps the rules that work.
//!
//! Inline partials (`{{#*inline "x"}}`) are nodes of the same graph, named as they are used:
//! a template and an inline partial of the same name are taken to be one node, which can only
//! find more cycles than there are, never fewer.

use std::collections::{BTreeMap, BTreeSet};

use handlebars::template::{Parameter, Template, TemplateElement};

/// Deepest chain of partials a template may include (`a` → `b` → `c` is 2).
pub const MAX_DEPTH: usize = 16;

/// A problem with the partials of one template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialProblem {
    /// The template where it shows.
    pub template: String,
    pub message: String,
    /// 1-based line and column in the template, where known.
    pub line: Option<usize>,
    pub column: Option<usize>,
}

/// What one node includes: each partial name with the position of its first use.
type Edges = BTreeMap<String, (usize, usize)>;

/// Checks the partial graph of `templates` (name → compiled template).
pub fn check<'a>(templates: impl Iterator<Item = (&'a str, &'a Template)>) -> Vec<PartialProblem> {
    let mut graph: BTreeMap<String, Edges> = BTreeMap::new();
    let mut problems = Vec::new();
    for (name, t) in templates {
        let mut own = Edges::new();
        walk(name, t, &mut own, &mut graph, &mut problems);
        graph.entry(name.to_string()).or_default().extend(own);
    }
    // Depth-first search from every node, reporting each cycle once (by its set of nodes),
    // and the deepest chain once if it is too deep.
    let mut reported: BTreeSet<Vec<String>> = BTreeSet::new();
    let mut deepest: BTreeMap<String, usize> = BTreeMap::new();
    let mut worst: Option<(String, usize)> = None;
    for start in graph.keys() {
        let mut path = vec![start.clone()];
        let d = dfs(
            &graph,
            &mut path,
            &mut reported,
            &mut deepest,
            &mut problems,
        );
        if worst.as_ref().is_none_or(|(_, w)| d > *w) {
            worst = Some((start.clone(), d));
        }
    }
    if let Some((t, d)) = worst.filter(|(_, d)| *d > MAX_DEPTH) {
        problems.push(PartialProblem {
            template: t,
            message: format!(
                "partials nest {d} levels deep below this template, more than the {MAX_DEPTH} allowed"
            ),
            line: None,
            column: None,
        });
    }
    problems
}

/// Collects the partials `t` includes into `own`, and registers inline partials it defines as
/// nodes of their own.
fn walk(
    owner: &str,
    t: &Template,
    own: &mut Edges,
    graph: &mut BTreeMap<String, Edges>,
    problems: &mut Vec<PartialProblem>,
) {
    for (i, el) in t.elements.iter().enumerate() {
        let pos = t.mapping.get(i).map(|m| (m.0, m.1)).unwrap_or((1, 1));
        match el {
            TemplateElement::PartialExpression(d) | TemplateElement::PartialBlock(d) => {
                match static_name(&d.name) {
                    Some(n) if n.starts_with('@') => {} // @partial-block: the caller's own block
                    Some(n) => {
                        own.entry(n.to_string()).or_insert(pos);
                    }
                    None => problems.push(PartialProblem {
                        template: owner.to_string(),
                        message: "a partial whose name is computed while rendering cannot be checked for cycles".into(),
                        line: Some(pos.0),
                        column: Some(pos.1),
                    }),
                }
                if let Some(inner) = &d.template {
                    walk(owner, inner, own, graph, problems);
                }
            }
            TemplateElement::DecoratorBlock(d) => {
                let inline = static_name(&d.name) == Some("inline");
                let defined = d.params.first().and_then(literal_or_name);
                match (inline, defined, &d.template) {
                    (true, Some(n), Some(inner)) => {
                        let mut edges = Edges::new();
                        walk(&n, inner, &mut edges, graph, problems);
                        graph.entry(n).or_default().extend(edges);
                    }
                    (_, _, Some(inner)) => walk(owner, inner, own, graph, problems),
                    _ => {}
                }
            }
            TemplateElement::HelperBlock(h) => {
                for inner in [&h.template, &h.inverse].into_iter().flatten() {
                    walk(owner, inner, own, graph, problems);
                }
            }
            _ => {}
        }
    }
}

fn static_name(p: &Parameter) -> Option<&str> {
    match p {
        Parameter::Name(_) | Parameter::Path(_) => p.as_name(),
        _ => None,
    }
}

fn literal_or_name(p: &Parameter) -> Option<String> {
    match p {
        Parameter::Literal(serde_json::Value::String(s)) => Some(s.clone()),
        other => static_name(other).map(str::to_string),
    }
}

/// Follows the edges from the last node of `path`. Returns the depth of the deepest chain
/// below that node (memoised in `deepest` for nodes whose subtree has no cycle).
fn dfs(
    graph: &BTreeMap<String, Edges>,
    path: &mut Vec<String>,
    reported: &mut BTreeSet<Vec<String>>,
    deepest: &mut BTreeMap<String, usize>,
    problems: &mut Vec<PartialProblem>,
) -> usize {
    let Some(node) = path.last().cloned() else {
        return 0;
    };
    if let Some(d) = deepest.get(&node) {
        return *d;
    }
    let Some(edges) = graph.get(&node) else {
        return 0; // not a template here: rendering reports a missing partial
    };
    let mut depth = 0;
    for (next, (line, column)) in edges {
        if let Some(at) = path.iter().position(|p| p == next) {
            let cycle: Vec<String> = path[at..].to_vec();
            let mut key = cycle.clone();
            key.sort();
            if reported.insert(key) {
                let mut shown = cycle.clone();
                shown.push(next.clone());
                problems.push(PartialProblem {
                    template: node.clone(),
                    message: format!(
                        "partials include each other in a cycle: {} (rendering would never end)",
                        shown.join(" → ")
                    ),
                    line: Some(*line),
                    column: Some(*column),
                });
            }
            continue;
        }
        path.push(next.clone());
        let below = dfs(graph, path, reported, deepest, problems);
        path.pop();
        depth = depth.max(below + 1);
    }
    deepest.insert(node, depth);
    depth
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(srcs: &[(&str, &str)]) -> Vec<PartialProblem> {
        let compiled: Vec<(String, Template)> = srcs
            .iter()
            .map(|(n, s)| (n.to_string(), Template::compile(s).unwrap()))
            .collect();
        check(compiled.iter().map(|(n, t)| (n.as_str(), t)))
    }

    #[test]
    fn a_cycle_is_named_once_with_its_members() {
        let p = run(&[
            ("a", "x {{> b}}"),
            ("b", "{{#if y}}{{> a}}{{/if}}"),
            ("c", "{{> a}}"),
        ]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].message.contains("a → b → a") || p[0].message.contains("b → a → b"),
            "{p:?}"
        );
        assert!(run(&[("a", "{{> a}}")])[0].message.contains("a → a"));
    }

    #[test]
    fn inline_partials_and_blocks_count() {
        let p = run(&[("a", "{{#*inline \"x\"}}{{> x}}{{/inline}}{{> x}}")]);
        assert!(p.iter().any(|p| p.message.contains("x → x")), "{p:?}");
        let p = run(&[
            ("a", "{{#each items}}{{#> b}}fallback{{/b}}{{/each}}"),
            ("b", "{{> a}}"),
        ]);
        assert_eq!(p.len(), 1, "{p:?}");
    }

    #[test]
    fn sharing_without_cycles_is_fine_and_depth_is_bounded() {
        assert!(run(&[("a", "{{> c}}{{> c}}"), ("b", "{{> c}}"), ("c", "leaf")]).is_empty());
        let chain: Vec<(String, String)> = (0..30)
            .map(|i| (format!("t{i}"), format!("{{{{> t{}}}}}", i + 1)))
            .collect();
        let srcs: Vec<(&str, &str)> = chain
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let p = run(&srcs);
        assert!(p.iter().any(|p| p.message.contains("levels deep")), "{p:?}");
        let p = run(&[("a", "{{> (lookup this \"name\")}}")]);
        assert!(p[0].message.contains("computed"), "{p:?}");
    }
}
