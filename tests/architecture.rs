//! The module graph of `src/` has no cycle.
//!
//! Data flows one way (`ingress → verify → decode → route → outbox → deliver → follow-up`), so
//! no module may depend, directly or through others, on a module that depends on it. This test
//! parses every file of the library with `syn`, collects the `crate::…` / `super::…` paths each
//! file module uses (in `use` items, in code, and in macro bodies), resolves each to the module
//! that defines it, and looks for a cycle. A module's use of its own submodules is ownership, not
//! a dependency (a `mod.rs` re-exporting its children is fine); a submodule's use of its parent
//! is a dependency. Test modules (`#[cfg(test)]`) are not architecture and are skipped.
//!
//! It is the check `cargo modules dependencies --acyclic` makes, without a rust-analyzer build.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// `src/a/b.rs` → `["a", "b"]`, `src/a/mod.rs` → `["a"]`, `src/lib.rs` → `[]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("src/ is readable")
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.meta
                .require_list()
                .is_ok_and(|l| l.tokens.to_string().trim() == "test")
    })
}

/// Collects the absolute paths (segments) a file module refers to.
struct Uses<'a> {
    module: &'a [String],
    found: Vec<Vec<String>>,
}

impl Uses<'_> {
    /// `crate::a::b` → `[a, b]`; `super::x` → parent + `[x]`; other paths are local.
    fn absolute(&self, segs: &[String]) -> Option<Vec<String>> {
        let first = segs.first()?;
        if first == "crate" {
            return Some(segs[1..].to_vec());
        }
        if first == "super" || first == "self" {
            let mut base = self.module.to_vec();
            let mut rest = segs;
            while let Some(s) = rest.first() {
                match s.as_str() {
                    "super" => {
                        base.pop();
                    }
                    "self" => {}
                    _ => break,
                }
                rest = &rest[1..];
            }
            base.extend(rest.iter().cloned());
            return Some(base);
        }
        None
    }

    fn add(&mut self, segs: Vec<String>) {
        if let Some(p) = self.absolute(&segs) {
            self.found.push(p);
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, t: &syn::UseTree) {
        match t {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let mut p = prefix.clone();
                if n.ident != "self" {
                    p.push(n.ident.to_string());
                }
                self.add(p);
            }
            syn::UseTree::Rename(r) => {
                let mut p = prefix.clone();
                if r.ident != "self" {
                    p.push(r.ident.to_string());
                }
                self.add(p);
            }
            syn::UseTree::Glob(_) => self.add(prefix.clone()),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }

    /// `crate :: a :: b` and `super :: x` sequences inside a macro's tokens.
    fn tokens(&mut self, ts: proc_macro2::TokenStream) {
        let toks: Vec<proc_macro2::TokenTree> = ts.into_iter().collect();
        let mut i = 0;
        while i < toks.len() {
            match &toks[i] {
                proc_macro2::TokenTree::Group(g) => self.tokens(g.stream()),
                proc_macro2::TokenTree::Ident(id) if id == "crate" || id == "super" => {
                    let mut segs = vec![id.to_string()];
                    let mut j = i + 1;
                    while j + 2 < toks.len() + 1 {
                        let colons = matches!((&toks.get(j), &toks.get(j + 1)),
                            (Some(proc_macro2::TokenTree::Punct(a)), Some(proc_macro2::TokenTree::Punct(b)))
                                if a.as_char() == ':' && b.as_char() == ':');
                        match (colons, toks.get(j + 2)) {
                            (true, Some(proc_macro2::TokenTree::Ident(n))) => {
                                segs.push(n.to_string());
                                j += 3;
                            }
                            _ => break,
                        }
                    }
                    self.add(segs);
                    i = j;
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
    }
}

impl<'ast> Visit<'ast> for Uses<'_> {
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if !is_test_only(&u.attrs) {
            self.use_tree(&mut Vec::new(), &u.tree);
        }
    }
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        // Inline test modules are skipped; other inline modules would need their own node,
        // and the library has none.
        if !is_test_only(&m.attrs) {
            syn::visit::visit_item_mod(self, m);
        }
    }
    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !is_test_only(&f.attrs) {
            syn::visit::visit_item_fn(self, f);
        }
    }
    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        if !is_test_only(&i.attrs) {
            syn::visit::visit_item_impl(self, i);
        }
    }
    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        self.add(segs);
        syn::visit::visit_path(self, p);
    }
    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.tokens(m.tokens.clone());
        syn::visit::visit_macro(self, m);
    }
}

/// The module graph: file module → modules it depends on (ownership edges left out).
fn graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    // `main.rs` and its `cli/` modules are the binary crate; it sits on top of the library.
    all.retain(|f| !f.ends_with("main.rs") && !f.starts_with(src.join("cli")));
    let modules: BTreeSet<Vec<String>> = all.iter().map(|f| module_of(&src, f)).collect();
    let mut g: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for f in &all {
        let module = module_of(&src, f);
        let text = std::fs::read_to_string(f).expect("source file is readable");
        let ast = syn::parse_file(&text)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", f.display()));
        let mut v = Uses {
            module: &module,
            found: Vec::new(),
        };
        v.visit_file(&ast);
        let deps = g.entry(module.clone()).or_default();
        for p in v.found {
            // The longest prefix that is a module of its own.
            let target = (0..=p.len())
                .rev()
                .map(|n| p[..n].to_vec())
                .find(|m| modules.contains(m))
                .unwrap_or_default();
            // `pub(crate)` and paths to the crate root's own items are no dependency.
            let owned = target.starts_with(&module) || target.is_empty();
            if !owned {
                deps.insert(target);
            }
        }
    }
    g
}

fn name(m: &[String]) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// A cycle, if there is one (depth-first search with colours).
fn find_cycle(g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum C {
        White,
        Grey,
        Black,
    }
    fn dfs(
        n: &Vec<String>,
        g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        colour: &mut BTreeMap<Vec<String>, C>,
        stack: &mut Vec<Vec<String>>,
    ) -> Option<Vec<String>> {
        colour.insert(n.clone(), C::Grey);
        stack.push(n.clone());
        for m in g.get(n).into_iter().flatten() {
            match colour.get(m).copied().unwrap_or(C::White) {
                C::Grey => {
                    let at = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut cycle: Vec<String> = stack[at..].iter().map(|s| name(s)).collect();
                    cycle.push(name(m));
                    return Some(cycle);
                }
                C::White => {
                    if let Some(c) = dfs(m, g, colour, stack) {
                        return Some(c);
                    }
                }
                C::Black => {}
            }
        }
        stack.pop();
        colour.insert(n.clone(), C::Black);
        None
    }
    let mut colour = BTreeMap::new();
    for n in g.keys() {
        if colour.get(n).copied().unwrap_or(C::White) == C::White {
            if let Some(c) = dfs(n, g, &mut colour, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_module_graph_has_no_cycle() {
    let g = graph();
    assert!(g.len() > 20, "found only {} modules under src/", g.len());
    if let Some(c) = find_cycle(&g) {
        panic!(
            "module cycle: {}\n(data flows one way: move the shared part into a module both use)",
            c.join(" → ")
        );
    }
}

#[test]
fn the_checker_sees_a_cycle_when_there_is_one() {
    let mut g = graph();
    let a = vec!["outbox".to_string()];
    let b = vec!["server".to_string()];
    g.entry(a.clone()).or_default().insert(b.clone());
    g.entry(b).or_default().insert(a);
    assert!(find_cycle(&g).is_some());
}

/// Prints the graph: `cargo test --test architecture -- --nocapture print`.
#[test]
fn print_the_module_graph() {
    if std::env::var_os("SWITCHYARD_PRINT_MODULES").is_none() {
        return;
    }
    for (m, deps) in graph() {
        let d: Vec<String> = deps.iter().map(|d| name(d)).collect();
        println!("{} → {}", name(&m), d.join(", "));
    }
}
