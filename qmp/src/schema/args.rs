//! A serde `Deserializer` over command arguments that reports problems in
//! QEMU's words.
//!
//! The argument types in [`super`] are ordinary `#[derive(Deserialize)]`
//! structs with `deny_unknown_fields`. Deserializing them through
//! [`ArgsDeserializer`] instead of `serde_json::from_value` turns serde's
//! error callbacks (`unknown_field`, `missing_field`, `invalid_type`,
//! `invalid_value`, `unknown_variant`) into the messages QEMU's QAPI input
//! visitor produces, naming the parameter at fault:
//!
//! * `Parameter 'foo' is unexpected`
//! * `Parameter 'val' is missing`
//! * `Invalid parameter type for 'val', expected: integer`
//! * `Parameter 'max-cpu-throttle' expects uint8`
//! * `Parameter 'capability' does not accept value 'foo'`
//!
//! Unlike serde_json, a JSON `null` is not taken as an absent optional
//! argument: QEMU rejects it as a wrong type, and so do we.

use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::protocol::QmpError;

/// Deserializes `T` from a command's `arguments` object.
pub(crate) fn from_arguments<T: for<'de> Deserialize<'de>>(
    arguments: Map<String, Value>,
) -> Result<T, QmpError> {
    T::deserialize(ArgsDeserializer {
        value: Value::Object(arguments),
        name: None,
    })
    .map_err(ArgError::into_qmp)
}

/// What went wrong, before it is worded.
#[derive(Debug)]
pub(crate) enum ArgError {
    Custom(String),
    Missing(String),
    Unexpected(String),
    InvalidType {
        name: Option<String>,
        expected: String,
    },
    OutOfRange {
        name: Option<String>,
        expected: String,
    },
    BadEnum {
        name: Option<String>,
        value: String,
    },
}

impl ArgError {
    /// Fills in the parameter name if the error does not carry one yet.
    fn named(mut self, param: &Option<String>) -> Self {
        match &mut self {
            ArgError::InvalidType { name, .. }
            | ArgError::OutOfRange { name, .. }
            | ArgError::BadEnum { name, .. }
                if name.is_none() =>
            {
                name.clone_from(param);
            }
            _ => {}
        }
        self
    }

    pub(crate) fn into_qmp(self) -> QmpError {
        QmpError::generic(self.to_string())
    }
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn n(name: &Option<String>) -> &str {
            name.as_deref().unwrap_or("null")
        }
        match self {
            ArgError::Custom(s) => f.write_str(s),
            ArgError::Missing(p) => write!(f, "Parameter '{p}' is missing"),
            ArgError::Unexpected(p) => write!(f, "Parameter '{p}' is unexpected"),
            ArgError::InvalidType { name, expected } => {
                write!(
                    f,
                    "Invalid parameter type for '{}', expected: {expected}",
                    n(name)
                )
            }
            ArgError::OutOfRange { name, expected } => {
                write!(f, "Parameter '{}' expects {expected}", n(name))
            }
            ArgError::BadEnum { name, value } => {
                write!(f, "Parameter '{}' does not accept value '{value}'", n(name))
            }
        }
    }
}

impl std::error::Error for ArgError {}

/// Maps serde's description of an expected Rust type to a QAPI type name.
fn qapi_type(expected: &str) -> String {
    let int = |s: &str| {
        (s.starts_with('u') || s.starts_with('i'))
            && s.len() > 1
            && s[1..].bytes().all(|b| b.is_ascii_digit())
    };
    if int(expected) {
        "integer".into()
    } else if expected == "f32" || expected == "f64" {
        "number".into()
    } else if expected.contains("bool") {
        "boolean".into()
    } else if expected.contains("string")
        || expected.starts_with("enum ")
        || expected.contains("identifier")
    {
        "string".into()
    } else if expected.contains("sequence") {
        "array".into()
    } else if expected.starts_with("struct ") || expected.contains("map") {
        "object".into()
    } else {
        expected.into()
    }
}

/// `u8` → `uint8`, `i64` → `int64`.
fn qapi_int_range(expected: &str) -> Option<String> {
    let (prefix, bits) = expected.split_at_checked(1)?;
    if !bits.bytes().all(|b| b.is_ascii_digit()) || bits.is_empty() {
        return None;
    }
    match prefix {
        "u" => Some(format!("uint{bits}")),
        "i" => Some(format!("int{bits}")),
        _ => None,
    }
}

impl de::Error for ArgError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ArgError::Custom(msg.to_string())
    }

    fn invalid_type(_unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        ArgError::InvalidType {
            name: None,
            expected: qapi_type(&exp.to_string()),
        }
    }

    fn invalid_value(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        let exp = exp.to_string();
        match (&unexp, qapi_int_range(&exp)) {
            (de::Unexpected::Signed(_) | de::Unexpected::Unsigned(_), Some(range)) => {
                ArgError::OutOfRange {
                    name: None,
                    expected: range,
                }
            }
            _ => ArgError::InvalidType {
                name: None,
                expected: qapi_type(&exp),
            },
        }
    }

    fn invalid_length(len: usize, exp: &dyn de::Expected) -> Self {
        ArgError::Custom(format!("Invalid length {len}, expected {exp}"))
    }

    fn unknown_variant(variant: &str, _expected: &'static [&'static str]) -> Self {
        ArgError::BadEnum {
            name: None,
            value: variant.into(),
        }
    }

    fn unknown_field(field: &str, _expected: &'static [&'static str]) -> Self {
        ArgError::Unexpected(field.into())
    }

    fn missing_field(field: &'static str) -> Self {
        ArgError::Missing(field.into())
    }

    fn duplicate_field(field: &'static str) -> Self {
        ArgError::Custom(format!("Parameter '{field}' is duplicated"))
    }
}

fn unexpected(v: &Value) -> de::Unexpected<'_> {
    match v {
        Value::Null => de::Unexpected::Unit,
        Value::Bool(b) => de::Unexpected::Bool(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => de::Unexpected::Unsigned(u),
            (_, Some(i)) => de::Unexpected::Signed(i),
            _ => de::Unexpected::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => de::Unexpected::Str(s),
        Value::Array(_) => de::Unexpected::Seq,
        Value::Object(_) => de::Unexpected::Map,
    }
}

/// One JSON value and the name of the parameter it is the value of.
pub(crate) struct ArgsDeserializer {
    value: Value,
    name: Option<String>,
}

impl<'de> de::Deserializer<'de> for ArgsDeserializer {
    type Error = ArgError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        let name = self.name;
        let result = match self.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else {
                    visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => visitor.visit_string(s),
            Value::Array(items) => {
                let mut seq = SeqAccess {
                    items: items.into_iter().enumerate(),
                    parent: name.clone(),
                };
                visitor.visit_seq(&mut seq)
            }
            Value::Object(members) => visitor.visit_map(MapAccess {
                members: members.into_iter(),
                current: None,
            }),
        };
        result.map_err(|e| e.named(&name))
    }

    /// A present value is `Some`, even `null` (which then fails as a wrong type).
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        visitor.visit_some(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _enum_name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ArgError> {
        let name = self.name;
        let result = match self.value {
            Value::String(s) => {
                visitor.visit_enum(IntoDeserializer::<ArgError>::into_deserializer(s))
            }
            other => Err(de::Error::invalid_type(unexpected(&other), &visitor)),
        };
        result.map_err(|e| e.named(&name))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

struct SeqAccess {
    items: std::iter::Enumerate<std::vec::IntoIter<Value>>,
    parent: Option<String>,
}

impl<'de> de::SeqAccess<'de> for SeqAccess {
    type Error = ArgError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ArgError> {
        let Some((i, value)) = self.items.next() else {
            return Ok(None);
        };
        let name = Some(format!("{}[{i}]", self.parent.as_deref().unwrap_or("null")));
        seed.deserialize(ArgsDeserializer { value, name }).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapAccess {
    members: serde_json::map::IntoIter,
    current: Option<(String, Value)>,
}

impl<'de> de::MapAccess<'de> for MapAccess {
    type Error = ArgError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ArgError> {
        let Some((key, value)) = self.members.next() else {
            return Ok(None);
        };
        let k = seed.deserialize(IntoDeserializer::<ArgError>::into_deserializer(key.clone()))?;
        self.current = Some((key, value));
        Ok(Some(k))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, ArgError> {
        let (key, value) = self
            .current
            .take()
            .ok_or_else(|| ArgError::Custom("value requested before key".into()))?;
        seed.deserialize(ArgsDeserializer {
            value,
            name: Some(key),
        })
    }
}
