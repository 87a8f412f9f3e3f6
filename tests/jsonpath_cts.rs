//! The JSONPath Compliance Test Suite (RFC 9535) against the engine's path evaluation, fast
//! paths included: invalid selectors must be refused (a `check` error), valid ones must select
//! what the suite says. The score is printed; every remaining difference is listed, with its
//! reason, in `tests/vendor/jsonpath-cts/differences.txt`, and the test fails when the set of
//! differences changes (a regression, or an improvement to record).

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;
use switchyard::routing::path::JsonPathExpr;

fn outcome(case: &Value) -> Result<(), String> {
    let selector = case["selector"].as_str().unwrap_or_default();
    let compiled = JsonPathExpr::compile(selector);
    if case["invalid_selector"].as_bool() == Some(true) {
        return match compiled {
            Err(_) => Ok(()),
            Ok(_) => Err("accepted an invalid selector".into()),
        };
    }
    let expr = compiled.map_err(|e| format!("refused a valid selector: {e}"))?;
    let got: Vec<Value> = expr
        .select(&case["document"])
        .into_iter()
        .cloned()
        .collect();
    let got = Value::Array(got);
    let ok = match (&case["result"], &case["results"]) {
        (Value::Array(_), _) => got == case["result"],
        (_, Value::Array(alts)) => alts.contains(&got),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("selected {got}"))
    }
}

#[test]
fn jsonpath_compliance_test_suite() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vendor/jsonpath-cts");
    let cts: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cts.json")).unwrap()).unwrap();
    let tests = cts["tests"].as_array().unwrap();
    let mut failing = BTreeSet::new();
    for case in tests {
        let name = case["name"].as_str().unwrap_or_default().to_string();
        if let Err(why) = outcome(case) {
            eprintln!("  differs: {name}: {why}");
            failing.insert(name);
        }
    }
    let passed = tests.len() - failing.len();
    // Written to the process's stderr directly, not through `eprintln!`, which the test harness
    // captures: the score shows in every `cargo test` run.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "JSONPath Compliance Test Suite: {passed}/{} pass ({} differ on purpose, see tests/vendor/jsonpath-cts/differences.txt)",
        tests.len(),
        failing.len()
    );
    let listed: BTreeSet<String> = std::fs::read_to_string(dir.join("differences.txt"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(" | ").next().unwrap_or(l).trim().to_string())
        .collect();
    let new: Vec<_> = failing.difference(&listed).collect();
    let fixed: Vec<_> = listed.difference(&failing).collect();
    assert!(
        new.is_empty() && fixed.is_empty(),
        "differences changed: newly failing {new:#?}, now passing {fixed:#?} (update differences.txt)"
    );
}

/// A small deterministic generator (xorshift): the same documents and paths on every run.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn doc(&mut self, depth: u32) -> Value {
        let keys = ["a", "b", "after", "x y", "0", "é"];
        match self.below(if depth == 0 { 4 } else { 7 }) {
            0 => Value::Null,
            1 => Value::from(self.below(100) as i64 - 50),
            2 => Value::from(keys[self.below(6) as usize]),
            3 => Value::Bool(self.below(2) == 1),
            4 | 5 => {
                let mut m = serde_json::Map::new();
                for _ in 0..self.below(4) {
                    m.insert(keys[self.below(6) as usize].into(), self.doc(depth - 1));
                }
                Value::Object(m)
            }
            _ => Value::Array((0..self.below(4)).map(|_| self.doc(depth - 1)).collect()),
        }
    }
    fn path(&mut self) -> String {
        let mut p = "$".to_string();
        for _ in 0..self.below(5) {
            match self.below(5) {
                0 => p.push_str(&format!("[{}]", self.below(5) as i64 - 2)),
                1 => p.push_str("['x y']"),
                2 => p.push_str("['é']"),
                3 => p.push_str(["['0']", ".after", "['b']"][self.below(3) as usize]),
                _ => p.push_str([".a", ".b"][self.below(2) as usize]),
            }
        }
        p
    }
}

#[test]
fn the_fast_path_never_disagrees_with_the_general_engine() {
    let mut g = Gen(0x9E37_79B9_7F4A_7C15);
    for _ in 0..20_000 {
        let doc = g.doc(4);
        let path = g.path();
        let e = JsonPathExpr::compile(&path).unwrap();
        assert_eq!(e.select(&doc), e.select_general(&doc), "{path} on {doc}");
        assert_eq!(
            e.first(&doc),
            e.select_general(&doc).first().copied(),
            "{path}"
        );
    }
}
