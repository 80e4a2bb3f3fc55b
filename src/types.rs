//! The message type registry (DESIGN §4) and preference bitsets over it.
//!
//! Each registered type has a bit; a user's preferences are one `u64` of enabled bits, so
//! the per-message check is a shift and a mask. Types outside the registry have no bit:
//! with `types.unknown = "deliver"` they cannot be switched off.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// Most registered types (one bit each in a `u64`).
pub const MAX_TYPES: usize = 64;

/// What happens to a record whose type is not in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownTypes {
    /// Deliver it to every target (it cannot be switched off).
    #[default]
    Deliver,
    /// Reject it at ingest with reason `unknown_type`.
    Reject,
}

/// One registered message type.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TypeConfig {
    /// The `type` of the envelope.
    pub name: String,
    /// Enabled for users who never chose.
    #[serde(default = "yes")]
    pub default: bool,
}

fn yes() -> bool {
    true
}

/// The type registry: `[[types]]` entries plus `types.unknown`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TypesConfig {
    pub registry: Vec<TypeConfig>,
    pub unknown: UnknownTypes,
}

/// `types` is an array of tables in TOML (`[[types]]`) but also carries `types.unknown`;
/// this accepts the array, or a table `{unknown = …, list = […]}` (what env vars give).
pub(crate) mod types_section {
    use super::{TypeConfig, TypesConfig, UnknownTypes};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        List(Vec<TypeConfig>),
        Table {
            #[serde(default)]
            unknown: UnknownTypes,
            #[serde(default)]
            list: Vec<TypeConfig>,
        },
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TypesConfig, D::Error> {
        Ok(match Repr::deserialize(d)? {
            Repr::List(registry) => TypesConfig {
                registry,
                unknown: UnknownTypes::Deliver,
            },
            Repr::Table { unknown, list } => TypesConfig {
                registry: list,
                unknown,
            },
        })
    }

    pub fn serialize<S: Serializer>(t: &TypesConfig, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Out<'a> {
            unknown: UnknownTypes,
            list: &'a [TypeConfig],
        }
        Out {
            unknown: t.unknown,
            list: &t.registry,
        }
        .serialize(s)
    }
}

/// The registry, indexed for the hot path.
#[derive(Debug, Clone)]
pub struct TypeRegistry {
    names: Vec<String>,
    index: HashMap<String, u8>,
    defaults: u64,
    pub unknown: UnknownTypes,
}

/// Where a message type stands in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeSlot {
    /// A registered type: its bit.
    Bit(u8),
    /// Not registered: delivered to everyone (or rejected at ingest).
    Unregistered,
}

impl TypeRegistry {
    /// Builds the registry; the config was validated (≤ 64 unique names).
    pub fn new(cfg: &TypesConfig) -> Self {
        let names: Vec<String> = cfg.registry.iter().map(|t| t.name.clone()).collect();
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u8))
            .collect();
        let defaults = cfg
            .registry
            .iter()
            .enumerate()
            .filter(|(_, t)| t.default)
            .fold(0u64, |bits, (i, _)| bits | 1 << i);
        Self {
            names,
            index,
            defaults,
            unknown: cfg.unknown,
        }
    }

    /// The bits of a user who never chose.
    pub fn defaults(&self) -> u64 {
        self.defaults
    }

    pub fn slot(&self, msg_type: &str) -> TypeSlot {
        self.index
            .get(msg_type)
            .map_or(TypeSlot::Unregistered, |b| TypeSlot::Bit(*b))
    }

    pub fn contains(&self, msg_type: &str) -> bool {
        self.index.contains_key(msg_type)
    }

    /// The unknown-type rule (`types.unknown`): false for a type ingest and
    /// `POST /v1/publish` refuse (`unknown_type`). One map lookup, no allocation.
    pub fn admits(&self, msg_type: &str) -> bool {
        self.unknown == UnknownTypes::Deliver || self.contains(msg_type)
    }

    /// The registered types in bit order, with their defaults (what `GET /v1/types` lists).
    pub fn registered(&self) -> Vec<TypeConfig> {
        self.names
            .iter()
            .enumerate()
            .map(|(i, n)| TypeConfig {
                name: n.clone(),
                default: self.defaults & (1 << i) != 0,
            })
            .collect()
    }

    /// Applies choices by name onto `bits`; names not in the registry are ignored.
    pub fn apply<'a>(
        &self,
        mut bits: u64,
        choices: impl IntoIterator<Item = (&'a str, bool)>,
    ) -> u64 {
        for (name, enabled) in choices {
            if let Some(bit) = self.index.get(name) {
                if enabled {
                    bits |= 1 << bit;
                } else {
                    bits &= !(1 << bit);
                }
            }
        }
        bits
    }

    /// Every registered type with its state in `bits`.
    pub fn to_map(&self, bits: u64) -> BTreeMap<String, bool> {
        self.names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), bits & (1 << i) != 0))
            .collect()
    }

    /// The first name in `names` that is not registered.
    pub fn first_unknown<'a>(
        &self,
        names: impl IntoIterator<Item = &'a String>,
    ) -> Option<&'a String> {
        names
            .into_iter()
            .find(|n| !self.index.contains_key(n.as_str()))
    }
}

/// True if `bits` let a message of `slot` through.
#[inline]
pub fn accepts(bits: u64, slot: TypeSlot) -> bool {
    match slot {
        TypeSlot::Bit(b) => bits & (1 << b) != 0,
        TypeSlot::Unregistered => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> TypeRegistry {
        TypeRegistry::new(&TypesConfig {
            registry: vec![
                TypeConfig {
                    name: "robot.reply".into(),
                    default: true,
                },
                TypeConfig {
                    name: "marketing".into(),
                    default: false,
                },
            ],
            unknown: UnknownTypes::Deliver,
        })
    }

    #[test]
    fn defaults_and_choices_make_the_bits() {
        let r = registry();
        let d = r.defaults();
        assert!(accepts(d, r.slot("robot.reply")) && !accepts(d, r.slot("marketing")));
        assert!(
            accepts(d, r.slot("never.registered")),
            "unregistered types cannot be switched off"
        );
        let bits = r.apply(
            d,
            [("marketing", true), ("robot.reply", false), ("nope", false)],
        );
        assert!(!accepts(bits, r.slot("robot.reply")) && accepts(bits, r.slot("marketing")));
        assert_eq!(
            r.to_map(bits),
            BTreeMap::from([("marketing".into(), true), ("robot.reply".into(), false)])
        );
    }

    #[test]
    fn the_unknown_type_rule_and_the_listing_come_from_the_registry() {
        let mut r = registry();
        assert!(r.admits("marketing") && r.admits("never.registered"));
        r.unknown = UnknownTypes::Reject;
        assert!(r.admits("marketing") && !r.admits("never.registered"));
        let listed: Vec<(String, bool)> = r
            .registered()
            .into_iter()
            .map(|t| (t.name, t.default))
            .collect();
        assert_eq!(
            listed,
            [("robot.reply".into(), true), ("marketing".into(), false)]
        );
    }

    #[test]
    fn first_unknown_names_the_offender() {
        let r = registry();
        let names = ["marketing".to_owned(), "bogus".to_owned()];
        assert_eq!(r.first_unknown(&names).map(String::as_str), Some("bogus"));
        assert_eq!(r.first_unknown(&names[..1]), None);
    }
}
