//! The architecture's rules, checked on the source (docs/architecture.md):
//! - `src/model/` is the only place that names tract; `src/kernels/` is plain Rust;
//! - imports between the library's top-level modules form no cycle (no two modules import each
//!   other, directly or through others).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without its comments and the contents of its string literals (a log
/// filter may name a crate; only paths count), line by line.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = String::with_capacity(text.len());
    // (a string may run over several lines)
    let mut in_str = false;
    for line in text.lines() {
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match (in_str, c) {
                (true, '\\') => {
                    chars.next();
                }
                (true, '"') => {
                    in_str = false;
                    out.push('"');
                }
                (true, _) => {}
                (false, '"') => {
                    in_str = true;
                    out.push('"');
                }
                (false, '/') if chars.peek() == Some(&'/') => break,
                // a char literal of a quote, '"', opens no string
                (false, '\'') if chars.clone().take(2).collect::<String>() == "\"'" => {
                    chars.next();
                    chars.next();
                }
                (false, c) => out.push(c),
            }
        }
        out.push('\n');
    }
    out
}

/// The top-level library module a file belongs to (`src/model/attn.rs` -> "model"), None for the
/// crate root and the binaries.
fn module_of(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root().join("src")).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    match first.as_str() {
        "lib.rs" | "bin" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

const TRACT_NAMES: [&str; 8] = ["tract_", "TypedRunnableModel", "TypedModel", "InferenceModel", "TValue", "TractError", "TractResult", "tvec!"];

#[test]
fn only_the_model_module_names_tract() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut bad = Vec::new();
    for f in &files {
        if module_of(f).as_deref() == Some("model") {
            continue;
        }
        let code = code(f);
        for name in TRACT_NAMES {
            if let Some(line) = code.lines().position(|l| l.contains(name)) {
                bad.push(format!("{}:{}: names {name}", f.strip_prefix(root()).unwrap().display(), line + 1));
            }
        }
    }
    assert!(bad.is_empty(), "tract outside src/model/:\n{}", bad.join("\n"));
    // and the check sees tract where it is
    assert!(code(&root().join("src/model/mod.rs")).contains("tract_onnx"));
}

/// `crate::<module>` references of each top-level module (bindings to other modules).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(m) = module_of(f) else { continue };
        let code = code(f);
        let mut rest = code.as_str();
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            // `use crate::{a, b::c}` groups
            let names: Vec<String> = if rest.starts_with('{') {
                let group = &rest[1..rest.find('}').unwrap_or(rest.len())];
                group.split(',').map(|p| p.trim().split("::").next().unwrap_or("").to_string()).collect()
            } else {
                vec![name]
            };
            for n in names {
                if n != m && modules.contains(&n) {
                    edges.entry(m.clone()).or_default().insert(n);
                }
            }
        }
        edges.entry(m).or_default();
    }
    edges
}

#[test]
fn library_modules_import_each_other_in_one_direction_only() {
    let edges = imports();
    // a cycle through each module, if there is one (depth-first search)
    fn find_cycle(at: &str, edges: &BTreeMap<String, BTreeSet<String>>, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == at) {
            let mut c = path[i..].to_vec();
            c.push(at.to_string());
            return Some(c);
        }
        if done.contains(at) {
            return None;
        }
        path.push(at.to_string());
        for next in edges.get(at).into_iter().flatten() {
            if let Some(c) = find_cycle(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(at.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in edges.keys() {
        if let Some(c) = find_cycle(m, &edges, &mut Vec::new(), &mut done) {
            panic!("modules import each other: {} (all imports: {edges:?})", c.join(" -> "));
        }
    }
    // the check sees imports where they are
    assert!(edges["pipeline"].contains("model") && edges["model"].contains("kernels"), "{edges:?}");
    assert!(edges["kernels"].is_empty(), "kernels import nothing of the crate: {:?}", edges["kernels"]);
}
