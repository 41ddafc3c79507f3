//! docs/qemu-compatibility.md's QMP table names exactly the commands
//! minivmm answers (`query-commands`), so the document stays true.

use std::collections::BTreeSet;

#[test]
fn compatibility_table_matches_query_commands() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/qemu-compatibility.md");
    let doc = std::fs::read_to_string(path).expect("docs/qemu-compatibility.md");
    let table = doc
        .split("## QMP commands")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a '## QMP commands' section");
    let mut documented = BTreeSet::new();
    for row in table.lines().filter(|l| l.starts_with("| `")) {
        let first = row.split('|').nth(1).unwrap_or_default();
        for name in first.split('`').skip(1).step_by(2) {
            documented.insert(name.to_string());
        }
    }
    let answered: BTreeSet<String> = qmp::schema::query_commands_reply()
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect();
    let missing: Vec<_> = answered.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&answered).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/qemu-compatibility.md: not documented {missing:?}; documented but not answered {extra:?}"
    );
}
