//! `query-qmp-schema`, generated from the argument types the parser uses.
//!
//! QEMU answers `query-qmp-schema` with its QAPI schema: one `SchemaInfo`
//! per command (`meta-type: command`, its argument type and return type)
//! and per type (`object` with members, `enum` with values, `array`,
//! `builtin`). minivmm derives it from the very structs
//! [`super::Command::parse`] deserializes: a probing [`serde::Deserializer`]
//! walks each argument struct as serde sees it (field names as renamed,
//! `Option` fields optional, enum variants, nested structs and lists), so
//! the schema lists exactly what the parser accepts. Return types are not
//! modelled: every command returns `any` (QEMU's builtin for "some JSON
//! value"), which tells a tool nothing false.

use std::collections::BTreeMap;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use serde::Deserialize;
use serde_json::{json, Value};

/// A type as the schema names it.
#[derive(Clone, Debug, PartialEq)]
enum Ty {
    Builtin(&'static str),
    Object(String),
    Enum(String),
    Array(Box<Ty>),
}

impl Ty {
    fn name(&self) -> String {
        match self {
            Ty::Builtin(b) => (*b).to_string(),
            Ty::Object(n) | Ty::Enum(n) => n.clone(),
            Ty::Array(t) => format!("[{}]", t.name()),
        }
    }
}

/// The schema being built: named types, in a stable order.
#[derive(Default)]
pub(super) struct Schema {
    types: BTreeMap<String, Value>,
    commands: Vec<Value>,
}

impl Schema {
    /// Add command `name` whose arguments deserialize as `T`.
    pub(super) fn command<'de, T: Deserialize<'de>>(&mut self, name: &str) {
        let arg = format!("{name}-arg");
        let mut probe = Probe {
            schema: self,
            name: arg.clone(),
            out: None,
        };
        // The probe answers every request with a valid value: this cannot
        // fail for a derived Deserialize; if it does, the command is listed
        // with no arguments known.
        let _ = T::deserialize(&mut probe);
        let arg = match probe.out {
            Some(Ty::Object(n)) => n,
            _ => {
                self.types.insert(
                    arg.clone(),
                    json!({"name": arg, "meta-type": "object", "members": []}),
                );
                arg
            }
        };
        self.commands.push(json!({
            "name": name,
            "meta-type": "command",
            "arg-type": arg,
            "ret-type": "any",
        }));
    }

    /// The `query-qmp-schema` reply.
    pub(super) fn finish(mut self) -> Value {
        for (b, json_type) in [
            ("str", "string"),
            ("int", "int"),
            ("number", "number"),
            ("bool", "boolean"),
            ("any", "value"),
        ] {
            self.types.insert(
                b.into(),
                json!({"name": b, "meta-type": "builtin", "json-type": json_type}),
            );
        }
        let mut out = self.commands;
        out.extend(self.types.into_values());
        Value::Array(out)
    }

    fn array(&mut self, elem: &Ty) -> Ty {
        let t = Ty::Array(Box::new(elem.clone()));
        self.types.insert(
            t.name(),
            json!({"name": t.name(), "meta-type": "array", "element-type": elem.name()}),
        );
        t
    }
}

/// Walks one type; `out` is what it found.
struct Probe<'s> {
    schema: &'s mut Schema,
    /// The name to give the type if it is a struct or enum.
    name: String,
    out: Option<Ty>,
}

/// Not an error a user sees: the probe met something it cannot describe.
#[derive(Debug)]
struct ProbeError(String);

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProbeError {}

impl de::Error for ProbeError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

macro_rules! builtin {
    ($($m:ident => $ty:literal, $visit:ident($v:expr);)*) => {$(
        fn $m<V: Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
            self.out = Some(Ty::Builtin($ty));
            v.$visit($v)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for &mut Probe<'_> {
    type Error = ProbeError;

    builtin! {
        deserialize_bool => "bool", visit_bool(false);
        deserialize_i8 => "int", visit_i8(0);
        deserialize_i16 => "int", visit_i16(0);
        deserialize_i32 => "int", visit_i32(0);
        deserialize_i64 => "int", visit_i64(0);
        deserialize_u8 => "int", visit_u8(0);
        deserialize_u16 => "int", visit_u16(0);
        deserialize_u32 => "int", visit_u32(0);
        deserialize_u64 => "int", visit_u64(0);
        deserialize_f32 => "number", visit_f32(0.0);
        deserialize_f64 => "number", visit_f64(0.0);
        deserialize_char => "str", visit_char('x');
        deserialize_str => "str", visit_str("");
        deserialize_string => "str", visit_string(String::new());
        deserialize_identifier => "str", visit_str("");
    }

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        self.out = Some(Ty::Builtin("any"));
        v.visit_unit()
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        self.deserialize_any(v)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        self.out = Some(Ty::Builtin("str"));
        v.visit_bytes(&[])
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        self.deserialize_bytes(v)
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        // The member's optionality is noted by the struct walk (below).
        v.visit_some(self)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        self.out = Some(Ty::Builtin("any"));
        v.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, ProbeError> {
        self.deserialize_unit(v)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, ProbeError> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        let mut elem = Probe {
            schema: &mut *self.schema,
            name: format!("{}-element", self.name),
            out: None,
        };
        let r = v.visit_seq(OneElement {
            probe: Some(&mut elem),
        })?;
        let e = elem.out.unwrap_or(Ty::Builtin("any"));
        self.out = Some(self.schema.array(&e));
        Ok(r)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, ProbeError> {
        self.deserialize_seq(v)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        v: V,
    ) -> Result<V::Value, ProbeError> {
        self.deserialize_seq(v)
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        self.out = Some(Ty::Builtin("any"));
        v.visit_map(Fields {
            probe: self,
            fields: &[],
            at: 0,
            members: Vec::new(),
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, ProbeError> {
        let mut walk = Fields {
            probe: &mut *self,
            fields,
            at: 0,
            members: Vec::new(),
        };
        let r = v.visit_map(&mut walk)?;
        let members = std::mem::take(&mut walk.members);
        let name = self.name.clone();
        self.schema.types.insert(
            name.clone(),
            json!({"name": name, "meta-type": "object", "members": members}),
        );
        self.out = Some(Ty::Object(name));
        Ok(r)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, ProbeError> {
        let name = self.name.clone();
        self.schema.types.insert(
            name.clone(),
            json!({
                "name": name,
                "meta-type": "enum",
                "values": variants,
                "members": variants.iter().map(|n| json!({"name": n})).collect::<Vec<_>>(),
            }),
        );
        self.out = Some(Ty::Enum(name));
        let first = variants.first().copied().unwrap_or("");
        v.visit_enum(first.into_deserializer())
    }
}

/// A sequence of one element, probed.
struct OneElement<'a, 's> {
    probe: Option<&'a mut Probe<'s>>,
}

impl<'de> de::SeqAccess<'de> for OneElement<'_, '_> {
    type Error = ProbeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ProbeError> {
        match self.probe.take() {
            Some(p) => seed.deserialize(p).map(Some),
            None => Ok(None),
        }
    }
}

/// A struct's fields, each offered once and probed.
struct Fields<'a, 's> {
    probe: &'a mut Probe<'s>,
    fields: &'static [&'static str],
    at: usize,
    members: Vec<Value>,
}

impl<'de> de::MapAccess<'de> for Fields<'_, '_> {
    type Error = ProbeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ProbeError> {
        let Some(f) = self.fields.get(self.at) else {
            return Ok(None);
        };
        seed.deserialize(f.into_deserializer()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, ProbeError> {
        let field = self.fields[self.at];
        self.at += 1;
        let mut p = Probe {
            schema: &mut *self.probe.schema,
            name: format!("{}-{field}", self.probe.name),
            out: None,
        };
        let optional = std::cell::Cell::new(false);
        let r = seed.deserialize(OptionSpy {
            probe: &mut p,
            optional: &optional,
        })?;
        let ty = p.out.unwrap_or(Ty::Builtin("any"));
        let mut m = json!({"name": field, "type": ty.name()});
        if optional.get() {
            m["default"] = Value::Null;
        }
        self.members.push(m);
        Ok(r)
    }
}

/// Notes whether a member is an `Option` before probing its type.
struct OptionSpy<'a, 'p> {
    probe: &'a mut Probe<'p>,
    optional: &'a std::cell::Cell<bool>,
}

macro_rules! forward {
    ($($m:ident),*) => {$(
        fn $m<V: Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
            self.probe.$m(v)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for OptionSpy<'_, '_> {
    type Error = ProbeError;

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        self.optional.set(true);
        v.visit_some(self.probe)
    }

    forward!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        deserialize_ignored_any
    );

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        v: V,
    ) -> Result<V::Value, ProbeError> {
        self.probe.deserialize_unit_struct(name, v)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        v: V,
    ) -> Result<V::Value, ProbeError> {
        self.probe.deserialize_newtype_struct(name, v)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, ProbeError> {
        self.probe.deserialize_tuple(len, v)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        v: V,
    ) -> Result<V::Value, ProbeError> {
        self.probe.deserialize_tuple_struct(name, len, v)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, ProbeError> {
        self.probe.deserialize_struct(name, fields, v)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, ProbeError> {
        self.probe.deserialize_enum(name, variants, v)
    }
}
