//! Structure-aware fuzzing of the QMP request path: requests built from
//! minivmm's own schema (real command and argument names, values of every
//! JSON type, nested), serialized and sometimes damaged, go through
//! [`qmp::protocol::parse_request`] and [`qmp::schema::Command::parse`]:
//! every one must end in a command or a QMP error with a reason, never a
//! panic. Fixed seed (`MINIVMM_FUZZ_SEED`), bounded cases
//! (`MINIVMM_FUZZ_CASES`, default 3000); `tools/fuzz.sh` runs more.

use serde_json::{json, Map, Value};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Every name the schema knows: commands, argument members, enum values.
fn vocabulary() -> (Vec<String>, Vec<String>) {
    let schema = qmp::schema::qmp_schema_reply();
    let mut commands = Vec::new();
    let mut words = Vec::new();
    for e in schema.as_array().into_iter().flatten() {
        match e["meta-type"].as_str() {
            Some("command") => commands.push(e["name"].as_str().unwrap_or("").to_string()),
            Some("object") => {
                for m in e["members"].as_array().into_iter().flatten() {
                    words.push(m["name"].as_str().unwrap_or("").to_string());
                }
            }
            Some("enum") => {
                for v in e["values"].as_array().into_iter().flatten() {
                    words.push(v.as_str().unwrap_or("").to_string());
                }
            }
            _ => {}
        }
    }
    (commands, words)
}

fn value(rng: &mut Rng, words: &[String], depth: u32) -> Value {
    match rng.below(if depth > 4 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.below(2) == 0),
        2 => json!(rng.next() as i64),
        3 => json!([0u64, 1, u64::MAX, u32::MAX as u64, 100][rng.below(5)]),
        4 => json!(-(rng.below(1000) as i64)),
        5 => json!(words[rng.below(words.len())]),
        6 => Value::Array(
            (0..rng.below(4))
                .map(|_| value(rng, words, depth + 1))
                .collect(),
        ),
        _ => Value::Object(object(rng, words, depth + 1)),
    }
}

fn object(rng: &mut Rng, words: &[String], depth: u32) -> Map<String, Value> {
    (0..rng.below(5))
        .map(|_| {
            (
                words[rng.below(words.len())].clone(),
                value(rng, words, depth),
            )
        })
        .collect()
}

#[test]
fn fuzzed_requests_get_a_command_or_a_reason() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let cases = env("MINIVMM_FUZZ_CASES", 3000);
    let seed = env("MINIVMM_FUZZ_SEED", 0x716d_7066_757a_7a21);
    let (commands, words) = vocabulary();
    assert!(commands.len() > 40 && words.len() > 40);
    let mut rng = Rng(seed | 1);
    let (mut ok, mut refused) = (0, 0);
    for case in 0..cases {
        let mut req = Map::new();
        req.insert("execute".into(), json!(commands[rng.below(commands.len())]));
        if rng.below(4) != 0 {
            req.insert(
                "arguments".into(),
                Value::Object(object(&mut rng, &words, 0)),
            );
        }
        if rng.below(3) == 0 {
            req.insert("id".into(), value(&mut rng, &words, 2));
        }
        let mut bytes = serde_json::to_vec(&Value::Object(req)).unwrap();
        if rng.below(4) == 0 && !bytes.is_empty() {
            let i = rng.below(bytes.len());
            match rng.below(3) {
                0 => bytes[i] ^= 1 << rng.below(8),
                1 => bytes.truncate(i),
                _ => bytes.insert(i, rng.next() as u8),
            }
        }
        match qmp::protocol::parse_request(&bytes) {
            Err(e) => {
                assert!(!e.error.desc.is_empty(), "case {case}: empty error");
                refused += 1;
            }
            Ok(r) => match qmp::schema::Command::parse(&r.name, r.arguments) {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert!(
                        !e.desc.is_empty(),
                        "case {case} (seed {seed:#x}): empty error"
                    );
                    refused += 1;
                }
            },
        }
    }
    eprintln!("fuzzed QMP requests: {cases} cases, {ok} commands, {refused} refused");
    assert!(refused > 0);
}
